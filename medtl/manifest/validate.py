"""Checks of a manifest before training: one function per check, a report and its summary."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from medtl.errors import UnreadableImageError
from medtl.manifest._shared import EXAMPLES, examples, iter_progress
from medtl.manifest.table import (
    IMAGE_COLUMN,
    PATH_COLUMN,
    Manifest,
    _is_missing,
    cell_strings,
    manifest_content_hash,
)


@dataclass(frozen=True)
class Issue:
    """One validation finding: a stable ``code``, a readable message and the rows involved."""

    code: str
    message: str
    rows: tuple[int, ...] = ()

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {"code": self.code, "message": self.message, "rows": list(self.rows)}


@dataclass
class ValidationReport:
    """What ``validate_manifest`` found: errors block training, warnings are worth a look."""

    errors: list[Issue]
    warnings: list[Issue]
    summary: dict
    content_hash: str | None
    source: str | None = None
    deep: bool = False

    @property
    def ok(self) -> bool:
        """True when there are no errors."""
        return not self.errors

    def codes(self) -> set[str]:
        """Codes of every error and warning (handy in tests and scripts)."""
        return {i.code for i in self.errors + self.warnings}

    def to_dict(self) -> dict:
        """JSON-safe form (``medtl manifest validate --json``)."""
        return {
            "source": self.source,
            "ok": self.ok,
            "deep": self.deep,
            "errors": [i.to_dict() for i in self.errors],
            "warnings": [i.to_dict() for i in self.warnings],
            "summary": self.summary,
            "content_hash": self.content_hash,
        }


def validate_manifest(
    manifest: Manifest,
    deep: bool = False,
    classes: Sequence[str] | None = None,
    progress: bool = False,
    min_patients_per_class: int = 5,
    label_separator: str = "|",
    hash_files: bool = True,
    check_files: bool = True,
) -> ValidationReport:
    """Check a manifest before training; never raises for data problems, reports them.

    Errors: empty manifest, missing label or patient id, a line break or other control
    character in an image path (a quoted newline in the export), missing file or empty
    folder, an image listed twice, a label not in ``classes``, a patient in several folds or in
    both train and test, and (``deep``) a file that cannot be decoded, with the reason, and
    identical decoded pixels under two patients (a leak between folds).
    Warnings: a patient with different labels, a class with fewer than
    ``min_patients_per_class`` patients, a class in ``classes`` with no image, and (``deep``)
    identical decoded pixels under two paths of one patient (a duplicate).

    Args:
        manifest: from :func:`read_manifest`.
        deep: decode every image with ``medtl.io.load_image`` (slow; finds corrupt files and
            copies of one image, re-encoded ones included: see ``medtl.io.pixel_sha256``).
        classes: allowed labels; None accepts any.
        progress: show a progress bar for the deep pass.
        min_patients_per_class: below this a class gets a warning (5 = one per CV fold).
        label_separator: separator of multi-label cells.
        hash_files: include file bytes in ``content_hash`` (see :func:`manifest_content_hash`).
        check_files: False checks the table alone: no file is looked at (no existence check,
            no ``deep`` decode, no file bytes in the hash), e.g. away from the images.
    """
    source = str(manifest.source) if manifest.source else None
    if manifest.df.empty:
        empty = Issue("empty", f"manifest {source or ''} has no rows".replace("  ", " "))
        return ValidationReport([empty], [], {"images": 0}, None, source, deep)
    has_labels = manifest.label_column in manifest.df.columns
    class_set = set(classes) if classes is not None else None
    per_row = _labels_per_row(manifest, class_set, label_separator) if has_labels else []

    errors = _check_missing_values(manifest, has_labels)
    bad_paths = _rows_with_control_characters(manifest)
    errors += _check_path_characters(manifest, bad_paths)
    if check_files:
        exists, missing, empty_dirs = _locate_files(manifest, bad_paths)
        errors += _check_files(manifest, missing, empty_dirs)
    errors += _check_duplicates(manifest, has_labels)
    warnings: list[Issue] = []
    if has_labels and class_set is not None:
        errors += _check_unknown_labels(manifest, per_row, class_set)
        warnings += _check_absent_classes(per_row, class_set)
    if has_labels:
        warnings += _check_patient_label_conflicts(manifest)
    errors += _check_patient_in_several_folds(manifest)
    errors += _check_patient_in_train_and_test(manifest)
    if deep and check_files:
        digests, unreadable = _decode_all(manifest, exists, progress)
        errors += unreadable
        across, within = _check_same_pixels(manifest, digests)
        errors += across
        warnings += within

    lab = manifest.label_column if has_labels else None
    summary = _summary(manifest.df, manifest.patient_column, lab, per_row)
    if has_labels:
        warnings += _check_rare_classes(summary, min_patients_per_class)
    content_hash = manifest_content_hash(manifest, include_files=hash_files and check_files)
    return ValidationReport(errors, warnings, summary, content_hash, source, deep)


# ---------------------------------------------------------------------------- checks
def _rows_where(mask: pd.Series) -> tuple[int, ...]:
    """Positions of the True cells of ``mask``."""
    return tuple(int(i) for i in np.flatnonzero(mask.to_numpy()))


def _patients_with(manifest: Manifest, patients: Sequence[Any]) -> tuple[int, ...]:
    """Rows of any of ``patients``."""
    return _rows_where(manifest.df[manifest.patient_column].isin(patients))


def _shown(value: Any) -> str:
    """A cell value quoted for a one-line message: line breaks and tabs shown as ``\\n``."""
    return "'" + _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value)) + "'"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # C0 control characters and DEL


def _some(rows: Sequence[int], describe: Callable[[int], str]) -> str:
    """The first few ``rows`` described (only those are formatted), with a count of the rest."""
    shown = ", ".join(describe(i) for i in rows[:EXAMPLES])
    return shown + (f", ... ({len(rows) - EXAMPLES} more)" if len(rows) > EXAMPLES else "")


def _check_missing_values(manifest: Manifest, has_labels: bool) -> list[Issue]:
    """Rows with an empty image, patient id or (when present) label cannot be trained on."""
    df = manifest.df
    required = [(IMAGE_COLUMN, "missing_image"), (manifest.patient_column, "missing_patient")]
    if has_labels:
        required.append((manifest.label_column, "missing_label"))
    issues = []
    for col, code in required:
        rows = _rows_where(df[col].isna())
        if rows:
            issues.append(
                Issue(
                    code,
                    f"{len(rows)} row(s) have an empty cell in column '{col}': "
                    f"{_some(rows, manifest.where)}; fill them or remove the rows",
                    rows,
                )
            )
    return issues


def _rows_with_control_characters(manifest: Manifest) -> tuple[int, ...]:
    """Rows whose image path holds a line break, tab or other control character."""
    # The cells' own strings, a block at a time: Arrow's regex on a str copy of the column
    # held memory per row that Arrow does not give back.
    text = cell_strings(manifest.df[IMAGE_COLUMN])
    rows: list[int] = []
    for start in range(0, len(text), _CELLS_PER_SCAN):
        block = text[start : start + _CELLS_PER_SCAN]
        if _CONTROL.search("".join(block)):  # usually none: one scan of the whole block
            rows += [start + j for j, v in enumerate(block) if _CONTROL.search(v)]
    return tuple(rows)


_CELLS_PER_SCAN = 4096


def _check_path_characters(manifest: Manifest, rows: Sequence[int]) -> list[Issue]:
    """A path with a line break comes from a quoted newline in the export: no file has that
    name, so say so instead of reporting a file that is merely missing."""
    if not rows:
        return []
    df = manifest.df

    def describe(i: int) -> str:
        return f"{manifest.cell(i, IMAGE_COLUMN)} holds {_shown(df[IMAGE_COLUMN].iat[i])}"

    message = (
        f"{len(rows)} image path(s) contain a line break or other control character (a "
        f"quoted line break in the export; no file has such a name): {_some(rows, describe)}; "
        "remove it from the cell"
    )
    return [Issue("path_control_character", message, tuple(rows))]


def _locate_files(
    manifest: Manifest, skip: Sequence[int] = ()
) -> tuple[npt.NDArray[np.bool_], list[int], list[int]]:
    """Which rows' images exist on disk, and the rows whose file is missing or folder empty;
    rows in ``skip`` (already reported) are neither looked at nor counted as present."""
    df = manifest.df
    exists = np.zeros(len(df), bool)
    missing: list[int] = []
    empty_dirs: list[int] = []
    skipped = set(skip)
    for i, (img, path) in enumerate(zip(df[IMAGE_COLUMN], df[PATH_COLUMN], strict=True)):
        if _is_missing(img) or i in skipped:
            continue
        try:
            mode = os.stat(path).st_mode  # one stat per row: this loop is the cost of the check
        except (OSError, ValueError):  # ValueError: a NUL byte in the path
            missing.append(i)
            continue
        if stat.S_ISDIR(mode):
            if any(q.is_file() for q in Path(path).iterdir()):
                exists[i] = True
            else:
                empty_dirs.append(i)
        elif stat.S_ISREG(mode):
            exists[i] = True
        else:
            missing.append(i)
    return exists, missing, empty_dirs


def _check_files(manifest: Manifest, missing: list[int], empty_dirs: list[int]) -> list[Issue]:
    """Images that are not on disk, and series folders without files, cannot be loaded."""
    df = manifest.df
    issues = []

    def describe(i: int) -> str:
        return f"{_shown(df[IMAGE_COLUMN].iat[i])} at {manifest.where(i)}"

    if missing:
        issues.append(
            Issue(
                "missing_file",
                f"{len(missing)} image file(s) in column '{IMAGE_COLUMN}' not found (relative "
                f"paths are resolved against {manifest.root}): {_some(missing, describe)}",
                tuple(missing),
            )
        )
    if empty_dirs:
        issues.append(
            Issue(
                "empty_folder",
                f"series folder(s) with no files: {_some(empty_dirs, describe)}",
                tuple(empty_dirs),
            )
        )
    return issues


def _check_duplicates(manifest: Manifest, has_labels: bool) -> list[Issue]:
    """The same image listed more than once would be counted (and maybe split) twice."""
    df, lab = manifest.df, manifest.label_column
    # The paths as Python strings, hashed by pandas: Arrow's hashing of the str column held
    # about 0.3 kB a row that Arrow does not give back.
    paths = df[PATH_COLUMN].to_numpy(dtype=object)
    dup_mask = pd.Series(paths, dtype=object).duplicated(keep=False).to_numpy()
    dup_mask = dup_mask & paths.astype(bool)
    if not dup_mask.any():
        return []
    positions = np.flatnonzero(dup_mask)
    dup_paths = pd.Series(paths[positions], dtype=object)
    groups = dup_paths.groupby(dup_paths, sort=True).indices  # path -> positions
    described = []
    for path in list(groups)[:EXAMPLES]:  # only the groups the message shows are described
        rows = positions[groups[path]]
        differ = has_labels and df[lab].iloc[rows].nunique(dropna=False) > 1
        described.append(
            f"{_shown(df[IMAGE_COLUMN].iat[rows[0]])} on "
            + ", ".join(manifest.where(int(i)) for i in rows)
            + (" with different labels" if differ else "")
        )
    more = len(groups) - len(described)
    message = (
        f"{len(groups)} image(s) listed more than once in column '{IMAGE_COLUMN}': "
        + "; ".join(described)
        + (f"; ... ({more} more)" if more else "")
        + "; keep one row per image"
    )
    return [Issue("duplicate", message, tuple(int(i) for i in positions))]


def _split_labels(value: str, classes: set[str] | None, sep: str) -> list[str]:
    """Labels of one cell: the cell itself if it is a class, else its ``sep`` parts."""
    if (classes is not None and value in classes) or sep not in value:
        return [value]
    return [part.strip() for part in value.split(sep) if part.strip()]


def _labels_per_row(manifest: Manifest, classes: set[str] | None, sep: str) -> list[list[str]]:
    """The labels of every row (none for an empty cell), multi-label cells split on ``sep``;
    rows with the same cell share one (read-only) list."""
    codes, uniques = pd.factorize(manifest.df[manifest.label_column], use_na_sentinel=True)
    parts = [_split_labels(str(v), classes, sep) for v in uniques]  # once per distinct cell
    none: list[str] = []
    return [parts[c] if c >= 0 else none for c in codes.tolist()]


def _check_unknown_labels(
    manifest: Manifest, per_row: list[list[str]], classes: set[str]
) -> list[Issue]:
    """A label outside ``classes`` is a typo or a wrong ``data.classes``."""
    bad = [i for i, ls in enumerate(per_row) if any(x not in classes for x in ls)]
    if not bad:
        return []
    unknown = sorted({x for i in bad for x in per_row[i] if x not in classes})
    message = (
        f"{len(bad)} row(s) have label(s) {examples([repr(u) for u in unknown])} in column "
        f"'{manifest.label_column}' not in the classes {sorted(classes)} "
        f"({_some(bad, manifest.where)}); fix the labels or data.classes"
    )
    return [Issue("unknown_label", message, tuple(bad))]


def _check_absent_classes(per_row: list[list[str]], classes: set[str]) -> list[Issue]:
    """A class with no image cannot be learnt or evaluated."""
    absent = sorted(classes - {x for ls in per_row for x in ls})
    if not absent:
        return []
    return [Issue("absent_class", f"class(es) {absent} have no image in this manifest")]


def _check_patient_label_conflicts(manifest: Manifest) -> list[Issue]:
    """A patient whose images have different labels is worth a look (fine across studies)."""
    df, lab, pat = manifest.df, manifest.label_column, manifest.patient_column
    conflicted = _patients_with_several(df[pat], df[lab])
    if not conflicted:
        return []
    message = (
        f"{len(conflicted)} patient(s) have images with different labels (fine for "
        f"different studies; check if unexpected): {examples(conflicted)}"
    )
    return [Issue("patient_label_conflict", message, _patients_with(manifest, conflicted))]


def _check_patient_in_several_folds(manifest: Manifest) -> list[Issue]:
    """A patient in several CV folds leaks between training and validation."""
    df, pat = manifest.df, manifest.patient_column
    if "fold" not in df.columns:
        return []
    leaking = _patients_with_several(df[pat], df["fold"])
    if not leaking:
        return []
    message = (
        f"{len(leaking)} patient(s) appear in several folds (leakage between "
        f"training and validation): {examples(leaking)}; assign folds per patient"
    )
    return [Issue("patient_in_several_folds", message, _patients_with(manifest, leaking))]


def _patients_with_several(patients: pd.Series, values: pd.Series) -> list[Any]:
    """The patients, sorted, whose rows hold more than one distinct non-empty ``values``.

    Integer codes of both columns, not a groupby of their values (which held about 0.2 kB
    a row while it ran)."""
    patient_codes, distinct_patients = pd.factorize(patients)  # -1: no patient
    value_codes, distinct_values = pd.factorize(values)  # -1: empty cell
    known = (patient_codes >= 0) & (value_codes >= 0)
    n_values = max(len(distinct_values), 1)
    pairs = np.unique(patient_codes[known].astype(np.int64) * n_values + value_codes[known])
    per_patient = np.bincount(pairs // n_values, minlength=len(distinct_patients))
    return sorted(distinct_patients[per_patient > 1])


def _check_patient_in_train_and_test(manifest: Manifest) -> list[Issue]:
    """A patient both in split 'test' and outside it leaks into the held-out test."""
    df, pat = manifest.df, manifest.patient_column
    if "split" not in df.columns:
        return []
    split_codes, splits = pd.factorize(df["split"])  # a few distinct values; -1: empty
    is_test = np.array([str(v).lower() == "test" for v in splits] + [False])[split_codes]
    patient_codes, patients = pd.factorize(df[pat])  # -1: no patient
    in_test = np.zeros(len(patients), dtype=bool)
    in_rest = np.zeros(len(patients), dtype=bool)
    in_test[patient_codes[(patient_codes >= 0) & is_test]] = True
    in_rest[patient_codes[(patient_codes >= 0) & ~is_test]] = True
    both = sorted(patients[in_test & in_rest])
    if not both:
        return []
    message = (
        f"{len(both)} patient(s) have images both in split 'test' and outside it: "
        f"{examples(both)}; split per patient"
    )
    return [Issue("patient_in_train_and_test", message, _patients_with(manifest, both))]


def _decode_all(
    manifest: Manifest, exists: npt.NDArray[np.bool_], progress: bool
) -> tuple[dict[int, str], list[Issue]]:
    """Decode every existing image once: corrupt files otherwise surface mid-training.

    Returns the pixel sha256 of each decoded row and the ``unreadable`` issue (if any).
    """
    from medtl.io import load_image, pixel_sha256  # lazy: decoding plugins are heavy to import

    df = manifest.df
    rows_of: dict[str, list[int]] = {}
    for i in range(len(df)):
        if exists[i]:
            rows_of.setdefault(str(df[PATH_COLUMN].iat[i]), []).append(i)
    digests: dict[int, str] = {}
    unreadable: list[tuple[int, str]] = []
    for path in iter_progress(list(rows_of), "decoding images", progress):
        try:
            digest = pixel_sha256(load_image(path))
        except UnreadableImageError as err:
            unreadable += [(i, err.reason) for i in rows_of[path]]
        except Exception as err:  # a decoder bug must not hide the other files
            unreadable += [(i, f"{type(err).__name__}: {err}") for i in rows_of[path]]
        else:
            digests.update(dict.fromkeys(rows_of[path], digest))
    if not unreadable:
        return digests, []
    unreadable.sort()
    described = [
        f"{_shown(df[IMAGE_COLUMN].iat[i])} ({manifest.where(i)}): {reason}"
        for i, reason in unreadable[:EXAMPLES]
    ]
    more = len(unreadable) - len(described)
    message = f"{len(unreadable)} image(s) cannot be decoded: {'; '.join(described)}" + (
        f"; ... ({more} more)" if more else ""
    )
    return digests, [Issue("unreadable", message, tuple(i for i, _ in unreadable))]


def _check_same_pixels(
    manifest: Manifest, digests: dict[int, str]
) -> tuple[list[Issue], list[Issue]]:
    """Identical decoded pixels at different paths: under two patients it is an error (the
    copies can land in different folds: a leak), under one patient a warning (a duplicate).

    A path listed on several rows is one image here (``_check_duplicates`` reports those).
    """
    df, pat = manifest.df, manifest.patient_column
    paths_of: dict[str, dict[str, int]] = {}  # digest -> {path: first row}
    for i, digest in sorted(digests.items()):
        paths_of.setdefault(digest, {}).setdefault(str(df[PATH_COLUMN].iat[i]), i)
    across: list[tuple[int, ...]] = []
    within: list[tuple[int, ...]] = []
    for first_rows in paths_of.values():
        if len(first_rows) < 2:
            continue
        rows = tuple(sorted(first_rows.values()))
        owners = {str(df[pat].iat[i]) for i in rows if not _is_missing(df[pat].iat[i])}
        (across if len(owners) > 1 else within).append(rows)

    def describe(rows: tuple[int, ...]) -> str:
        return " = ".join(
            f"{_shown(df[IMAGE_COLUMN].iat[i])} (patient {_shown(df[pat].iat[i])}, "
            f"{manifest.where(i)})"
            for i in rows
        )

    errors, warnings = [], []
    if across:
        patients = sorted(
            {str(df[pat].iat[i]) for r in across for i in r if not _is_missing(df[pat].iat[i])}
        )
        message = (
            f"{len(across)} image(s) have identical pixels under different patients "
            f"({len(patients)} patients: {examples(patients)}), so copies can be split across "
            f"folds (leakage): {examples([describe(r) for r in across])}. Keep one copy, "
            "under the patient it belongs to"
        )
        errors.append(Issue("same_pixels_across_patients", message, _flat(across)))
    if within:
        message = (
            f"{len(within)} image(s) have identical pixels at several paths of one patient "
            f"(duplicates, counted twice in metrics): "
            f"{examples([describe(r) for r in within])}; keep one copy"
        )
        warnings.append(Issue("same_pixels_same_patient", message, _flat(within)))
    return errors, warnings


def _flat(groups: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The rows of several groups, sorted."""
    return tuple(sorted(i for rows in groups for i in rows))


def _check_rare_classes(summary: dict, min_patients_per_class: int) -> list[Issue]:
    """A class with fewer patients than CV folds leaves some folds without it."""
    return [
        Issue(
            "rare_class",
            f"class '{cls}' has only {n_pat} patient(s) "
            f"({summary['class_counts'][cls]} image(s)); patient-grouped "
            f"{min_patients_per_class}-fold CV needs at least {min_patients_per_class}",
        )
        for cls, n_pat in summary["patients_per_class"].items()
        if n_pat < min_patients_per_class
    ]


# ---------------------------------------------------------------------------- summary
def _summary(df: pd.DataFrame, pat: str, lab: str | None, per_row: list[list[str]]) -> dict:
    """Counts a reviewer wants before training: classes, patients, images per patient, sites."""
    per_patient = df[pat].value_counts(dropna=True)  # images of each patient
    out: dict[str, Any] = {
        "images": int(len(df)),
        "patients": int(per_patient.size),
        "images_per_patient": {
            "min": int(per_patient.min()) if len(per_patient) else 0,
            "median": float(per_patient.median()) if len(per_patient) else 0.0,
            "max": int(per_patient.max()) if len(per_patient) else 0,
        },
    }
    if lab is not None:
        out.update(_class_summary(df[pat], per_row))
    if "study_id" in df.columns:
        out["studies"] = int(df["study_id"].nunique())
    if "site" in df.columns:
        out["sites"] = {
            str(k): int(v) for k, v in df["site"].value_counts(sort=False).sort_index().items()
        }
    return out


def _class_summary(patients: pd.Series, per_row: list[list[str]]) -> dict[str, dict[str, int]]:
    """Images and distinct patients per class, classes sorted by name."""
    # Integer codes for the (label, patient) pairs: a frame of their strings, grouped,
    # held about 0.2 kB a row of Arrow memory.
    names = sorted({x for labels in per_row for x in labels})
    index = {x: k for k, x in enumerate(names)}
    lengths = np.fromiter(map(len, per_row), dtype=np.intp, count=len(per_row))
    label_of = np.fromiter(
        (index[x] for labels in per_row for x in labels), dtype=np.intp, count=int(lengths.sum())
    )
    patient_codes, distinct_patients = pd.factorize(patients)  # -1: no patient
    patient_of = patient_codes[np.repeat(np.arange(len(per_row)), lengths)]
    known = patient_of >= 0
    n_pat = max(len(distinct_patients), 1)
    label_patient = np.unique(label_of[known] * n_pat + patient_of[known])
    counts = np.bincount(label_of, minlength=len(names))
    n_patients = np.bincount(label_patient // n_pat, minlength=len(names))
    return {
        "class_counts": {x: int(counts[k]) for k, x in enumerate(names)},
        "patients_per_class": {x: int(n_patients[k]) for k, x in enumerate(names)},
    }


def render_summary(report: ValidationReport) -> Any:
    """A rich Table of the summary, the error/warning counts and the content hash."""
    from rich.table import Table

    s = report.summary
    title = f"manifest {report.source}" if report.source else "manifest"
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    table.add_row("images", str(s.get("images", 0)))
    table.add_row("patients", str(s.get("patients", 0)))
    if "studies" in s:
        table.add_row("studies", str(s["studies"]))
    ipp = s.get("images_per_patient")
    if ipp:
        table.add_row(
            "images per patient", f"min {ipp['min']}, median {ipp['median']:g}, max {ipp['max']}"
        )
    for cls, n in s.get("class_counts", {}).items():
        table.add_row(f"class '{cls}'", f"{n} images, {s['patients_per_class'][cls]} patients")
    for site, n in s.get("sites", {}).items():
        table.add_row(f"site '{site}'", f"{n} images")
    status = "[green]ok[/green]" if report.ok else f"[red]{len(report.errors)} error(s)[/red]"
    table.add_row("status", f"{status}, {len(report.warnings)} warning(s)")
    table.add_row("content hash", report.content_hash or "-")
    return table
