"""The manifest table: its columns, reading and writing it, and the hash of its content."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtl.errors import ManifestError, look_up_option
from medtl.manifest.delimited import RowOrigin, read_delimited

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
    origin: RowOrigin | None = None  # each row's spreadsheet row and file lines, for messages

    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        root: str | Path,
        label_column: str = "label",
        patient_column: str = "patient_id",
        require_label: bool = True,
        source: str | Path | None = None,
        origin: RowOrigin | None = None,
    ) -> Manifest:
        """Check the required columns of ``df`` and resolve ``image`` against ``root``.

        ``origin`` (one entry per row of ``df``) says where each row is in its file; without
        it messages name rows by their 0-based position in ``df``.
        """
        required = [IMAGE_COLUMN, patient_column] + ([label_column] if require_label else [])
        _require_columns(df, required, label_column, patient_column, source)
        df = _normalise_columns(df, _text_columns(label_column, patient_column))
        root = Path(root).resolve()
        df[PATH_COLUMN] = _absolute_paths(df[IMAGE_COLUMN], root)
        return cls(
            df=df,
            root=root,
            source=Path(source) if source else None,
            label_column=label_column,
            patient_column=patient_column,
            origin=origin,
        )

    def where(self, row: int) -> str:
        """Where table row ``row`` (0-based) is for its user: ``row 5 (line 5 of the file)``,
        the spreadsheet row (header = row 1) then the file line(s); a DataFrame's position."""
        if self.origin is not None:
            return self.origin.describe(row)
        return f"row {row} (0-based position in the table)"

    def cell(self, row: int, column: str) -> str:
        """Where one cell is: ``row 5 (line 5 of the file), column 'image'``."""
        return f"{self.where(row)}, column '{column}'"


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
    values = col.to_numpy(dtype=object)
    missing = pd.isna(values)
    kept = values[~missing]
    if pd.api.types.infer_dtype(kept, skipna=False) not in ("string", "empty"):
        kept = np.array([str(v) for v in kept], dtype=object)  # numbers from a Parquet file
    out = np.full(len(values), np.nan, dtype=object)
    out[~missing] = [v.strip() for v in kept]
    out[out == ""] = np.nan
    return pd.Series(out, index=col.index, dtype=object)


# A relative path needing none of pathlib's clean-ups (//, /./, ./ first, / last) joins its
# root as plain text: the same string as str(root / v), without a Path per row.
_NEEDS_PATHLIB = r"//|/\./|^\./|/\.?$|^\.$"


def _absolute_paths(images: pd.Series, root: Path) -> list[str]:
    """``str(root / image)`` for relative images, ``str(Path(image))`` for absolute ones,
    ``""`` for empty cells: pathlib's strings, built as text for the rows that allow it."""
    text = images.astype(object).where(images.notna(), "").astype(str)
    if os.sep != "/":  # the text shortcut knows POSIX paths only
        return ["" if not v else str(root / v) for v in text]
    prefix = str(root).rstrip("/") + "/"
    is_abs = text.str.startswith("/").to_numpy()
    out = np.where(is_abs, text.to_numpy(dtype=object), prefix + text.to_numpy(dtype=object))
    out[(text == "").to_numpy()] = ""
    values: list[str] = text.tolist()
    for i in np.flatnonzero(text.str.contains(_NEEDS_PATHLIB, regex=True).to_numpy()):
        out[i] = str(root / values[i])
    return out.tolist()


def _is_missing(v: Any) -> bool:
    """True for the empty-cell markers pandas and numpy use (None, NaN, NA, NaT)."""
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT


# ---------------------------------------------------------------------------- reading
def _read_table(
    path: Path, text_columns: Sequence[str], encoding: str | None
) -> tuple[pd.DataFrame, RowOrigin]:
    """The raw table of a CSV/TSV/Parquet file and each row's origin; ``text_columns`` of a
    text file are read as strings (see :mod:`medtl.manifest.delimited` for what is accepted)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        table = read_delimited(path, text_columns, "\t" if suffix == ".tsv" else ",", encoding)
        return table.df, table.origin
    if suffix in (".parquet", ".pq"):
        df = pd.read_parquet(path)
        return df, RowOrigin.table(len(df))
    raise ManifestError(
        f"cannot read manifest {path}: unknown suffix '{suffix}'. Valid: "
        f"{', '.join(TABLE_SUFFIXES)}."
    )


def read_manifest(
    path: str | Path,
    label_column: str = "label",
    patient_column: str = "patient_id",
    require_label: bool = True,
    encoding: str | None = None,
) -> Manifest:
    """Read a CSV/TSV/Parquet manifest; relative ``image`` paths are resolved against its folder.

    Text exports as hospitals make them are accepted: a UTF-8 BOM, ``;`` or tab separators
    (told from the header), cp1252/Latin-1 or UTF-16 text, blank rows (dropped and logged),
    quoted line breaks in cells.

    Args:
        path: the manifest file.
        label_column: the column with labels (multi-label cells: ``a|b``).
        patient_column: the column that groups images by patient.
        require_label: False for prediction manifests that have no labels.
        encoding: the text encoding; None detects it (UTF-8, else cp1252 with a warning).

    Raises:
        ManifestError: the file is missing or unreadable, a required column is absent (the
            message lists the columns present), a header name is repeated, or a row cannot be
            split into the header's columns (the message names the row and column).
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest {p} does not exist (or is not a file)")
    try:
        df, origin = _read_table(p, _text_columns(label_column, patient_column), encoding)
    except ManifestError:
        raise
    except Exception as err:  # pandas/pyarrow raise many types for malformed files
        message = str(err).replace("\n", " ")  # one line, whatever the parser says
        raise ManifestError(f"cannot read manifest {p}: {type(err).__name__}: {message}") from err
    return Manifest.from_dataframe(
        df,
        p.resolve().parent,
        label_column=label_column,
        patient_column=patient_column,
        require_label=require_label,
        source=p,
        origin=origin,
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


_JSON_ESCAPED = re.compile(r'[\x00-\x1f"\\]')  # what json.dumps(ensure_ascii=False) escapes


def _canonical_rows(df: pd.DataFrame) -> list[str]:
    """Each row as ``json.dumps([_cell(v) for v in row], ensure_ascii=False)``, built a column
    at a time (the same strings; a per-row loop took seconds on 200,000 rows)."""
    columns = [_json_cells(df[col]) for col in df.columns]
    if not columns:
        return ["[]"] * len(df)
    return ["[" + ", ".join(cells) + "]" for cells in zip(*columns, strict=True)]


def _json_cells(col: pd.Series) -> list[str]:
    """``json.dumps(_cell(v), ensure_ascii=False)`` of every value of ``col``."""
    values = col.to_numpy(dtype=object)
    kind = col.dtype.kind if isinstance(col.dtype, np.dtype) else ""
    if kind in "iu" and kind:  # numpy integers: never missing
        text = [str(v) for v in col.to_numpy().tolist()]
    elif col.dtype == np.float64:  # _cell inlined: "" for NaN, 3 for 3.0
        text = [
            "" if v != v else str(int(v)) if v.is_integer() else str(v)
            for v in col.to_numpy().tolist()
        ]
    elif pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty"):
        text = np.where(pd.isna(values), "", values).tolist()
    else:
        text = [_cell(v) for v in values]
    if not _JSON_ESCAPED.search("".join(text)):  # the usual case: one scan, nothing to escape
        return ['"' + t + '"' for t in text]
    search = _JSON_ESCAPED.search
    return [json.dumps(t, ensure_ascii=False) if search(t) else '"' + t + '"' for t in text]


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
    rows = sorted(_canonical_rows(df[cols]))
    if rows:
        h.update(("\n".join(rows) + "\n").encode())
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
