"""Clinical metrics with patient-level bootstrap confidence intervals.

Point estimates come from scikit-learn's metric functions. Confidence intervals resample
PATIENTS with replacement (all images of a drawn patient come along), because images of one
patient are not independent: an image-level bootstrap would give falsely narrow intervals.
Resamples where a metric is undefined (e.g. AUROC when the resample holds one class) are
skipped and counted; intervals are percentile intervals.

The bootstrap is hand-written (scikit-learn has none). For speed it is vectorised: a patient
resample is a vector of draw counts, so every metric of every resample is a product of the
(resamples x patients) count matrix with per-patient sums. ``bootstrap_binary_metrics`` is
checked in the tests against :func:`binary_metrics` on explicitly materialised resamples.

Prediction rule everywhere: positive when ``prob >= threshold`` (scikit-learn's ``roc_curve``
convention, so thresholds chosen by :func:`medtl.cv.choose_threshold` mean the same here).

Result of :func:`evaluate` (JSON-safe; ``None`` where a metric is undefined)::

    {"task", "classes", "summary_kind", "n_images", "n_patients", "ci", "n_boot", "seed",
     "pooled": BLOCK, "folds": {"0": BLOCK, ...}, "fold_summary": {...},
     "subgroups": {"site": {"A": BLOCK, ...}}, "subgroups_missing": [...],
     "calibration": {class: reliability curve}, "notes": [...]}
    BLOCK = {"n", "n_patients", "n_pos", "summary": {metric: CI}, "per_class": {class:
             {"n_pos", "counts": {tn, fp, fn, tp}, "metrics": {metric: CI}}}, "confusion"?}
    CI = {"value", "low", "high", "skipped"}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medtl.errors import ManifestError, MedtlError, look_up_option
from medtl.evaluation.calibration import bin_ids, expected_calibration_error, reliability_curve

__all__ = [
    "BINARY_METRICS",
    "BootstrapCI",
    "PatientResamples",
    "binary_metrics",
    "bootstrap_binary_metrics",
    "bootstrap_ci",
    "evaluate",
    "evaluate_predictions",
    "percentile_ci",
    "row_thresholds",
    "targets_from_labels",
]

TASKS = ("binary", "multiclass", "multilabel")
BINARY_METRICS = (
    "auroc",
    "auprc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "balanced_accuracy",
    "accuracy",
    "brier",
    "ece",
)
COUNT_KEYS = ("tn", "fp", "fn", "tp")


def _num(x: Any) -> float | None:
    """JSON-safe float; NaN/inf (undefined) become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- point estimates
def binary_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float | np.ndarray, n_bins: int = 10
) -> dict[str, Any]:
    """All binary metrics at ``threshold`` (a float, or one per row); None where undefined.

    Keys: ``BINARY_METRICS`` plus ``n``, ``n_pos``, ``tn``, ``fp``, ``fn``, ``tp``.
    """
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=float).ravel()
    pred = (p >= np.asarray(threshold, dtype=float)).astype(int)
    n, n_pos = len(y), int(y.sum())
    both = 0 < n_pos < n
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    kw = {"labels": [0, 1], "zero_division": np.nan}
    return {
        "auroc": _num(roc_auc_score(y, p)) if both else None,
        "auprc": _num(average_precision_score(y, p)) if n_pos > 0 else None,
        "sensitivity": _num(recall_score(y, pred, pos_label=1, **kw)),
        "specificity": _num(recall_score(y, pred, pos_label=0, **kw)),
        "ppv": _num(precision_score(y, pred, pos_label=1, **kw)),
        "npv": _num(precision_score(y, pred, pos_label=0, **kw)),
        "f1": _num(f1_score(y, pred, pos_label=1, **kw)),
        "balanced_accuracy": _num(balanced_accuracy_score(y, pred)) if both else None,
        "accuracy": _num(accuracy_score(y, pred)) if n else None,
        "brier": _num(brier_score_loss(y, p, pos_label=1)) if n else None,
        "ece": _num(expected_calibration_error(y, p, n_bins)) if n else None,
        "n": n,
        "n_pos": n_pos,
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
    }


# ----------------------------------------------------------------------------- the bootstrap
class BootstrapCI(tuple[float | None, float | None]):
    """``(low, high)`` percentile interval that also says how many resamples were skipped."""

    n_used: int
    n_skipped: int

    def __new__(
        cls, low: float | None, high: float | None, n_used: int, n_skipped: int
    ) -> BootstrapCI:
        obj = super().__new__(cls, (low, high))
        obj.n_used = n_used
        obj.n_skipped = n_skipped
        return obj

    @property
    def low(self) -> float | None:
        return self[0]

    @property
    def high(self) -> float | None:
        return self[1]

    def __getnewargs__(self):  # keeps copy/pickle working for a tuple subclass
        return (self[0], self[1], self.n_used, self.n_skipped)


@dataclass(frozen=True)
class PatientResamples:
    """Seeded patient resamples: ``draws[b]`` lists the patients of resample ``b``.

    Patient multiplicities are made per chunk of resamples (``counts``, ``count_chunks``)
    rather than held for all of them: a (resamples x patients) float matrix is 80 MB at 10,000
    patients and 1,000 resamples, and the report makes one per block and subgroup.
    """

    codes: np.ndarray  # (n_images,) patient index of each image
    draws: np.ndarray  # (n_boot, n_patients) int32 patient indices drawn with replacement

    @classmethod
    def draw(cls, groups: Sequence[Any] | np.ndarray, n_boot: int, seed: int) -> PatientResamples:
        codes, uniques = pd.factorize(pd.Series(np.asarray(groups)).astype(str), sort=True)
        rng = np.random.default_rng(seed)
        # int32 draws are the same values as the default int64 ones, at half the memory
        # (tests/test_metrics.py checks it).
        return cls(
            codes=codes, draws=rng.integers(0, len(uniques), (n_boot, len(uniques)), np.int32)
        )

    @property
    def n_patients(self) -> int:
        """Patients in the resampled set."""
        return int(self.draws.shape[1])

    def counts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(stop - start, n_patients) float: how often each patient was drawn in resamples
        ``start:stop``."""
        d = self.draws[start:stop]
        n_pat = self.n_patients
        flat = (d + n_pat * np.arange(len(d))[:, None]).ravel()
        return np.bincount(flat, minlength=len(d) * n_pat).reshape(len(d), n_pat).astype(float)

    def count_chunks(self, width: int, cells: int = 1_000_000) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, counts(start, start + rows))`` over every resample, ``rows`` chosen so
        one chunk's (rows, max(patients, width)) arrays hold about ``cells`` values."""
        rows = max(1, cells // max(self.n_patients, width, 1))
        for start in range(0, len(self.draws), rows):
            yield start, self.counts(start, start + rows)

    def indices(self, b: int) -> np.ndarray:
        """Image indices of resample ``b`` (each drawn patient's images, repeats included)."""
        order = np.argsort(self.codes, kind="stable")
        starts = np.searchsorted(self.codes[order], np.arange(self.n_patients + 1))
        return np.concatenate([order[starts[q] : starts[q + 1]] for q in self.draws[b]])


def percentile_ci(values: np.ndarray, ci: float = 0.95) -> BootstrapCI:
    """Percentile interval over the defined (finite) resample values."""
    values = np.asarray(values, dtype=float)
    ok = values[np.isfinite(values)]
    skipped = int(len(values) - len(ok))
    if len(ok) < 2:
        return BootstrapCI(None, None, len(ok), skipped)
    alpha = (1.0 - ci) / 2.0
    low, high = np.percentile(ok, [100 * alpha, 100 * (1 - alpha)])
    return BootstrapCI(float(low), float(high), len(ok), skipped)


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    y: np.ndarray,
    p: np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Patient-bootstrap percentile CI of any ``metric_fn(y, p)``; resamples where it returns
    None/NaN (undefined) are skipped and counted in ``.n_skipped``."""
    y, p = np.asarray(y), np.asarray(p)
    res = PatientResamples.draw(groups, n_boot, seed)
    values = np.full(n_boot, np.nan)
    with warnings.catch_warnings():
        # One-class resamples are expected; they are counted, not warned about.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for b in range(n_boot):
            idx = res.indices(b)
            v = metric_fn(y[idx], p[idx])
            values[b] = np.nan if v is None else float(v)
    return percentile_ci(values, ci)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _per_patient(codes: np.ndarray, n_pat: int, *columns: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(codes, weights=c, minlength=n_pat) for c in columns], axis=1)


def bootstrap_binary_metrics(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float | np.ndarray,
    resamples: PatientResamples,
    n_bins: int = 10,
    chunk_cells: int = 1_000_000,
) -> dict[str, np.ndarray]:
    """Every ``BINARY_METRICS`` value for every resample (NaN where undefined), vectorised
    over chunks of resamples of about ``chunk_cells`` values each, so memory does not grow
    with the number of images.

    Same definitions as :func:`binary_metrics`: AUROC is the tie-corrected Mann-Whitney
    statistic and AUPRC the step-wise average precision, both with patient-count weights.
    """
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=float).ravel()
    pos = y == 1
    pred = p >= np.asarray(threshold, dtype=float)
    codes, n_pat = resamples.codes, resamples.n_patients
    A = _per_patient(
        codes,
        n_pat,
        (pos & pred).astype(float),
        (~pos & pred).astype(float),
        (pos & ~pred).astype(float),
        (~pos & ~pred).astype(float),
        (p - y) ** 2,
    )
    bins = bin_ids(p, n_bins)
    gap = sp.csr_matrix((y - p, (codes, bins)), shape=(n_pat, n_bins))
    # Ranking metrics: weighted positives/negatives per distinct score (ascending).
    uniq, inv = np.unique(p, return_inverse=True)
    m_pos = sp.csr_matrix((pos.astype(float), (codes, inv)), shape=(n_pat, len(uniq)))
    m_neg = sp.csr_matrix(((~pos).astype(float), (codes, inv)), shape=(n_pat, len(uniq)))
    out = {m: np.full(len(resamples.draws), np.nan) for m in BINARY_METRICS}
    for s, counts in resamples.count_chunks(len(uniq), chunk_cells):
        rows, sums = slice(s, s + len(counts)), counts @ A
        for name, values in _count_metrics(sums).items():
            out[name][rows] = values
        n = sums[:, 0] + sums[:, 1] + sums[:, 2] + sums[:, 3]
        out["ece"][rows] = _ratio(np.abs((gap.T @ counts.T).T).sum(axis=1), n)
        out["auroc"][rows], out["auprc"][rows] = _ranking_metrics(
            (m_pos.T @ counts.T).T, (m_neg.T @ counts.T).T
        )
    return out


def _count_metrics(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics and Brier score from per-resample (tp, fp, fn, tn, squared error)."""
    tp, fp, fn, tn, sq = sums.T
    n = tp + fp + fn + tn
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sens + spec) / 2,
        "accuracy": _ratio(tp + tn, n),
        "brier": _ratio(sq, n),
    }


def _ranking_metrics(w_pos: np.ndarray, w_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AUPRC per row from (resamples, distinct scores) positive/negative weights."""
    n_p, n_n = w_pos.sum(axis=1), w_neg.sum(axis=1)
    below = np.cumsum(w_neg, axis=1) - w_neg
    auroc = _ratio((w_pos * (below + 0.5 * w_neg)).sum(axis=1), n_p * n_n)
    tps = np.cumsum(w_pos[:, ::-1], axis=1)
    fps = np.cumsum(w_neg[:, ::-1], axis=1)
    precision = _ratio(tps, tps + fps)
    contrib = np.where(w_pos[:, ::-1] > 0, w_pos[:, ::-1] * precision, 0.0)
    return auroc, _ratio(contrib.sum(axis=1), n_p)


# ----------------------------------------------------------------------------- inputs
def targets_from_labels(
    labels: pd.Series, classes: Sequence[str], task: str, sep: str = "|"
) -> np.ndarray:
    """``(N, C)`` 0/1 target matrix from label strings (``"a|b"`` cells for multilabel).

    Raises:
        ManifestError: a label is not one of ``classes``.
    """
    classes = [str(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    Y = np.zeros((len(labels), len(classes)), dtype=int)
    bad: set[str] = set()
    for r, cell in enumerate(labels.tolist()):
        if task == "multilabel":
            names = [] if cell is None or pd.isna(cell) else str(cell).split(sep)
            names = [x.strip() for x in names if x.strip()]
        else:
            names = [str(cell)]
        for name in names:
            if name in index:
                Y[r, index[name]] = 1
            else:
                bad.add(name)
    if bad:
        raise ManifestError(
            f"label(s) {sorted(bad)[:5]} are not among the classes {classes}; "
            "fix the labels or set data.classes"
        )
    return Y


def _probabilities(df: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    cols = [f"prob_{c}" for c in classes]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise MedtlError(
            f"prediction table lacks column(s) {missing}; it has {list(df.columns)} "
            "(one prob_<class> column per class is expected)"
        )
    P = df[cols].to_numpy(dtype=float)
    if not np.isfinite(P).all() or P.min() < 0 or P.max() > 1:
        raise MedtlError("prob_<class> columns must hold probabilities in [0, 1] without gaps")
    return P


def _fold_key(k: Any) -> int:
    return int(k)


def row_thresholds(df: pd.DataFrame, thresholds: Any, n_classes: int, task: str) -> np.ndarray:
    """``(N, C)`` threshold of each row and class from a float, a per-class list, or a
    ``{fold: float | list}`` mapping (rows take their fold's threshold)."""

    def per_class(v: Any) -> np.ndarray:
        arr = np.atleast_1d(np.asarray(v, dtype=float))
        if arr.size == 1:
            return np.full(n_classes, float(arr[0]))
        if arr.size != n_classes:
            raise MedtlError(f"{arr.size} thresholds given for {n_classes} classes ({task})")
        return arr

    if isinstance(thresholds, dict):
        if "fold" not in df.columns:
            raise MedtlError("per-fold thresholds need a 'fold' column in the prediction table")
        table = {_fold_key(k): per_class(v) for k, v in thresholds.items()}
        folds = df["fold"].astype(int).to_numpy()
        missing = sorted(set(folds.tolist()) - set(table))
        if missing:
            raise MedtlError(
                f"fold(s) {missing} have no threshold; thresholds are given for folds "
                f"{sorted(table)}"
            )
        return np.stack([table[int(f)] for f in folds]) if len(folds) else np.zeros((0, n_classes))
    return np.tile(per_class(thresholds), (len(df), 1))


# ----------------------------------------------------------------------------- evaluation
def _ci_entry(value: Any, reps: np.ndarray | None, ci: float) -> dict[str, Any]:
    value = _num(value)
    if reps is None or value is None:
        return {"value": value, "low": None, "high": None, "skipped": 0}
    interval = percentile_ci(reps, ci)
    return {
        "value": value,
        "low": interval.low,
        "high": interval.high,
        "skipped": interval.n_skipped,
    }


def _mean_defined(values: list[Any]) -> float | None:
    """Macro average; undefined if any class's metric is undefined."""
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))


def _block(
    Y: np.ndarray,
    P: np.ndarray,
    T: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    task: str,
    n_boot: int,
    ci: float,
    seed: int,
    n_bins: int,
) -> dict[str, Any]:
    """Metrics of one set of rows (a fold, the pooled table or a subgroup)."""
    res = PatientResamples.draw(groups, n_boot, seed) if n_boot > 0 and len(Y) else None
    cols = [1] if task == "binary" else list(range(len(classes)))
    per_class: dict[str, Any] = {}
    point: dict[int, dict[str, Any]] = {}
    reps: dict[int, dict[str, np.ndarray]] = {}
    for c in cols:
        point[c] = binary_metrics(Y[:, c], P[:, c], T[:, c], n_bins)
        reps[c] = bootstrap_binary_metrics(Y[:, c], P[:, c], T[:, c], res, n_bins) if res else {}
        per_class[classes[c]] = {
            "n_pos": point[c]["n_pos"],
            "counts": {k: point[c][k] for k in COUNT_KEYS},
            "metrics": {m: _ci_entry(point[c][m], reps[c].get(m), ci) for m in BINARY_METRICS},
        }
    block: dict[str, Any] = {
        "n": int(len(Y)),
        "n_patients": int(len(set(groups.tolist()))),
    }
    if task == "binary":
        block["n_pos"] = point[1]["n_pos"]
        block["summary"] = per_class[classes[1]]["metrics"]
        block["counts"] = per_class[classes[1]]["counts"]
    else:
        summary = {}
        for m in BINARY_METRICS:
            value = _mean_defined([point[c][m] for c in cols])
            macro = np.mean([reps[c][m] for c in cols], axis=0) if res else None
            summary[m] = _ci_entry(value, macro, ci)
        if task == "multiclass":
            summary.update(_top1(Y, P, res, ci))
            y_idx, pred = Y.argmax(1), P.argmax(1)
            block["confusion"] = confusion_matrix(y_idx, pred, labels=cols).tolist()
        block["summary"] = summary
    block["per_class"] = per_class
    return block


def _top1(Y: np.ndarray, P: np.ndarray, res: PatientResamples | None, ci: float) -> dict:
    """Argmax accuracy and balanced accuracy (mean recall over the classes present)."""
    y_idx, pred = Y.argmax(1), P.argmax(1)
    acc = accuracy_score(y_idx, pred) if len(Y) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        bal = balanced_accuracy_score(y_idx, pred) if len(Y) else None
    acc_reps = bal_reps = None
    if res is not None:
        correct = (y_idx == pred).astype(float)
        cols = [correct, np.ones_like(correct)]
        for c in range(Y.shape[1]):
            cols += [correct * (y_idx == c), (y_idx == c).astype(float)]
        per_patient = _per_patient(res.codes, res.n_patients, *cols)
        S = np.concatenate([counts @ per_patient for _, counts in res.count_chunks(len(cols))])
        acc_reps = _ratio(S[:, 0], S[:, 1])
        recalls = np.stack([_ratio(S[:, 2 + 2 * c], S[:, 3 + 2 * c]) for c in range(Y.shape[1])], 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            bal_reps = np.nanmean(recalls, axis=1)
    return {
        "accuracy": _ci_entry(acc, acc_reps, ci),
        "balanced_accuracy": _ci_entry(bal, bal_reps, ci),
    }


def _fold_summary(
    folds: dict[str, dict], task: str, classes: list[str], ci: float = 0.95
) -> dict[str, Any]:
    """Mean, sample standard deviation and a t-interval on the mean across folds of each point
    estimate (the interval treats folds as independent, which they are not quite: it is a
    rough guide to fold-to-fold spread, the pooled patient bootstrap is the headline)."""
    from scipy import stats as st

    def stats(values: list[float | None]) -> dict[str, Any]:
        v = [x for x in values if x is not None]
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else None
        half = (
            float(st.t.ppf(0.5 + ci / 2, len(v) - 1)) * sd / np.sqrt(len(v))
            if sd is not None
            else None
        )
        mean = float(np.mean(v)) if v else None
        return {
            "mean": mean,
            "std": sd,
            "n_folds": len(v),
            "ci_low": mean - half if mean is not None and half is not None else None,
            "ci_high": mean + half if mean is not None and half is not None else None,
        }

    blocks = list(folds.values())
    metric_names = list(blocks[0]["summary"]) if blocks else []
    out: dict[str, Any] = {
        "summary": {m: stats([b["summary"][m]["value"] for b in blocks]) for m in metric_names}
    }
    if task != "binary":
        out["per_class"] = {
            c: {
                m: stats([b["per_class"][c]["metrics"][m]["value"] for b in blocks])
                for m in BINARY_METRICS
            }
            for c in classes
        }
    return out


def _subgroup_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
        return "(missing)"
    return str(v)


def evaluate(
    df: pd.DataFrame,
    classes: Sequence[str],
    task: str,
    thresholds: float | Sequence[float] | dict[Any, Any],
    *,
    patient_col: str = "patient_id",
    label_col: str = "label",
    label_separator: str = "|",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    subgroups: Sequence[str] = (),
    n_bins: int = 10,
) -> dict[str, Any]:
    """Per-fold, pooled and subgroup metrics with patient-bootstrap CIs (see module docstring).

    ``df`` has ``label``, ``patient_id``, one ``prob_<class>`` column per class, optionally
    ``fold`` and subgroup columns. ``thresholds``: a float, a per-class list, or
    ``{fold: float | list}``. Binary metrics are on the positive class ``classes[1]``;
    multiclass/multilabel give one-vs-rest metrics per class plus macro averages.

    Raises:
        ManifestError / MedtlError: unknown labels, missing columns, thresholds without folds.
    """
    look_up_option(task, TASKS, "task")
    classes = [str(c) for c in classes]
    if task == "binary" and len(classes) != 2:
        raise MedtlError(f"a binary task needs 2 classes (negative, positive), got {classes}")
    for col in (label_col, patient_col):
        if col not in df.columns:
            raise MedtlError(f"prediction table lacks column '{col}'; it has {list(df.columns)}")
    if df[patient_col].isna().any():
        raise MedtlError(f"{int(df[patient_col].isna().sum())} row(s) have no {patient_col}")
    Y = targets_from_labels(df[label_col], classes, task, label_separator)
    P = _probabilities(df, classes)
    T = row_thresholds(df, thresholds, len(classes), task)
    groups = df[patient_col].astype(str).to_numpy()

    def block(mask: np.ndarray, block_seed: int) -> dict[str, Any]:
        return _block(
            Y[mask], P[mask], T[mask], groups[mask], classes, task, n_boot, ci, block_seed, n_bins
        )

    everything = np.ones(len(df), dtype=bool)
    result: dict[str, Any] = {
        "task": task,
        "classes": classes,
        "summary_kind": (
            f"positive class '{classes[1]}'"
            if task == "binary"
            else f"macro average over {len(classes)} classes (one-vs-rest)"
            + (
                "; accuracy and balanced accuracy from the top class"
                if task == "multiclass"
                else ""
            )
        ),
        "n_images": int(len(df)),
        "n_patients": int(len(set(groups.tolist()))),
        "ci": ci,
        "n_boot": n_boot,
        "seed": seed,
        "pooled": block(everything, seed),
        "folds": {},
    }
    if "fold" in df.columns:
        fold_ids = df["fold"].astype(int).to_numpy()
        for k in sorted(set(fold_ids.tolist()) - {-1}):
            result["folds"][str(k)] = block(fold_ids == k, seed + 1 + k)
    if result["folds"]:
        result["fold_summary"] = _fold_summary(result["folds"], task, classes, ci)
    result["subgroups"], result["subgroups_missing"] = _subgroup_blocks(df, subgroups, block, seed)
    cal_cols = [1] if task == "binary" else range(len(classes))
    result["calibration"] = {
        classes[c]: reliability_curve(Y[:, c], P[:, c], n_bins) for c in cal_cols
    }
    result["notes"] = _evaluation_notes(result, n_boot)
    return result


def _subgroup_blocks(
    df: pd.DataFrame,
    subgroups: Sequence[str],
    block: Callable[[np.ndarray, int], dict[str, Any]],
    seed: int,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Metrics per value of each subgroup column, and the columns absent (or all missing)."""
    blocks: dict[str, dict[str, Any]] = {}
    missing = [s for s in subgroups if s not in df.columns]
    for col in subgroups:
        if col not in df.columns:
            continue
        values = df[col].map(_subgroup_value).to_numpy()
        if set(values.tolist()) == {"(missing)"}:
            missing.append(col)
            continue
        blocks[col] = {v: block(values == v, seed) for v in sorted(set(values.tolist()))}
    return blocks, missing


def _evaluation_notes(result: Mapping[str, Any], n_boot: int) -> list[str]:
    """Skipped bootstrap resamples and subgroups whose AUROC is undefined."""
    notes: list[str] = []
    for name, blk in [("pooled", result["pooled"])] + [
        (f"fold {k}", b) for k, b in result["folds"].items()
    ]:
        skipped = {m: e["skipped"] for m, e in blk["summary"].items() if e["skipped"]}
        if skipped:
            notes.append(
                f"{name}: bootstrap resamples skipped where a metric was undefined "
                f"(one class in the resample): {skipped} of {n_boot}"
            )
    for col, table in result["subgroups"].items():
        for v, blk in table.items():
            if blk["summary"]["auroc"]["value"] is None:
                notes.append(f"subgroup {col}={v}: AUROC undefined (only one class present)")
    return notes


def evaluate_predictions(
    df: pd.DataFrame, classes: Sequence[str], task: str, thresholds: Any, cfg: Any
) -> dict[str, Any]:
    """:func:`evaluate` with bootstrap, CI, subgroups and bins read from a ``PipelineConfig``."""
    return evaluate(
        df,
        classes,
        task,
        thresholds,
        n_boot=cfg.evaluation.bootstrap,
        ci=cfg.evaluation.ci,
        seed=cfg.seed,
        subgroups=list(cfg.evaluation.subgroups),
        n_bins=cfg.evaluation.calibration_bins,
    )
