"""Reading a manifest exported as delimited text (CSV/TSV), the way hospital exports come.

Spreadsheet and PACS exports arrive with a UTF-8 BOM, ``;`` separators (Excel in locales with
a decimal comma), Windows-1252 text, UTF-16 ("Unicode text"), blank rows, quoted line breaks
and duplicated header names. This module turns such a file into a DataFrame plus, for every
row, where it was in the file, so that each message can name the row a spreadsheet shows
(header = row 1) and the file line. Values are parsed by pandas, exactly as a clean file
would be (so the content hash of a clean file does not change); the raw records are walked
once with the standard ``csv`` module only to number rows, drop blank ones and find
duplicate header names, which pandas renames silently (``label``, ``label.1``).
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import warnings
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from medtl.errors import ManifestError
from medtl.manifest._shared import examples

log = logging.getLogger("medtl")

DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}
FALLBACK_ENCODING = "cp1252"  # Windows "ANSI" (Latin-1 plus € and curly quotes): Excel's export


# ---------------------------------------------------------------------------- row origins
@dataclass(frozen=True)
class RowOrigin:
    """Where each table row came from: its spreadsheet row and, for text, its file lines.

    ``rows[i]`` is the row number a spreadsheet shows for table row ``i`` (header = row 1,
    blank rows counted as the spreadsheet counts them); ``first_line``/``last_line`` are the
    1-based file lines of the record (they differ when a quoted cell holds a line break).
    """

    rows: npt.NDArray[np.int64]
    first_line: npt.NDArray[np.int64] | None = None
    last_line: npt.NDArray[np.int64] | None = None

    @classmethod
    def table(cls, n: int) -> RowOrigin:
        """Origins of a table without lines (Parquet): row ``i`` is spreadsheet row ``i + 2``."""
        return cls(np.arange(2, n + 2, dtype=np.int64))

    def describe(self, i: int) -> str:
        """``row 5 (line 5 of the file)``: the spreadsheet row, then where it is in the file."""
        row = int(self.rows[i])
        if self.first_line is None or self.last_line is None:
            return f"row {row} (header = row 1)"
        first, last = int(self.first_line[i]), int(self.last_line[i])
        lines = f"line {first}" if first == last else f"lines {first}-{last}"
        return f"row {row} ({lines} of the file)"


@dataclass(frozen=True)
class DelimitedTable:
    """A delimited text file read: the values, their origins, and how the file was read."""

    df: pd.DataFrame
    origin: RowOrigin
    encoding: str
    delimiter: str
    blank_rows: tuple[int, ...]  # spreadsheet rows dropped because every cell was empty


@dataclass
class _Records:
    """The raw records of a file: header, kept data records and their positions.

    Per-record numbers are ``array('q')`` (8 bytes each; a list of tuples of ints took
    about 130 bytes a record)."""

    header: list[str]
    header_row: int  # its spreadsheet row (1 unless blank rows come first)
    header_span: tuple[int, int]  # line indices [start, end) of the header record
    starts: array[int]  # line index where each kept data record starts
    ends: array[int]  # line index after each kept data record's last line
    rows: array[int]  # spreadsheet row of each kept data record
    blank_rows: list[int]
    too_long: list[tuple[int, int, list[str]]]  # (kept index, n cells, record) with extra values


# ---------------------------------------------------------------------------- decoding
def decode_text(path: Path, encoding: str | None = None) -> tuple[str, str]:
    """The text of ``path`` and the encoding used: BOM-marked UTF-16/UTF-8, else UTF-8, else
    cp1252 (with a warning naming the file, the first byte that is not UTF-8 and its line).

    Raises:
        ManifestError: an explicit ``encoding`` is unknown or does not fit the bytes.
    """
    data = path.read_bytes()
    if encoding is not None:
        try:
            codecs.lookup(encoding)
            return data.decode(encoding), encoding
        except LookupError as err:
            raise ManifestError(
                f"unknown encoding '{encoding}' for manifest {path}; valid examples: utf-8, "
                "utf-8-sig, cp1252, latin-1, utf-16"
            ) from err
        except UnicodeDecodeError as err:
            raise ManifestError(
                f"manifest {path} is not {encoding}: {_bad_byte(data, err)}; give the "
                "encoding it was saved in, or re-save it as UTF-8"
            ) from err
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Excel "Unicode text"
        return _decode_utf16(path, data)
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as err:
        body = data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data
        # cp1252 leaves five bytes undefined; Latin-1 maps every byte, so it cannot fail.
        used = FALLBACK_ENCODING if _decodes(body, FALLBACK_ENCODING) else "latin-1"
        log.warning(
            "manifest %s is not UTF-8 (%s); read it as %s (Windows Latin-1). Check that "
            "accented names look right, or re-save the file as UTF-8",
            path,
            _bad_byte(data, err),
            used,
        )
        return body.decode(used), used


def _decode_utf16(path: Path, data: bytes) -> tuple[str, str]:
    """UTF-16 text with its byte-order mark (the BOM is dropped)."""
    try:
        return data.decode("utf-16"), "utf-16"
    except UnicodeDecodeError as err:
        raise ManifestError(
            f"manifest {path} starts with a UTF-16 byte-order mark but is not UTF-16: "
            f"{_bad_byte(data, err)}; re-save it as UTF-8"
        ) from err


def _decodes(data: bytes, encoding: str) -> bool:
    """True when ``data`` decodes strictly as ``encoding``."""
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _bad_byte(data: bytes, err: UnicodeDecodeError) -> str:
    """``byte 0xE4 on line 3``: the first undecodable byte and its line, for the message."""
    line = data.count(b"\n", 0, err.start) + 1
    return f"byte 0x{data[err.start]:02X} on line {line}"


# ---------------------------------------------------------------------------- delimiter
def _count_outside_quotes(line: str, char: str) -> int:
    """How often ``char`` occurs in ``line`` outside double-quoted cells."""
    # By hand: csv.Sniffer guesses from letters and quote patterns and, on a short header,
    # often picks a letter or fails; a header only needs its separators counted.
    n, quoted = 0, False
    for c in line:
        if c == '"':
            quoted = not quoted
        elif c == char and not quoted:
            n += 1
    return n


def detect_delimiter(header_line: str, default: str, path: Path) -> str:
    """The separator of a header line: the most frequent of ``,`` ``;`` tab outside quotes.

    A header with none of them is one column (``default``, the suffix's separator, is
    returned); a ``.tsv`` header with a tab is tab separated; two separators equally
    frequent cannot be told apart: an error.
    """
    counts = {d: _count_outside_quotes(header_line, d) for d in DELIMITERS}
    if default == "\t" and counts["\t"]:  # a .tsv: a tab is never in a name by accident
        return default
    top = max(counts.values())
    if top == 0:
        return default
    best = [d for d, n in counts.items() if n == top]
    if len(best) == 1:
        return best[0]
    found = " and ".join(f"{n} {DELIMITERS[d]}(s)" for d, n in counts.items() if n == top)
    raise ManifestError(
        f"cannot tell the separator of manifest {path}: its header (first non-blank line) "
        f"has {found} outside quotes; quote the header names that contain a separator, or "
        "re-export it with one separator"
    )


# ---------------------------------------------------------------------------- records
def _walk_records(lines: list[str], delimiter: str) -> _Records:
    """Every record's lines and spreadsheet row; blank records and overlong ones noted."""
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    header_row, header_span = 1, (0, 0)
    starts, ends, rows = array("q"), array("q"), array("q")
    blank: list[int] = []
    too_long: list[tuple[int, int, list[str]]] = []
    start, n_cols = 0, 0
    for row, record in enumerate(reader, start=1):
        end = reader.line_num
        if not "".join(record).strip():  # every cell empty or blank
            if header is not None:
                blank.append(row)
        elif header is None:
            header, header_row, header_span = record, row, (start, end)
            n_cols = len(record)
        else:
            if len(record) > n_cols and any(c.strip() for c in record[n_cols:]):
                too_long.append((len(starts), len(record), record))
            starts.append(start)
            ends.append(end)
            rows.append(row)
        start = end
    return _Records(header or [], header_row, header_span, starts, ends, rows, blank, too_long)


def _column_letter(j: int) -> str:
    """Spreadsheet letters of 0-based column ``j``: A, B, ..., Z, AA, ..."""
    letters = ""
    j += 1
    while j:
        j, r = divmod(j - 1, 26)
        letters = chr(ord("A") + r) + letters
    return letters


def _column(j: int) -> str:
    """``column 3 (C)``."""
    return f"column {j + 1} ({_column_letter(j)})"


def clean_header(header: Sequence[str], path: Path, where: str = "row 1") -> list[str]:
    """Header names without surrounding blanks or a stray BOM; empty ones named as pandas
    names them (``Unnamed: 3``). A name given twice is an error naming both positions."""
    names = [h.replace("\ufeff", "").strip() for h in header]
    names = [n or f"Unnamed: {j}" for j, n in enumerate(names)]
    seen: dict[str, list[int]] = {}
    for j, n in enumerate(names):
        seen.setdefault(n, []).append(j)
    dups = [(n, js) for n, js in seen.items() if len(js) > 1]
    if dups:
        described = [f"'{n}' in {' and '.join(_column(j) for j in js)}" for n, js in dups]
        raise ManifestError(
            f"manifest {path} has duplicate column names in its header ({where}): "
            f"{examples(described)}; rename or delete the extra column(s)"
        )
    return names


def _check_record_lengths(records: _Records, names: list[str], delimiter: str, path: Path) -> None:
    """A record with more non-empty cells than the header has columns: usually an unquoted
    separator inside a value (``Müller, Hans``); pandas would drop or shift the cells."""
    if not records.too_long:
        return
    k, n_cells, record = records.too_long[0]
    start, end = records.starts[k], records.ends[k]
    where = RowOrigin(np.array([records.rows[k]]), np.array([start + 1]), np.array([end]))
    extra = next(j for j in range(len(names), n_cells) if record[j].strip())
    more = len(records.too_long) - 1
    raise ManifestError(
        f"manifest {path}, {where.describe(0)}: {n_cells} cells but the header has "
        f"{len(names)} columns ({_column(extra)} holds {record[extra]!r} and has no name)"
        + (f"; {more} more row(s) like it" if more else "")
        + f". Quote values that contain the separator ({DELIMITERS[delimiter]}), or name "
        "the extra column in the header"
    )


def _check_closed_quote(
    lines: list[str], records: _Records, names: list[str], delimiter: str, path: Path
) -> None:
    """A quote left open swallows the rest of the file into one cell: name where it opens."""
    if not records.starts:
        return
    start, end = records.starts[-1], records.ends[-1]
    if end - start < 2 or end < len(lines):
        return
    try:
        list(csv.reader(lines[start:end], delimiter=delimiter, strict=True))
    except csv.Error as err:
        if "unexpected end of data" not in str(err):
            return
        where = RowOrigin(np.array([records.rows[-1]]), np.array([start + 1]), np.array([end]))
        n_cells = len(next(csv.reader(lines[start:end], delimiter=delimiter)))
        col = names[n_cells - 1] if n_cells - 1 < len(names) else _column(n_cells - 1)
        raise ManifestError(
            f"manifest {path}, {where.describe(0)}, column '{col}': a quote (\") opened in "
            f"this cell is never closed, so the rest of the file ({end - start} lines) would "
            "be one cell; close or remove the quote"
        ) from err


# ---------------------------------------------------------------------------- reading
def read_delimited(
    path: Path,
    text_columns: Sequence[str],
    default_delimiter: str = ",",
    encoding: str | None = None,
) -> DelimitedTable:
    """Read a CSV/TSV manifest export: encoding and separator detected, blank rows dropped
    (and logged), each row's origin kept; ``text_columns`` are read as strings.

    Raises:
        ManifestError: a duplicate header name, an undecidable separator, a row with more
            values than the header, or an unclosed quote, each naming the row and column.
    """
    text, used = decode_text(path, encoding)
    lines = list(io.StringIO(text, newline=""))  # splits on \n, \r\n and \r, keeps the ends
    first = next((line for line in lines if line.strip()), "")
    delimiter = detect_delimiter(first, default_delimiter, path)
    records = _walk_records(lines, delimiter)
    if not records.header:
        raise ManifestError(f"manifest {path} is empty: no header row (image, label, patient_id)")
    hs, he = records.header_span
    header_at = RowOrigin(np.array([records.header_row]), np.array([hs + 1]), np.array([he]))
    names = clean_header(records.header, path, header_at.describe(0))
    _check_closed_quote(lines, records, names, delimiter, path)  # it explains what follows
    _check_record_lengths(records, names, delimiter, path)
    if records.blank_rows:
        log.warning(
            "manifest %s: %d blank row(s) dropped (%s)",
            path,
            len(records.blank_rows),
            examples([f"row {r}" for r in records.blank_rows]),
        )
    df = _parse_values(lines, records, names, delimiter, text_columns, path)
    origin = RowOrigin(
        np.array(records.rows, dtype=np.int64),
        np.array(records.starts, dtype=np.int64) + 1,
        np.array(records.ends, dtype=np.int64),
    )
    return DelimitedTable(df, origin, used, delimiter, tuple(records.blank_rows))


def _kept_text(lines: list[str], records: _Records) -> str:
    """The header and the kept records as one text (blank records dropped)."""
    hs, he = records.header_span
    kept = lines[hs:he]
    for start, end in zip(records.starts, records.ends, strict=True):
        kept.extend(lines[start:end])
    return "".join(kept)


def _parse_values(
    lines: list[str],
    records: _Records,
    names: list[str],
    delimiter: str,
    text_columns: Sequence[str],
    path: Path,
) -> pd.DataFrame:
    """The kept records parsed by pandas (types inferred as for any clean CSV)."""
    # pandas is given UTF-8 bytes, the form it turns text into anyway: an io.StringIO of
    # the text would hold four bytes per character.
    kept = io.BytesIO(_kept_text(lines, records).encode("utf-8"))
    with warnings.catch_warnings():
        # Extra cells that are empty (a trailing separator on some rows) are dropped on
        # purpose: _check_record_lengths refused every row with an extra value.
        warnings.simplefilter("ignore", pd.errors.ParserWarning)
        df = pd.read_csv(
            kept,
            encoding="utf-8",
            sep=delimiter,
            header=0,
            names=names,
            index_col=False,
            # object, not str: the Python strings pandas parses to anyway, without a trip
            # through Arrow and back (the manifest keeps its text columns as objects)
            dtype={c: object for c in text_columns if c in names},
        )
    if len(df) != len(records.starts):  # the two parsers disagree: never misnumber rows
        raise ManifestError(
            f"cannot read manifest {path}: {len(records.starts)} rows found but pandas read "
            f"{len(df)}; re-export it as plain CSV (comma separated, UTF-8)"
        )
    if delimiter == ";":  # ";" exports come from locales that write 63,5 for 63.5
        df = _decimal_commas(df, [c for c in names if c not in text_columns])
    return df


_DECIMAL_COMMA = r"[+-]?\d*,\d+|[+-]?\d+"


def _decimal_commas(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Columns whose every value is a number written with a decimal comma, as numbers.

    pandas' ``decimal=","`` would instead leave a column written ``63.5`` (a ``;`` file made
    by a script) as text; this converts only the columns that need it.
    """
    for col in columns:
        values = df[col]
        if pd.api.types.is_numeric_dtype(values) or values.isna().all():
            continue
        text = values.dropna().astype(str).str.strip()
        if text.str.fullmatch(_DECIMAL_COMMA).all() and text.str.contains(",").any():
            df[col] = pd.to_numeric(values.astype(str).str.replace(",", ".", regex=False))
    return df
