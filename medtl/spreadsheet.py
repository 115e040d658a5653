"""CSV files people open in Excel: text cells from input data cannot run as formulas.

A spreadsheet reads a cell that begins with ``= + - @``, a tab or a carriage return as a
formula (OWASP "CSV injection"), so a label, patient id, path or reason taken from input data
could run a ``=HYPERLINK(...)`` or ``=cmd|...`` when a clinician opens predictions, out-of-fold
predictions or a quarantine list. :func:`write_csv` prefixes such text cells with a single
quote ``'``; :func:`read_csv`, which medtl's own readers of those files use, removes it again,
so a label ``-ve`` reads back as ``-ve``.

The rule, exact in both directions (``restore_cell(neutralise_cell(s)) == s`` for every
string ``s``):

- a text cell starting with one of ``= + - @ \\t \\r`` gets one leading ``'``, unless it is a
  plain decimal number (``-1``, ``+3``, ``-0.5e-3``: a spreadsheet reads it as a number, which
  cannot carry a formula);
- a text cell already starting with ``'`` gets one more ``'``, so that restoring can strip
  exactly one leading ``'`` from every cell that starts with one;
- numeric, boolean and date columns are never touched; column names follow the same rule.

Manifests the user writes are read as they are (``medtl.manifest``); only medtl's own output
files go through this module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["FORMULA_PREFIXES", "neutralise_cell", "read_csv", "restore_cell", "write_csv"]

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"
# Written by hand instead of float(): float() also takes "-inf", "-nan", "-1_000" and
# surrounding whitespace, which a spreadsheet reads as text (and so as a possible formula).
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _needs_quote(value: object) -> bool:
    """Whether a cell is text that :func:`neutralise_cell` prefixes with a quote."""
    if not isinstance(value, str) or not value:
        return False
    if value[0] == QUOTE:
        return True
    return value[0] in FORMULA_PREFIXES and _PLAIN_NUMBER.fullmatch(value) is None


def neutralise_cell(value: Any) -> Any:
    """``value`` as written to a spreadsheet CSV: text that a spreadsheet would read as a
    formula (or that starts with ``'``) gets a leading ``'``; anything else is returned as is."""
    return QUOTE + value if _needs_quote(value) else value


def restore_cell(value: Any) -> Any:
    """The original of a cell written by :func:`neutralise_cell`: one leading ``'`` removed."""
    if isinstance(value, str) and value.startswith(QUOTE):
        return value[1:]
    return value


def _is_text(values: pd.Series | pd.Index) -> bool:
    """Object or string dtype: the columns that can hold text cells."""
    dtype = values.dtype
    return pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)


def _map_text(series: pd.Series, select: Any, change: Any) -> pd.Series:
    """``series`` with ``change`` applied to the cells ``select`` picks; the dtype is kept and
    a column with no such cell is returned unchanged (clean files keep their exact bytes)."""
    if not _is_text(series):
        return series
    where = [i for i, v in enumerate(series.to_numpy()) if select(v)]
    if not where:
        return series
    out = series.copy()
    out.iloc[where] = [change(v) for v in series.iloc[where]]
    return out


def _as_text(series: pd.Series) -> pd.Series:
    """A categorical column of text categories as plain text; any other column as it is."""
    if isinstance(series.dtype, pd.CategoricalDtype) and _is_text(series.cat.categories):
        return series.astype(object)
    return series


def _neutralise_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells and column names are neutralised."""
    cols = (_as_text(df.iloc[:, i]) for i in range(df.shape[1]))
    out = pd.DataFrame(
        {i: _map_text(c, _needs_quote, neutralise_cell) for i, c in enumerate(cols)},
        index=df.index,
    )
    out.columns = [neutralise_cell(c) for c in df.columns]
    if _is_text(df.index.to_series()):
        out.index = pd.Index(
            _map_text(df.index.to_series(), _needs_quote, neutralise_cell), name=df.index.name
        )
    return out


def write_csv(df: pd.DataFrame, path: str | Path, **kwargs: Any) -> Path:
    """Write ``df`` as CSV with its text cells neutralised (``index=False`` unless given).

    Args:
        df: the table; numeric, boolean and date columns are written exactly as ``to_csv`` does.
        path: the file to write (its folder must exist).
        **kwargs: passed to :meth:`pandas.DataFrame.to_csv`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    kwargs.setdefault("index", False)
    out = _neutralise_frame(df)
    if _has_carriage_return(out):
        # pandas quotes a cell only for the characters of its line ending ("\n"), so a bare
        # "\r" inside a cell would split the row on reading; with "\r\n" such cells are quoted.
        kwargs.setdefault("lineterminator", "\r\n")
    out.to_csv(path, **kwargs)
    return Path(path)


def _has_carriage_return(df: pd.DataFrame) -> bool:
    """Whether a text cell or column name of ``df`` holds a carriage return."""
    if any(isinstance(c, str) and "\r" in c for c in df.columns):
        return True
    return any(
        isinstance(v, str) and "\r" in v
        for i in range(df.shape[1])
        if _is_text(df.iloc[:, i])
        for v in df.iloc[:, i].to_numpy()
    )


def _is_quoted(value: object) -> bool:
    """Whether a read cell carries the quote :func:`neutralise_cell` adds."""
    return isinstance(value, str) and value.startswith(QUOTE)


def read_csv(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """Read a CSV written by :func:`write_csv`, with every text cell and column name restored.

    Args:
        path: the file.
        **kwargs: passed to :func:`pandas.read_csv`; the keys of a ``dtype`` mapping are the
            original column names (as the table had them before writing).

    Returns:
        The table as it was before :func:`write_csv` (text columns read as text by pandas'
        usual inference, or by ``dtype``).
    """
    dtype = kwargs.get("dtype")
    if isinstance(dtype, dict):
        kwargs["dtype"] = {neutralise_cell(k): v for k, v in dtype.items()}
    df = pd.read_csv(path, **kwargs)
    for i in range(df.shape[1]):
        col = df.iloc[:, i]
        restored = _map_text(col, _is_quoted, restore_cell)
        if restored is not col:
            df.isetitem(i, restored)
    df.columns = [restore_cell(c) for c in df.columns]
    return df
