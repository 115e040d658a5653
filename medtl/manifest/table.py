"""The manifest table: its columns, reading and writing it, and the hash of its content."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
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
        # object, as the other text columns: a str (Arrow) copy of the paths cost about
        # 0.3 kB a row of memory that Arrow does not give back
        paths = _absolute_paths(df[IMAGE_COLUMN], root)
        df[PATH_COLUMN] = pd.Series(paths, index=df.index, dtype=object)
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
_NEEDS_PATHLIB_RE = re.compile(_NEEDS_PATHLIB)


def cell_strings(col: pd.Series) -> list[str]:
    """Each cell of ``col`` as ``str``, ``""`` for an empty one.

    A loop over the cells' own Python strings: a str (Arrow) copy of the column, and column
    operations on it, held about 0.5 kB a row of Arrow memory that is not given back."""
    values = col.to_numpy(dtype=object)
    missing = pd.isna(values).tolist()
    return ["" if gone else str(v) for v, gone in zip(values, missing, strict=True)]


def _absolute_paths(images: pd.Series, root: Path) -> list[str]:
    """``str(root / image)`` for relative images, ``str(Path(image))`` for absolute ones,
    ``""`` for empty cells: pathlib's strings, built as text for the rows that allow it."""
    text = cell_strings(images)
    if os.sep != "/":  # the text shortcut knows POSIX paths only
        return ["" if not v else str(root / v) for v in text]
    prefix = str(root).rstrip("/") + "/"
    out = [v if not v or v.startswith("/") else prefix + v for v in text]
    for i in [i for i, v in enumerate(text) if _needs_pathlib(v)]:
        out[i] = str(root / text[i])
    return out


def _needs_pathlib(path: str) -> bool:
    """True where pathlib may change ``path`` (``_NEEDS_PATHLIB``); substring tests first,
    several times faster than the regex, which then decides."""
    maybe = "//" in path or "/." in path or path.startswith("./") or path.endswith("/")
    maybe = maybe or path in (".", ".\n") or path.endswith("/\n")  # re's $: before a last \n
    return maybe and _NEEDS_PATHLIB_RE.search(path) is not None


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


_ROWS_PER_CHUNK = 1024  # canonical rows joined and hashed at a time (about 0.5 MB of text)


def _sorted_canonical_rows(df: pd.DataFrame) -> Iterator[bytes]:
    """The UTF-8 bytes of ``"\\n".join(sorted(rows)) + "\\n"``, in chunks, where each row is
    ``json.dumps([_cell(v) for v in row], ensure_ascii=False)``; nothing for no rows.

    The order is found without the rows' text: rows compare as their cells' JSON strings do,
    column by column (a JSON string is never a prefix of another), so each column becomes
    the rank of its cell among the column's distinct cells and the ranks are sorted
    together. Only a chunk of rows is ever text at once; holding every row, its cells and
    the joined text took about 2 kB a row.
    """
    n = len(df)
    if not n:
        return
    if not len(df.columns):
        yield b"[]\n" * n
        return
    ranks, inners = zip(*(_column_ranks(df[col]) for col in df.columns), strict=True)
    order = np.lexsort(ranks[::-1])  # the first column decides first
    for start in range(0, n, _ROWS_PER_CHUNK):
        at = order[start : start + _ROWS_PER_CHUNK]
        columns = [inner[rank[at]] for inner, rank in zip(inners, ranks, strict=True)]
        rows = ['["' + '", "'.join(row) + '"]\n' for row in zip(*columns, strict=True)]
        yield "".join(rows).encode()


def _column_ranks(col: pd.Series) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.object_]]:
    """Each cell's rank among the distinct cells of ``col`` in the order of their JSON
    strings, and those cells as JSON strings without their quotes, in that order."""
    if _factorizes_exactly(col):  # equal values have equal text: a text per distinct value
        codes, uniques = pd.factorize(col, use_na_sentinel=True)
        texts = [*_cell_texts(pd.Series(uniques)), ""]  # the last: empty cells (code -1)
    else:  # e.g. 1 and True are equal values with different text: a text per cell
        codes, cells = pd.factorize(np.array(_cell_texts(col), dtype=object))
        texts = list(cells)
    inner = _json_inner(texts)
    text_rank, distinct = _sorted_ranks(inner)  # an empty cell and "" share a rank
    if not _sorts_as_json(distinct):  # rare: sort again by the JSON strings themselves
        plain: list[str] = distinct.tolist()
        order = sorted(range(len(plain)), key=lambda i: plain[i] + '"')
        new_rank = np.empty(len(order), dtype=np.intp)
        new_rank[order] = np.arange(len(order))
        text_rank, distinct = new_rank[text_rank], distinct[order]
    return text_rank[codes].astype(np.int32), distinct  # int32: half the memory


def _json_inner(texts: list[str]) -> list[str]:
    """``json.dumps(t, ensure_ascii=False)[1:-1]`` of each of ``texts``: the texts
    themselves, but for the few that hold a quote, a backslash or a control character."""
    if not _JSON_ESCAPED.search("".join(texts)):  # the usual case: one scan, none to escape
        return texts
    search = _JSON_ESCAPED.search
    return [json.dumps(t, ensure_ascii=False)[1:-1] if search(t) else t for t in texts]


def _sorted_ranks(texts: list[str]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.object_]]:
    """Each of ``texts``' rank among the distinct texts sorted, and those texts in order.

    Python's sort of the strings themselves: no key string per text, and its string
    comparison is several times faster than numpy's or pandas' sort of objects."""
    order = np.array(sorted(range(len(texts)), key=texts.__getitem__), dtype=np.intp)
    ordered = np.array(texts, dtype=object)[order]
    first = np.ones(len(ordered), dtype=bool)  # the first of each run of equal texts
    first[1:] = ordered[1:] != ordered[:-1]
    rank = np.empty(len(order), dtype=np.intp)
    rank[order] = np.cumsum(first) - 1
    return rank, ordered[first]


def _sorts_as_json(inner: npt.NDArray[np.object_]) -> bool:
    """True when sorted JSON string contents ``inner`` are also in their JSON strings'
    (``'"' + inner + '"'``) order: that differs only where one is the start of the next and
    the next goes on with a space or ``!``, the two characters that sort before an
    unescaped quote (``"ab cd"`` sorts before ``"ab"``)."""
    joined = "".join(inner)
    if " " not in joined and "!" not in joined:  # one scan for the usual case
        return True
    return not any(
        b.startswith(a) and b[len(a)] in " !" for a, b in zip(inner[:-1], inner[1:], strict=True)
    )


def _factorizes_exactly(col: pd.Series) -> bool:
    """True when values of ``col`` that pandas finds equal have the same canonical text:
    integers, floats (0.0 and -0.0 both give "0") and text."""
    dtype = col.dtype
    if isinstance(dtype, np.dtype) and (dtype.kind in "iu" or dtype == np.float64):
        return True
    if isinstance(dtype, pd.StringDtype):
        return True
    is_text = pd.api.types.infer_dtype(col, skipna=True) in ("string", "empty")
    return pd.api.types.is_object_dtype(dtype) and is_text


def _cell_texts(col: pd.Series) -> list[str]:
    """``_cell(v)`` of every value of ``col``, a whole column at a time where its type allows."""
    values = col.to_numpy(dtype=object)
    kind = col.dtype.kind if isinstance(col.dtype, np.dtype) else ""
    if kind in "iu" and kind:  # numpy integers: never missing
        return [str(v) for v in col.to_numpy().tolist()]
    if col.dtype == np.float64:  # _cell inlined: "" for NaN, 3 for 3.0
        return [
            "" if v != v else str(int(v)) if v.is_integer() else str(v)
            for v in col.to_numpy().tolist()
        ]
    if pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty"):
        text: list[str] = np.where(pd.isna(values), "", values).tolist()
        return text
    return [_cell(v) for v in values]


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


def _referenced_files(images: pd.Series, paths: pd.Series) -> Iterator[tuple[str, Any]]:
    """``sorted({(_cell(image), path) for each row})``, one pair at a time: rows ordered by
    their image's text, the paths of one image's rows held at a time (a set of every pair
    held about 0.3 kB a row)."""
    codes, uniques = pd.factorize(images, use_na_sentinel=True)
    texts = [*(_cell(v) for v in uniques), ""]  # the last: empty cells (code -1)
    text_rank, distinct = _sorted_ranks(texts)  # equal texts (NA, None, "") share a rank
    ranks = text_rank[codes]
    order = np.argsort(ranks, kind="stable")
    current, pending = -1, set[Any]()  # an image's text (its rank) and its rows' paths
    for start in range(0, len(order), _ROWS_PER_CHUNK):
        at = order[start : start + _ROWS_PER_CHUNK]
        for rank, path in zip(ranks[at].tolist(), paths.iloc[at].tolist(), strict=True):
            if rank != current:
                yield from ((distinct[current], p) for p in sorted(pending))
                current, pending = rank, set()
            pending.add(path)
    yield from ((distinct[current], p) for p in sorted(pending))


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
    for chunk in _sorted_canonical_rows(df[cols]):
        h.update(chunk)
    if include_files:
        for img, path in _referenced_files(df[IMAGE_COLUMN], manifest.df[PATH_COLUMN]):
            h.update(img.encode() + b"\0")
            h.update((_path_digest(Path(path)) if path else "missing").encode() + b"\n")
    return h.hexdigest()
