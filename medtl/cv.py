"""Patient-grouped cross-validation splits, written once and reused, and operating thresholds.

No patient ever has images on both sides of a split: folds come from scikit-learn's
``StratifiedGroupKFold`` grouped by patient and stratified by label; the held-out test split
is drawn per patient too. Splits are saved as ``fold_assignments.csv`` (image, patient_id,
label, fold, split) and reused by later runs (nnU-Net's ``splits_final.json`` habit), so a
re-run or a second experiment compares models on the same patients.

Stratification key per row: the label string for single-label tasks; for multi-label cells
(``"a|b"``) the rarest of the row's labels (rarest by number of patients), so rare findings
spread over the folds instead of hiding in rare label combinations; an empty cell is the
key ``"(none)"``.

``cv.group_by`` (e.g. ``site``) gives leave-one-group-out folds instead: fold ``k`` holds every
patient of the ``k``-th group value in sorted order, so each group is scored by a model that
never saw it. A patient under two values of the column is an error (the held-out group would
share patients with training), as is a column with fewer than two values.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from medtl.config import CVConfig
from medtl.errors import ConfigError, ManifestError, MedtlError, look_up_option
from medtl.spreadsheet import read_csv, write_csv

__all__ = [
    "SPLITS_FILENAME",
    "choose_threshold",
    "choose_thresholds",
    "expected_folds",
    "load_splits",
    "make_or_load_splits",
    "make_splits",
    "save_splits",
]

log = logging.getLogger("medtl")

SPLITS_FILENAME = "fold_assignments.csv"
THRESHOLD_METHODS = ("youden", "sensitivity")
_NO_LABEL = "(none)"


def _require_columns(df: pd.DataFrame, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ManifestError(
            f"column(s) {missing} not in the table; it has {list(df.columns)} "
            "(set data.label_column / data.patient_column to the right names)"
        )


def _strat_keys(labels: pd.Series, patients: pd.Series, sep: str) -> pd.Series:
    """One stratification key per row (see the module docstring)."""
    text = labels.astype(str)
    if not text.str.contains(sep, regex=False).any():
        return text
    split = text.map(lambda s: [x for x in s.split(sep) if x])
    exploded = pd.DataFrame({"patient": patients.values, "lab": split.values}).explode("lab")
    n_patients = exploded.dropna().groupby("lab")["patient"].nunique()

    def rarest(labs: list[str]) -> str:
        return min(labs, key=lambda x: (n_patients[x], x)) if labs else _NO_LABEL

    return split.map(rarest)


def _patient_keys(keys: pd.Series, patients: pd.Series) -> pd.Series:
    """A patient's key is the rarest key among its images (patients are the unit of a split)."""
    frame = pd.DataFrame({"p": patients.values, "k": keys.values})
    counts = frame.groupby("k")["p"].nunique()
    frame["n"] = frame["k"].map(counts)
    return frame.sort_values(["n", "k"]).groupby("p", sort=True)["k"].first()


def _check_enough_patients(keys: pd.Series, patients: pd.Series, k: int, what: str) -> None:
    per_class = pd.DataFrame({"p": patients.values, "k": keys.values}).groupby("k")["p"].nunique()
    small = per_class[per_class < k]
    if len(small):
        detail = ", ".join(f"'{c}' has {n}" for c, n in small.items())
        raise ManifestError(
            f"too few patients per class for {what}: {detail} patient(s), need at least {k} "
            f"(patients per class: {per_class.to_dict()}). Use fewer folds (cv.folds="
            f"{max(2, int(per_class.min()))}) or gather more patients of that class."
        )


def _split_column_test(df: pd.DataFrame, cv: CVConfig, patients: pd.Series) -> set[str]:
    """Patients the split column marks ``test`` (all their rows, or an error)."""
    if cv.split_column not in df.columns:
        return set()
    split = df[cv.split_column].fillna("").astype(str).str.strip().str.lower()
    is_test = split == "test"
    marked = set(patients[is_test])
    mixed = sorted(set(patients[~is_test]) & marked)
    if mixed:
        raise ManifestError(
            f"patient(s) {mixed[:5]} have rows with {cv.split_column}='test' and rows without: "
            "a patient is held out as a whole; mark all their rows 'test' or none"
        )
    return marked


def _check_test_not_in_folds(
    test: set[str], folds: pd.Series, patients: pd.Series, cv: CVConfig
) -> None:
    """A held-out test patient (split 'test' or fold -1) with a CV fold would be trained on."""
    in_cv = (folds >= 0).to_numpy() & patients.isin(test).to_numpy()
    if not in_cv.any():
        return
    clash = pd.DataFrame({"p": patients[in_cv], "f": folds[in_cv].astype(int)})
    per = clash.groupby("p", sort=True)["f"].agg(lambda f: sorted(set(f.tolist())))
    shown = ", ".join(f"'{p}' (fold {'/'.join(map(str, f))})" for p, f in list(per.items())[:5])
    raise ManifestError(
        f"{len(per)} patient(s) held out as test (column '{cv.split_column}'='test' or "
        f"'{cv.fold_column}'=-1) also have a CV fold in column '{cv.fold_column}': {shown}"
        f"{', ...' if len(per) > 5 else ''}. A test patient must never be trained on: set their "
        f"'{cv.fold_column}' to -1 on every row to keep them in the test set, or set "
        f"'{cv.split_column}' to 'train' to cross-validate them"
    )


def _test_patients(
    df: pd.DataFrame,
    cv: CVConfig,
    patient_col: str,
    keys: pd.Series,
    seed: int,
    marked: set[str],
) -> set[str]:
    """The held-out patients: those the manifest marks, else a random ``cv.test_fraction``."""
    patients = df[patient_col].astype(str)
    if marked:
        if cv.test_fraction > 0:
            raise ConfigError(
                f"the manifest marks {len(marked)} test patient(s) (column '{cv.split_column}'="
                f"'test' or '{cv.fold_column}'=-1) and cv.test_fraction={cv.test_fraction} asks "
                "for a random test split too; set cv.test_fraction=0 to use the manifest's "
                "test patients, or drop those columns"
            )
        return marked
    if cv.test_fraction <= 0:
        return set()
    per_patient = _patient_keys(keys, patients)
    _check_enough_patients(per_patient, pd.Series(per_patient.index), 2, "a held-out test split")
    try:
        _, test = train_test_split(
            per_patient.index.to_numpy(),
            test_size=cv.test_fraction,
            stratify=per_patient.to_numpy(),
            random_state=seed,
        )
    except ValueError as err:
        raise ManifestError(
            f"cannot draw a stratified test split of {cv.test_fraction:.0%} of "
            f"{len(per_patient)} patients: {err}. Use a larger cv.test_fraction or more patients."
        ) from None
    return set(test)


def _honour_fold_column(
    df: pd.DataFrame, cv: CVConfig, patient_col: str, train_mask: np.ndarray
) -> np.ndarray:
    col = cv.fold_column
    raw = pd.to_numeric(df[col], errors="coerce")
    bad = df.loc[train_mask & (raw.isna() | (raw % 1 != 0)).to_numpy(), col]
    if len(bad):
        raise ManifestError(
            f"column '{col}' must hold integer folds for every non-test row; rows "
            f"{list(bad.index[:5])} have {list(bad.astype(str)[:5])}. Fill it or drop the column "
            "to let medtl make the folds"
        )
    folds = raw.to_numpy(dtype=float)
    train_folds = folds[train_mask].astype(int)
    k = int(train_folds.max()) + 1 if len(train_folds) else 0
    present = sorted(set(train_folds.tolist()))
    if present != list(range(k)) or k < 2:
        raise ManifestError(
            f"column '{col}' must number folds 0..k-1 (k >= 2); found {present}. "
            "Renumber the folds or drop the column"
        )
    if k != cv.folds:
        raise ConfigError(
            f"the manifest's '{col}' column has {k} folds but cv.folds={cv.folds}; "
            f"set cv.folds={k} (or --set cv.folds={k}) to use the manifest's folds, "
            "or drop the column to make new ones"
        )
    per = pd.DataFrame({"p": df[patient_col].astype(str)[train_mask], "f": train_folds})
    n_folds = per.groupby("p")["f"].nunique()
    split_patients = n_folds[n_folds > 1].index.tolist()
    if split_patients:
        p = split_patients[0]
        their = sorted(per.loc[per["p"] == p, "f"].unique().tolist())
        raise ManifestError(
            f"patient '{p}' is in folds {their} of column '{col}' "
            f"({len(split_patients)} patient(s) span several folds): every image of a patient "
            "must share one fold, or the validation scores leak. Fix the column or drop it"
        )
    out = np.full(len(df), -1, dtype=int)
    out[train_mask] = train_folds
    return out


def _group_values(df: pd.DataFrame, col: str, rows: np.ndarray) -> pd.Series:
    """The ``cv.group_by`` column as strings; ConfigError/ManifestError when unusable."""
    if col not in df.columns:
        raise ConfigError(
            f"cv.group_by='{col}' is not a manifest column; columns: {list(map(str, df.columns))}. "
            "Set cv.group_by to one of them (e.g. site) or leave it unset for patient-grouped folds"
        )
    values = df[col]
    empty = df.index[rows & values.isna().to_numpy()].tolist()
    if empty:
        raise ManifestError(
            f"{len(empty)} non-test row(s) have no '{col}' value (rows {empty[:5]}); "
            f"cv.group_by='{col}' needs one for every image: fill them or drop those rows"
        )
    return values.astype(str).str.strip()


def _group_folds(
    df: pd.DataFrame, cv: CVConfig, patients: pd.Series, train_mask: np.ndarray
) -> np.ndarray:
    """Leave-one-group-out folds over ``cv.group_by``: fold k = the k-th value, sorted."""
    col = str(cv.group_by)
    groups = _group_values(df, col, train_mask)
    per = pd.DataFrame({"p": patients[train_mask], "g": groups[train_mask]})
    n_groups = per.groupby("p")["g"].nunique()
    shared = n_groups[n_groups > 1].index.tolist()
    if shared:
        theirs = sorted(per.loc[per["p"] == shared[0], "g"].unique().tolist())
        raise ManifestError(
            f"{len(shared)} patient(s) appear under more than one '{col}' value (e.g. "
            f"'{shared[0]}' at {theirs}): leave-one-{col}-out would train on patients of the "
            f"held-out {col}. Give each patient one '{col}' value, or leave cv.group_by unset "
            "for patient-grouped folds"
        )
    names = sorted(per["g"].unique().tolist())
    if len(names) < 2:
        raise ConfigError(
            f"cv.group_by='{col}' needs at least 2 values to leave one out; the non-test rows "
            f"have {names}. Add data from another {col} or leave cv.group_by unset"
        )
    if cv.folds != len(names):
        log.info(
            "cv.folds=%d ignored: cv.group_by=%s gives %d folds (%s)",
            cv.folds,
            col,
            len(names),
            ", ".join(names),
        )
    index = {g: k for k, g in enumerate(names)}
    out = np.full(len(df), -1, dtype=int)
    out[train_mask] = groups[train_mask].map(index).to_numpy()
    return out


def expected_folds(df: pd.DataFrame, cv: CVConfig) -> int:
    """How many folds ``cv`` makes from the non-test rows ``df``: the number of
    ``cv.group_by`` values, else ``cv.folds``."""
    if cv.group_by is None or cv.group_by not in df.columns:
        return cv.folds
    return int(df[cv.group_by].dropna().astype(str).str.strip().nunique())


def make_splits(
    df: pd.DataFrame,
    cv: CVConfig,
    *,
    label_col: str = "label",
    patient_col: str = "patient_id",
    seed: int = 42,
    label_separator: str = "|",
) -> pd.DataFrame:
    """Add ``fold`` (0..k-1, -1 for held-out test) and ``split`` ("train"/"test") per row.

    Honours a manifest fold column (``cv.fold_column``) and a ``split`` column / test fraction.
    Row order and index are kept, so ``result.iloc[i]`` is manifest row ``i``.

    Test patients are the union of the split column's ``test`` rows and the fold column's
    ``-1`` rows; a test patient who also has a fold (>= 0) is an error, never a silent choice.
    With ``cv.group_by`` the non-test rows get leave-one-group-out folds (module docstring).

    Raises:
        ManifestError: missing columns, a patient spanning folds or test/train, a test
            patient with a CV fold, too few patients of a class for the folds, a patient
            under two ``cv.group_by`` values.
        ConfigError: the manifest's fold count differs from ``cv.folds``; test patients
            marked in the manifest and a ``cv.test_fraction`` both given; ``cv.group_by``
            not a column, with fewer than two values, or beside a manifest fold column.
    """
    _require_columns(df, [label_col, patient_col])
    if df[patient_col].isna().any() or df[label_col].isna().any():
        rows = df.index[df[patient_col].isna() | df[label_col].isna()].tolist()
        raise ManifestError(
            f"rows {rows[:5]} have no {patient_col} or {label_col}; every image needs both"
        )
    out = df.copy()
    patients = df[patient_col].astype(str)
    keys = _strat_keys(df[label_col], patients, label_separator)

    has_folds = cv.fold_column in df.columns and df[cv.fold_column].notna().any()
    # Test patients from either source are held out; neither column overrides the other.
    marked = _split_column_test(df, cv, patients)
    if has_folds:
        # fold -1 in a given column means held-out test (what save_splits writes).
        folds_given = pd.to_numeric(df[cv.fold_column], errors="coerce")
        marked |= set(patients[folds_given == -1])
        _check_test_not_in_folds(marked, folds_given, patients, cv)
    test = _test_patients(df, cv, patient_col, keys, seed, marked)
    is_test = patients.isin(test).to_numpy()

    if cv.group_by is not None:
        if has_folds and (pd.to_numeric(df[cv.fold_column], errors="coerce") >= 0).any():
            raise ConfigError(
                f"cv.group_by='{cv.group_by}' makes the folds, but the manifest's "
                f"'{cv.fold_column}' column gives folds too; drop that column or leave "
                "cv.group_by unset to use it"
            )
        folds = _group_folds(df, cv, patients, ~is_test)
    elif has_folds:
        folds = _honour_fold_column(df, cv, patient_col, ~is_test)
    else:
        train_keys, train_patients = keys[~is_test], patients[~is_test]
        _check_enough_patients(train_keys, train_patients, cv.folds, f"{cv.folds}-fold CV")
        sgkf = StratifiedGroupKFold(n_splits=cv.folds, shuffle=True, random_state=seed)
        folds = np.full(len(df), -1, dtype=int)
        train_pos = np.flatnonzero(~is_test)
        for k, (_, val) in enumerate(
            sgkf.split(np.zeros(len(train_pos)), train_keys.to_numpy(), train_patients.to_numpy())
        ):
            folds[train_pos[val]] = k
    out["fold"] = folds
    out["split"] = np.where(is_test, "test", "train")
    return out


def save_splits(
    df: pd.DataFrame,
    path: str | Path,
    *,
    image_col: str = "image",
    label_col: str = "label",
    patient_col: str = "patient_id",
) -> Path:
    """Write ``fold_assignments.csv`` (image, patient_id, label, fold, split); a folder gets the
    default file name. Column names are normalised to the CSV's so any manifest naming reads back."""
    _require_columns(df, [image_col, label_col, patient_col, "fold", "split"])
    path = Path(path)
    if path.suffix.lower() != ".csv":
        path = path / SPLITS_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {
            "image": df[image_col].astype(str).to_numpy(),
            "patient_id": df[patient_col].astype(str).to_numpy(),
            "label": df[label_col].astype(str).to_numpy(),
            "fold": df["fold"].astype(int).to_numpy(),
            "split": df["split"].astype(str).to_numpy(),
        }
    )
    write_csv(table, path)  # ids and labels cannot run as spreadsheet formulas
    return path


def load_splits(path: str | Path) -> pd.DataFrame:
    """Read a ``fold_assignments.csv`` written by :func:`save_splits` (identifiers stay strings)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLITS_FILENAME
    if not path.is_file():
        raise ManifestError(
            f"splits file '{path}' does not exist (make_splits + save_splits write it)"
        )
    table = read_csv(
        path,
        dtype={"image": str, "patient_id": str, "label": str, "split": str},
        keep_default_na=False,
    )
    _require_columns(table, ["image", "patient_id", "label", "fold", "split"])
    table["fold"] = table["fold"].astype(int)
    return table


def make_or_load_splits(
    df: pd.DataFrame,
    cv: CVConfig,
    path: str | Path,
    *,
    image_col: str = "image",
    label_col: str = "label",
    patient_col: str = "patient_id",
    seed: int = 42,
    label_separator: str = "|",
) -> pd.DataFrame:
    """Reuse the splits at ``path`` when it exists (checked against ``df``), else make and save.

    Raises:
        ManifestError: the stored splits do not cover the same images and patients.
    """
    path = Path(path)
    stored = path if path.suffix.lower() == ".csv" else path / SPLITS_FILENAME
    if not stored.is_file():
        out = make_splits(
            df,
            cv,
            label_col=label_col,
            patient_col=patient_col,
            seed=seed,
            label_separator=label_separator,
        )
        save_splits(out, stored, image_col=image_col, label_col=label_col, patient_col=patient_col)
        return out
    table = load_splits(stored).set_index("image")
    images = df[image_col].astype(str)
    missing = sorted(set(images) - set(table.index))
    extra = sorted(set(table.index) - set(images))
    if missing or extra:
        raise ManifestError(
            f"stored splits '{stored}' do not match the manifest: {len(missing)} image(s) not in "
            f"the splits (e.g. {missing[:3]}), {len(extra)} stored image(s) not in the manifest "
            f"(e.g. {extra[:3]}). Delete the file to make new splits"
        )
    stored_patient = table["patient_id"].reindex(images.to_numpy()).to_numpy()
    moved = images[stored_patient != df[patient_col].astype(str).to_numpy()]
    if len(moved):
        raise ManifestError(
            f"stored splits '{stored}' give image(s) {list(moved)[:3]} another patient than the "
            "manifest does; delete the file to make new splits"
        )
    stored_split = table["split"].reindex(images.to_numpy()).to_numpy()
    k, want = int(table["fold"].max()) + 1, expected_folds(df[stored_split != "test"], cv)
    if k != want:
        what = f"cv.group_by={cv.group_by} gives {want}" if cv.group_by else f"cv.folds={want}"
        raise ConfigError(
            f"stored splits '{stored}' have {k} folds but {what}; set cv.folds={k} (or "
            "cv.group_by to the column they were made by), or delete the file to make new splits"
        )
    out = df.copy()
    out["fold"] = table["fold"].reindex(images.to_numpy()).to_numpy()
    out["split"] = table["split"].reindex(images.to_numpy()).to_numpy()
    return out


def choose_threshold(
    y_true: np.ndarray,
    prob: np.ndarray,
    method: str = "youden",
    target_sensitivity: float = 0.9,
) -> float:
    """Operating threshold from the ROC curve; predict positive when ``prob >= threshold``.

    ``youden`` maximises sensitivity + specificity - 1; ``sensitivity`` is the highest threshold
    whose sensitivity reaches ``target_sensitivity`` (the most specific such point).

    Raises:
        MedtlError: ``y_true`` holds one class only (no ROC curve exists).
        ConfigError: unknown method.
    """
    look_up_option(method, THRESHOLD_METHODS, "threshold method")
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(prob, dtype=float).ravel()
    if len(np.unique(y)) < 2:
        raise MedtlError(
            f"cannot choose a threshold from {len(y)} validation case(s) of one class only "
            f"(classes present: {sorted(set(y.tolist()))}); the fold needs positives and negatives"
        )
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    # thr[0] is +inf (nothing predicted positive): never an operating point.
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    if method == "youden":
        i = int(np.argmax(tpr - fpr))  # first maximum = highest threshold among ties
    else:
        i = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
    return float(thr[i])


def choose_thresholds(
    y: np.ndarray,
    probs: np.ndarray,
    task: str,
    method: str = "youden",
    target_sensitivity: float = 0.9,
) -> float | list[float]:
    """Threshold(s) for a task: one float for binary (on column 1), else one per class
    (one-vs-rest; 0.5 where a class has only positives or only negatives).

    ``y`` is ``(N,)`` class indices for binary/multiclass or ``(N, C)`` multi-hot for multilabel.
    """
    look_up_option(task, ("binary", "multiclass", "multilabel"), "task")
    probs = np.asarray(probs, dtype=float)
    y = np.asarray(y)
    if task == "binary":
        return choose_threshold(y.astype(int), probs[:, 1], method, target_sensitivity)
    out = []
    for c in range(probs.shape[1]):
        yc = y[:, c] if task == "multilabel" else (y == c)
        yc = np.asarray(yc).astype(int)
        if len(np.unique(yc)) < 2:
            out.append(0.5)
        else:
            out.append(choose_threshold(yc, probs[:, c], method, target_sensitivity))
    return out
