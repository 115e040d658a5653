"""The manifest table: its columns, reading and writing it, and the hash of its content."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtl.errors import ManifestError, look_up_option

IMAGE_COLUMN = "image"
PATH_COLUMN = "path"  # added by read_manifest: the absolute path of ``image``
OPTIONAL_COLUMNS = ("study_id", "site", "fold", "split")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


# ---------------------------------------------------------------------------- columns
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
        required = [IMAGE_COLUMN, patient_column] + ([label_column] if require_label else [])
        _require_columns(df, required, label_column, patient_column, source)
        df = _normalise_columns(df, _text_columns(label_column, patient_column))
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


def _text_columns(label_column: str, patient_column: str) -> list[str]:
    """Columns read as text, so ids keep leading zeros and labels stay strings."""
    return [IMAGE_COLUMN, label_column, patient_column, "study_id", "site", "split"]


def _require_columns(
    df: pd.DataFrame,
    required: Sequence[str],
    label_column: str,
    patient_column: str,
    source: str | Path | None,
) -> None:
    """Raise for the first required column ``df`` lacks, naming the option that picks another."""
    where = f"manifest {source}" if source else "manifest"
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


def _normalise_columns(df: pd.DataFrame, text_columns: Sequence[str]) -> pd.DataFrame:
    """A copy with a fresh index, text columns stripped, and whole-number folds as integers."""
    df = df.reset_index(drop=True).copy()
    for col in text_columns:
        if col in df.columns:
            df[col] = _as_text(df[col])
    if "fold" in df.columns:
        folds = pd.to_numeric(df["fold"], errors="coerce")
        if folds.notna().all() and (folds == folds.round()).all():
            df["fold"] = folds.astype("int64")
    return df


def _as_text(col: pd.Series) -> pd.Series:
    """Strings with surrounding blanks removed; empty cells become NA (ids keep leading 0s)."""
    out = col.map(lambda v: np.nan if _is_missing(v) else str(v).strip())
    return out.map(lambda v: np.nan if isinstance(v, str) and v == "" else v).astype(object)


def _is_missing(v: Any) -> bool:
    """True for the empty-cell markers pandas and numpy use (None, NaN, NA, NaT)."""
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT


# ---------------------------------------------------------------------------- reading
def _read_table(path: Path, text_columns: Sequence[str]) -> pd.DataFrame:
    """The raw table of a CSV/TSV/Parquet file, ``text_columns`` of a CSV read as strings."""
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
    try:
        df = _read_table(p, _text_columns(label_column, patient_column))
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
    """A cell as canonical text: empty for missing, ``3`` for ``3.0`` (CSV and Parquet agree)."""
    if _is_missing(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _file_digest(path: Path) -> str:
    """sha256 hex of a file's bytes."""
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
