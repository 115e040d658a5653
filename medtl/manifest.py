"""Manifests: read, write and validate them, hash their content, and build them from DICOM exports.

A manifest is a CSV or Parquet table, one row per image (schema: ``data_manifests/README.md``):
``image`` (a DICOM file, a DICOM series folder, NIfTI or PNG/JPEG; relative to the
manifest's folder or absolute), ``label`` and ``patient_id``; optional ``study_id``,
``site``, ``fold``, ``split``; any other column is kept (subgroups, notes).

``scan_dicom_dir`` turns a hospital DICOM export plus a labels CSV into such a manifest,
reading headers only and writing salted pseudonyms instead of identifiers
(``medtl.deid``): no name, MRN, date, accession number, institution or UID reaches it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtl.deid import (
    JOIN_KEYS,
    identifying_values,
    is_identifying_column,
    load_salt,
    pseudonymize,
)
from medtl.errors import ManifestError, UnreadableImageError, look_up_option

__all__ = [
    "IMAGE_COLUMN",
    "Manifest",
    "Issue",
    "ValidationReport",
    "ScanResult",
    "read_manifest",
    "write_manifest",
    "validate_manifest",
    "manifest_content_hash",
    "render_summary",
    "scan_dicom_dir",
]

IMAGE_COLUMN = "image"
PATH_COLUMN = "path"  # added by read_manifest: the absolute path of ``image``
OPTIONAL_COLUMNS = ("study_id", "site", "fold", "split")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
_EXAMPLES = 5  # values quoted in one error message before "..."


# ---------------------------------------------------------------------------- reading
@dataclass
class Manifest:
    """A manifest table plus where it came from; ``df[PATH_COLUMN]`` holds absolute paths."""

    df: pd.DataFrame
    root: Path
    source: Path | None = None
    label_column: str = "label"
    patient_column: str = "patient_id"

    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        root: str | Path,
        label_column: str = "label",
        patient_column: str = "patient_id",
        require_label: bool = True,
        source: str | Path | None = None,
    ) -> Manifest:
        """Check the required columns of ``df`` and resolve ``image`` against ``root``."""
        where = f"manifest {source}" if source else "manifest"
        required = [IMAGE_COLUMN, patient_column] + ([label_column] if require_label else [])
        for col in required:
            if col not in df.columns:
                hint = {
                    label_column: " (choose another with data.label_column / --label-column)",
                    patient_column: " (choose another with data.patient_column)",
                }.get(col, "")
                raise ManifestError(
                    f"{where} has no column '{col}'{hint}. Columns present: "
                    f"{', '.join(map(str, df.columns)) or '(none)'}. Required: "
                    f"{', '.join(required)}; see data_manifests/README.md."
                )
        df = df.reset_index(drop=True).copy()
        text_cols = [IMAGE_COLUMN, label_column, patient_column, "study_id", "site", "split"]
        for col in text_cols:
            if col in df.columns:
                df[col] = _as_text(df[col])
        if "fold" in df.columns:
            folds = pd.to_numeric(df["fold"], errors="coerce")
            if folds.notna().all() and (folds == folds.round()).all():
                df["fold"] = folds.astype("int64")
        root = Path(root).resolve()
        df[PATH_COLUMN] = [
            "" if pd.isna(v) else str(root / v) if not Path(v).is_absolute() else str(Path(v))
            for v in df[IMAGE_COLUMN]
        ]
        return cls(
            df=df,
            root=root,
            source=Path(source) if source else None,
            label_column=label_column,
            patient_column=patient_column,
        )

    def where(self, row: int) -> str:
        """Human location of a row: the CSV line number (header is line 1) or the row index."""
        if self.source is not None and self.source.suffix.lower() in (".csv", ".tsv"):
            return f"line {row + 2}"
        return f"row {row}"


def _as_text(col: pd.Series) -> pd.Series:
    """Strings with surrounding blanks removed; empty cells become NA (ids keep leading 0s)."""
    out = col.map(lambda v: np.nan if _is_missing(v) else str(v).strip())
    return out.map(lambda v: np.nan if isinstance(v, str) and v == "" else v).astype(object)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT


def _read_table(path: Path, text_columns: Sequence[str]) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        dtype = dict.fromkeys(text_columns, str)
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=dtype)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    raise ManifestError(
        f"cannot read manifest {path}: unknown suffix '{suffix}'. Valid: "
        f"{', '.join(TABLE_SUFFIXES)}."
    )


def read_manifest(
    path: str | Path,
    label_column: str = "label",
    patient_column: str = "patient_id",
    require_label: bool = True,
) -> Manifest:
    """Read a CSV/Parquet manifest; relative ``image`` paths are resolved against its folder.

    Args:
        path: the manifest file.
        label_column: the column with labels (multi-label cells: ``a|b``).
        patient_column: the column that groups images by patient.
        require_label: False for prediction manifests that have no labels.

    Raises:
        ManifestError: the file is missing or unreadable, or a required column is absent
            (the message lists the columns present).
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest {p} does not exist (or is not a file)")
    text_cols = [IMAGE_COLUMN, label_column, patient_column, "study_id", "site", "split"]
    try:
        df = _read_table(p, text_cols)
    except ManifestError:
        raise
    except Exception as err:  # pandas/pyarrow raise many types for malformed files
        raise ManifestError(f"cannot read manifest {p}: {type(err).__name__}: {err}") from err
    return Manifest.from_dataframe(
        df,
        p.resolve().parent,
        label_column=label_column,
        patient_column=patient_column,
        require_label=require_label,
        source=p,
    )


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest as CSV or Parquet (by suffix), without the derived ``path`` column."""
    p = Path(path)
    suffix = p.suffix.lower()
    look_up_option(suffix, TABLE_SUFFIXES, "manifest suffix")
    p.parent.mkdir(parents=True, exist_ok=True)
    out = df.drop(columns=[PATH_COLUMN], errors="ignore")
    if suffix in (".parquet", ".pq"):
        out.to_parquet(p, index=False)
    else:
        out.to_csv(p, index=False, sep="\t" if suffix == ".tsv" else ",")
    return p


# ---------------------------------------------------------------------------- hashing
def _cell(v: Any) -> str:
    if _is_missing(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _file_digest(path: Path) -> str:
    # The same digest as medtl.models.weights.sha256_file, without importing torch here.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _path_digest(path: Path) -> str:
    """sha256 of a file's bytes; of a folder: of its sorted member names and their digests."""
    if path.is_file():
        return _file_digest(path)
    if path.is_dir():
        h = hashlib.sha256()
        members = sorted(p for p in path.rglob("*") if p.is_file())
        for member in members:
            h.update(member.relative_to(path).as_posix().encode() + b"\0")
            h.update(_file_digest(member).encode() + b"\n")
        return "dir:" + h.hexdigest()
    return "missing"


def manifest_content_hash(manifest: Manifest, include_files: bool = True) -> str:
    """The data's identity for lineage: sha256 over the sorted rows and every referenced file.

    Rows are canonicalised (columns sorted by name, cells as text, rows sorted) so row order
    and CSV vs Parquet do not matter; absolute paths are not hashed, so moving the dataset
    with its manifest keeps the hash. With ``include_files`` every referenced file is read
    once (folders: all member files): cost is one full read of the data, about a minute
    per ~50 GB on a local SSD. ``include_files=False`` hashes the table alone.
    """
    df = manifest.df.drop(columns=[PATH_COLUMN], errors="ignore")
    cols = sorted(map(str, df.columns))
    h = hashlib.sha256()
    h.update(json.dumps(cols).encode())
    rows = sorted(
        json.dumps([_cell(v) for v in row], ensure_ascii=False)
        for row in df[cols].itertuples(index=False, name=None)
    )
    for r in rows:
        h.update(r.encode() + b"\n")
    if include_files:
        pairs = sorted(
            {
                (_cell(img), path)
                for img, path in zip(df[IMAGE_COLUMN], manifest.df[PATH_COLUMN], strict=True)
            }
        )
        for img, path in pairs:
            h.update(img.encode() + b"\0")
            h.update((_path_digest(Path(path)) if path else "missing").encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------- validation
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


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_EXAMPLES])
    return shown + (f", ... ({len(items) - _EXAMPLES} more)" if len(items) > _EXAMPLES else "")


def _split_labels(value: str, classes: set[str] | None, sep: str) -> list[str]:
    """Labels of one cell: the cell itself if it is a class, else its ``sep`` parts."""
    if (classes is not None and value in classes) or sep not in value:
        return [value]
    return [part.strip() for part in value.split(sep) if part.strip()]


def _iter_progress(items: Sequence, description: str, enabled: bool) -> Iterator:
    if not enabled or not sys.stdout.isatty():  # live bars only on a terminal
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, transient=True)


def validate_manifest(
    manifest: Manifest,
    deep: bool = False,
    classes: Sequence[str] | None = None,
    progress: bool = False,
    min_patients_per_class: int = 5,
    label_separator: str = "|",
    hash_files: bool = True,
) -> ValidationReport:
    """Check a manifest before training; never raises for data problems, reports them.

    Errors: empty manifest, missing label or patient id, missing file or empty folder,
    an image listed twice, a label not in ``classes``, a patient in several folds or in
    both train and test, and (``deep``) a file that cannot be decoded, with the reason.
    Warnings: a patient with different labels, a class with fewer than
    ``min_patients_per_class`` patients, a class in ``classes`` with no image.

    Args:
        manifest: from :func:`read_manifest`.
        deep: decode every image with ``medtl.io.load_image`` (slow; finds corrupt files).
        classes: allowed labels; None accepts any.
        progress: show a progress bar for the deep pass.
        min_patients_per_class: below this a class gets a warning (5 = one per CV fold).
        label_separator: separator of multi-label cells.
        hash_files: include file bytes in ``content_hash`` (see :func:`manifest_content_hash`).
    """
    df = manifest.df
    lab, pat = manifest.label_column, manifest.patient_column
    errors: list[Issue] = []
    warnings: list[Issue] = []
    source = str(manifest.source) if manifest.source else None
    if df.empty:
        errors.append(Issue("empty", f"manifest {source or ''} has no rows".replace("  ", " ")))
        return ValidationReport(errors, warnings, {"images": 0}, None, source, deep)

    def rows_where(mask: pd.Series) -> tuple[int, ...]:
        return tuple(int(i) for i in np.flatnonzero(mask.to_numpy()))

    has_labels = lab in df.columns
    # Missing values in required columns.
    for col, code in ((IMAGE_COLUMN, "missing_image"), (pat, "missing_patient")) + (
        ((lab, "missing_label"),) if has_labels else ()
    ):
        rows = rows_where(df[col].isna())
        if rows:
            errors.append(
                Issue(
                    code,
                    f"{len(rows)} row(s) have an empty '{col}' "
                    f"({_examples([manifest.where(r) for r in rows])}); fill them or remove the rows",
                    rows,
                )
            )
    # Files on disk.
    exists = np.ones(len(df), bool)
    missing, empty_dirs = [], []
    for i, (img, path) in enumerate(zip(df[IMAGE_COLUMN], df[PATH_COLUMN], strict=True)):
        if _is_missing(img):
            exists[i] = False
            continue
        p = Path(path)
        if p.is_dir():
            if not any(q.is_file() for q in p.iterdir()):
                empty_dirs.append(i)
                exists[i] = False
        elif not p.is_file():
            missing.append(i)
            exists[i] = False
    if missing:
        names = [f"'{df[IMAGE_COLUMN].iat[i]}' ({manifest.where(i)})" for i in missing]
        errors.append(
            Issue(
                "missing_file",
                f"{len(missing)} image file(s) not found (relative paths are resolved "
                f"against {manifest.root}): {_examples(names)}",
                tuple(missing),
            )
        )
    if empty_dirs:
        names = [f"'{df[IMAGE_COLUMN].iat[i]}'" for i in empty_dirs]
        errors.append(
            Issue(
                "empty_folder",
                f"series folder(s) with no files: {_examples(names)}",
                tuple(empty_dirs),
            )
        )
    # Duplicates: the same image listed more than once.
    dup_mask = df[PATH_COLUMN].duplicated(keep=False) & df[PATH_COLUMN].astype(bool)
    if dup_mask.any():
        groups = df[dup_mask].groupby(PATH_COLUMN, sort=True)
        described = []
        for _, g in groups:
            differ = has_labels and g[lab].nunique(dropna=False) > 1
            lines = ", ".join(manifest.where(int(i)) for i in g.index)
            described.append(
                f"'{g[IMAGE_COLUMN].iat[0]}' on {lines}"
                + (" with different labels" if differ else "")
            )
        errors.append(
            Issue(
                "duplicate",
                f"{len(described)} image(s) listed more than once: {_examples(described)}; keep "
                "one row per image",
                rows_where(dup_mask),
            )
        )
    # Labels.
    class_set = set(classes) if classes is not None else None
    per_row: list[list[str]] = []
    if has_labels:
        per_row = [
            [] if _is_missing(v) else _split_labels(str(v), class_set, label_separator)
            for v in df[lab]
        ]
        if class_set is not None:
            bad = [i for i, ls in enumerate(per_row) if any(x not in class_set for x in ls)]
            if bad:
                unknown = sorted({x for i in bad for x in per_row[i] if x not in class_set})
                errors.append(
                    Issue(
                        "unknown_label",
                        f"{len(bad)} row(s) have label(s) {_examples([repr(u) for u in unknown])} "
                        f"not in the classes {sorted(class_set)} "
                        f"({_examples([manifest.where(i) for i in bad])}); fix the labels or "
                        "data.classes",
                        tuple(bad),
                    )
                )
            absent = sorted(class_set - {x for ls in per_row for x in ls})
            if absent:
                warnings.append(
                    Issue("absent_class", f"class(es) {absent} have no image in this manifest")
                )
    # Patient-level checks.
    valid_pat = df[pat].notna()
    if has_labels:
        labelled = df[valid_pat & df[lab].notna()]
        n_labels = labelled.groupby(pat)[lab].nunique()
        conflicted = sorted(n_labels[n_labels > 1].index)
        if conflicted:
            rows = rows_where(df[pat].isin(conflicted))
            warnings.append(
                Issue(
                    "patient_label_conflict",
                    f"{len(conflicted)} patient(s) have images with different labels (fine for "
                    f"different studies; check if unexpected): {_examples(conflicted)}",
                    rows,
                )
            )
    if "fold" in df.columns:
        spread = df[valid_pat].groupby(pat)["fold"].nunique()
        leaking = sorted(spread[spread > 1].index)
        if leaking:
            errors.append(
                Issue(
                    "patient_in_several_folds",
                    f"{len(leaking)} patient(s) appear in several folds (leakage between "
                    f"training and validation): {_examples(leaking)}; assign folds per patient",
                    rows_where(df[pat].isin(leaking)),
                )
            )
    if "split" in df.columns:
        is_test = df["split"].astype(str).str.lower().eq("test")
        test_p = set(df.loc[valid_pat & is_test, pat])
        train_p = set(df.loc[valid_pat & ~is_test, pat])
        both = sorted(test_p & train_p)
        if both:
            errors.append(
                Issue(
                    "patient_in_train_and_test",
                    f"{len(both)} patient(s) have images both in split 'test' and outside it: "
                    f"{_examples(both)}; split per patient",
                    rows_where(df[pat].isin(both)),
                )
            )
    # Deep: decode everything that exists.
    if deep:
        from medtl.io import load_image  # lazy: decoding plugins are heavy to import

        unreadable: list[tuple[int, str]] = []
        todo = [i for i in range(len(df)) if exists[i]]
        for i in _iter_progress(todo, "decoding images", progress):
            try:
                load_image(df[PATH_COLUMN].iat[i])
            except UnreadableImageError as err:
                unreadable.append((i, err.reason))
            except Exception as err:  # a decoder bug must not hide the other files
                unreadable.append((i, f"{type(err).__name__}: {err}"))
        if unreadable:
            described = [f"'{df[IMAGE_COLUMN].iat[i]}': {reason}" for i, reason in unreadable]
            errors.append(
                Issue(
                    "unreadable",
                    f"{len(unreadable)} image(s) cannot be decoded: {_examples(described)}",
                    tuple(i for i, _ in unreadable),
                )
            )
    summary = _summary(df, pat, lab if has_labels else None, per_row)
    if has_labels:
        for cls, n_pat in summary["patients_per_class"].items():
            if n_pat < min_patients_per_class:
                warnings.append(
                    Issue(
                        "rare_class",
                        f"class '{cls}' has only {n_pat} patient(s) "
                        f"({summary['class_counts'][cls]} image(s)); patient-grouped "
                        f"{min_patients_per_class}-fold CV needs at least {min_patients_per_class}",
                    )
                )
    content_hash = manifest_content_hash(manifest, include_files=hash_files)
    return ValidationReport(errors, warnings, summary, content_hash, source, deep)


def _summary(df: pd.DataFrame, pat: str, lab: str | None, per_row: list[list[str]]) -> dict:
    """Counts a reviewer wants before training: classes, patients, images per patient, sites."""
    per_patient = df[df[pat].notna()].groupby(pat).size()
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
        counts: dict[str, int] = {}
        patients: dict[str, set] = {}
        for ls, p in zip(per_row, df[pat], strict=True):
            for x in ls:
                counts[x] = counts.get(x, 0) + 1
                if not _is_missing(p):
                    patients.setdefault(x, set()).add(p)
        out["class_counts"] = dict(sorted(counts.items()))
        out["patients_per_class"] = {k: len(patients.get(k, ())) for k in sorted(counts)}
    if "study_id" in df.columns:
        out["studies"] = int(df["study_id"].nunique())
    if "site" in df.columns:
        out["sites"] = {
            str(k): int(v) for k, v in df["site"].value_counts(sort=False).sort_index().items()
        }
    return out


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


# ---------------------------------------------------------------------------- scanning
_SERIES_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class ScanResult:
    """What ``scan_dicom_dir`` found; nothing is dropped without a row in a side table."""

    manifest: pd.DataFrame
    out: Path | None
    n_files: int
    n_dicom: int
    n_non_dicom: int
    n_non_image: int
    n_series: int
    unlabeled: pd.DataFrame  # path, reason
    unreadable: pd.DataFrame  # path, reason
    unlabeled_csv: Path | None = None
    unreadable_csv: Path | None = None
    dropped_columns: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        """Manifest rows written (images or series)."""
        return len(self.manifest)

    @property
    def n_unlabeled(self) -> int:
        """Images or series without a (consistent) label."""
        return len(self.unlabeled)

    @property
    def n_unreadable(self) -> int:
        """Files that could not be read or grouped into an image."""
        return len(self.unreadable)

    def summary(self) -> str:
        """A few lines for the CLI."""
        lines = [
            f"scanned {self.n_files} files: {self.n_dicom} DICOM, {self.n_non_dicom} other "
            f"(skipped), {self.n_non_image} non-image DICOM objects (skipped)",
            f"manifest rows: {self.n_rows} ({self.n_series} multi-file series)"
            + (f" -> {self.out}" if self.out else ""),
            f"unlabeled: {self.n_unlabeled}"
            + (f" (listed in {self.unlabeled_csv})" if self.unlabeled_csv else ""),
            f"unreadable: {self.n_unreadable}"
            + (f" (listed in {self.unreadable_csv})" if self.unreadable_csv else ""),
        ]
        if self.dropped_columns:
            lines.append(
                f"label columns left out as identifying: {', '.join(self.dropped_columns)}"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _sniff(path: Path) -> str | None:
    """'dicom' (DICM preamble), 'raw' (starts like a preamble-less dataset) or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    # Old exports sometimes drop the preamble: the file then starts with a group 0002/0008 tag.
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] < b"\x00\x10":
        return "raw"
    return None


def _list_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [Path(dirpath) / f for f in sorted(filenames)]
    return out


@dataclass
class _Header:
    path: Path
    key: str
    patient: str
    study: str
    series: str
    modality: str
    sex: str
    body_part: str
    view: str
    institution: str
    has_position: bool
    path_has_phi: bool


def _text(ds: Any, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v).strip()


def _read_header(path: Path, rel: str, kind: str, key: str) -> tuple[_Header | None, set[str]]:
    """Header fields a manifest needs, and the file's identifying values (kept in memory)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=kind == "raw")
    if len(ds) == 0:  # pydicom reads a file cut inside its header as an empty dataset
        raise ValueError("no data elements after the file meta (truncated file?)")
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta else "")
    phi = identifying_values(ds, name_parts=True)
    if sop_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return None, phi
    if sop_class:
        name = pydicom.uid.UID(sop_class).name
        if name != sop_class and "Image Storage" not in name:
            return None, phi  # structured report, presentation state, key object, ...
    elif "Rows" not in ds:
        return None, phi
    # Exporters sometimes name folders after the patient or the accession number.
    in_path = [_text(ds, "PatientID"), _text(ds, "AccessionNumber")]
    in_path += [part for part in _text(ds, "PatientName").split("^") if len(part) >= 4]
    rel_upper = rel.upper()
    return (
        _Header(
            path=path,
            key=_text(ds, key),
            patient=_text(ds, "PatientID"),
            study=_text(ds, "StudyInstanceUID"),
            series=_text(ds, "SeriesInstanceUID"),
            modality=_text(ds, "Modality").upper(),
            sex=_text(ds, "PatientSex").upper(),
            body_part=_text(ds, "BodyPartExamined").upper(),
            view=_text(ds, "ViewPosition").upper(),
            institution=_text(ds, "InstitutionName"),
            has_position="ImagePositionPatient" in ds,
            path_has_phi=any(len(v) >= 4 and v.upper() in rel_upper for v in in_path),
        ),
        phi,
    )


def _read_labels(labels_csv: Path, key: str, label_column: str) -> pd.DataFrame:
    """The labels table, one row per key value; conflicting duplicates are an error."""
    suffix = labels_csv.suffix.lower()
    if suffix in (".parquet", ".pq"):
        labels = pd.read_parquet(labels_csv).fillna("").astype(str)
    else:
        labels = pd.read_csv(
            labels_csv, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ","
        )
    for col in (key, label_column):
        if col not in labels.columns:
            raise ManifestError(
                f"labels file {labels_csv} has no column '{col}'. Columns present: "
                f"{', '.join(map(str, labels.columns))}. The join key column must be named like "
                f"the DICOM attribute (--key {key}) and labels go in '{label_column}'."
            )
    labels = labels.map(lambda v: v.strip() if isinstance(v, str) else v)
    labels = labels[labels[key] != ""]
    n_label = labels.groupby(key)[label_column].nunique()
    if (n_label > 1).any():
        bad = labels.index[labels[key].isin(n_label[n_label > 1].index)]
        # Line numbers only: the key values are identifiers.
        raise ManifestError(
            f"labels file {labels_csv}: {int((n_label > 1).sum())} {key} value(s) have "
            f"conflicting labels (lines {_examples([str(i + 2) for i in bad])}); keep one label "
            "per key"
        )
    return labels.drop_duplicates(subset=[key]).set_index(key)


def scan_dicom_dir(
    root: str | Path,
    labels_csv: str | Path,
    key: str = "AccessionNumber",
    out: str | Path | None = None,
    keep_ids: bool = False,
    salt: str | None = None,
    progress: bool = True,
    label_column: str = "label",
) -> ScanResult:
    """Walk a DICOM export (headers only), join labels on ``key`` and build a manifest.

    Any nesting and file names are accepted; non-DICOM files and non-image objects are
    skipped and counted. Multi-file CT/MR/PT/NM series (files with ImagePositionPatient)
    become one row whose ``image`` is the series folder; every other image is one row.
    Columns: ``image`` (relative to ``out``'s folder; absolute when ``out`` is None),
    ``label``, ``patient_id`` and ``study_id`` (salted pseudonyms unless ``keep_ids``),
    the labels file's other columns (except identifier-like ones), ``site`` (from the
    labels file, else a pseudonym of InstitutionName), ``modality``, ``sex``,
    ``body_part``, ``view``, ``n_files``. Files without a label or that cannot be read
    are listed with the reason in ``<out>.unlabeled.csv`` and ``<out>.unreadable.csv``;
    those hold file paths, which can carry names when an exporter named folders after
    patients (the scan warns when it sees this in image paths).

    Args:
        root: the export folder.
        labels_csv: CSV/Parquet with a column named ``key`` and ``label_column``.
        key: DICOM attribute joined to the labels (one of ``medtl.deid.JOIN_KEYS``).
        out: manifest file to write (CSV/Parquet), or None to only return it.
        keep_ids: write real PatientID/StudyInstanceUID/InstitutionName (not for sharing).
        salt: pseudonym key; default :func:`medtl.deid.load_salt` (environment).
        progress: show a progress bar.
        label_column: the label column of the labels file.

    Raises:
        ConfigError: unknown ``key``, or no salt configured.
        ManifestError: the labels file lacks the key/label column or has conflicting labels.
    """
    key = look_up_option(key, JOIN_KEYS, "join key")
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"DICOM folder {root} does not exist (or is not a folder)")
    if not keep_ids and not salt:
        salt = load_salt()
    labels = _read_labels(Path(labels_csv), key, label_column)
    extra_cols = [c for c in labels.columns if c != label_column]
    dropped = [c for c in extra_cols if is_identifying_column(c) or c in JOIN_KEYS]
    extra_cols = [c for c in extra_cols if c not in dropped]

    files = _list_files(root)
    headers: list[_Header] = []
    unreadable: list[tuple[Path, str]] = []
    phi: set[str] = set()
    n_non_dicom = n_non_image = 0
    for path in _iter_progress(files, "reading DICOM headers", progress):
        kind = _sniff(path)
        if kind is None:
            n_non_dicom += 1
            continue
        try:
            rel = path.relative_to(root).as_posix()
            header, values = _read_header(path, rel, kind, key)
        except Exception as err:  # pydicom raises many types on damaged headers
            if kind == "raw":
                n_non_dicom += 1  # only looked like a dataset
            else:
                unreadable.append((path, f"header unreadable: {type(err).__name__}: {err}"))
            continue
        phi |= values
        if header is None:
            n_non_image += 1
        elif not header.patient:
            unreadable.append((path, "no PatientID: the image cannot be grouped by patient"))
        else:
            headers.append(header)

    # Group multi-file series; everything else is one image per file.
    units: list[tuple[Path, list[_Header]]] = []
    by_series: dict[str, list[_Header]] = {}
    for h in headers:
        if h.modality in _SERIES_MODALITIES and h.has_position and h.series:
            by_series.setdefault(h.series, []).append(h)
        else:
            units.append((h.path, [h]))
    folder_series: dict[Path, set[str]] = {}
    for h in headers:
        folder_series.setdefault(h.path.parent, set()).add(h.series)
    n_series = 0
    for members in by_series.values():
        if len(members) == 1:
            units.append((members[0].path, members))
            continue
        folders = {m.path.parent for m in members}
        folder = next(iter(folders))
        if len(folders) == 1 and folder_series[folder] == {members[0].series}:
            units.append((folder, members))
            n_series += 1
        else:
            reason = (
                "series spread over several folders"
                if len(folders) > 1
                else "series shares its folder with other images"
            )
            for m in members:
                unreadable.append(
                    (m.path, f"{reason}; put each series in its own folder and scan again")
                )

    out_path = Path(out) if out else None
    base = out_path.resolve().parent if out_path else None

    def shown(p: Path) -> str:
        return os.path.relpath(p.resolve(), base).replace(os.sep, "/") if base else str(p.resolve())

    rows, unlabeled = [], []
    phi_paths = 0
    for image, members in sorted(units, key=lambda u: str(u[0])):
        found = {labels.at[m.key, label_column] for m in members if m.key in labels.index}
        if not found:
            what = "key value missing in the header" if not members[0].key else "no row"
            unlabeled.append((image, f"{what} for its {key} in the labels file"))
            continue
        if len(found) > 1:
            unlabeled.append((image, "files of this series have different labels"))
            continue
        first = members[0]
        label_row = labels.loc[first.key] if first.key in labels.index else None
        phi_paths += any(m.path_has_phi for m in members)
        row: dict[str, Any] = {
            IMAGE_COLUMN: shown(image),
            "label": found.pop(),
            "patient_id": first.patient if keep_ids else pseudonymize(first.patient, salt),
            "study_id": first.study if keep_ids else pseudonymize(first.study, salt, prefix="S-"),
        }
        for col in extra_cols:
            row[col] = label_row[col] if label_row is not None else ""
        if "site" not in extra_cols and first.institution:
            row["site"] = (
                first.institution if keep_ids else pseudonymize(first.institution, salt, "SITE-")
            )
        row.update(
            modality=first.modality,
            sex=first.sex,
            body_part=first.body_part,
            view=first.view,
            n_files=len(members),
        )
        rows.append(row)
    df = pd.DataFrame(
        rows, columns=None if rows else [IMAGE_COLUMN, "label", "patient_id", "study_id"]
    )
    df = df.drop(
        columns=[
            c for c in ("body_part", "view", "sex") if c in df and not df[c].astype(bool).any()
        ]
    )
    warnings: list[str] = []
    # Guard: a label-file column whose cells equal identifying header values is left out.
    for col in extra_cols:
        if col in df.columns and df[col].astype(str).isin(phi).any():
            df = df.drop(columns=col)
            dropped.append(col)
            warnings.append(f"labels column '{col}' holds identifying header values; left out")
    if phi_paths:
        warnings.append(
            f"{phi_paths} image path(s) contain identifying values (folders or files named after "
            "patients or accession numbers); rename them before sharing the manifest"
        )
    if keep_ids:
        warnings.append("--keep-ids: patient_id/study_id/site hold real identifiers")

    unlabeled_df = pd.DataFrame([(shown(p), r) for p, r in unlabeled], columns=["path", "reason"])
    unreadable_df = pd.DataFrame([(shown(p), r) for p, r in unreadable], columns=["path", "reason"])
    result = ScanResult(
        manifest=df,
        out=out_path,
        n_files=len(files),
        n_dicom=len(files) - n_non_dicom,
        n_non_dicom=n_non_dicom,
        n_non_image=n_non_image,
        n_series=n_series,
        unlabeled=unlabeled_df,
        unreadable=unreadable_df,
        dropped_columns=dropped,
        warnings=warnings,
    )
    if out_path is not None:
        write_manifest(df, out_path)
        stem = out_path.with_suffix("")
        result.unlabeled_csv = Path(f"{stem}.unlabeled.csv")
        result.unreadable_csv = Path(f"{stem}.unreadable.csv")
        unlabeled_df.to_csv(result.unlabeled_csv, index=False)
        unreadable_df.to_csv(result.unreadable_csv, index=False)
    return result
