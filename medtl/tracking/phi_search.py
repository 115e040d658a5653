"""Search an MLflow store for values that must never be there (patient names, MRNs, UIDs).

Used by the end-to-end PHI test and by sites that want to check a store before sharing it:
every table and column of the SQLite database and every byte of every artifact file is
searched for each value, case-insensitively, as UTF-8 and UTF-16-LE bytes. Hand-written
because no library searches a whole MLflow store; it is a plain scan, slow on huge stores.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterable
from pathlib import Path

__all__ = ["StoreHit", "find_in_store"]


@dataclasses.dataclass(frozen=True)
class StoreHit:
    """One occurrence: the value, where (``db`` or ``artifact``) and the table.column or file."""

    value: str
    where: str
    location: str
    context: str = ""


def _needles(value: str) -> list[bytes]:
    low = value.lower()
    return [low.encode("utf-8"), low.encode("utf-16-le")]


def _context(blob: bytes, needle: bytes, width: int = 40) -> str:
    i = blob.find(needle)
    return blob[max(0, i - width) : i + len(needle) + width].decode("utf-8", "replace")


def _scan_db(values: list[str], db_path: Path) -> list[StoreHit]:
    hits = []
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]
            for col in cols:
                for (cell,) in con.execute(f'SELECT "{col}" FROM "{table}"'):
                    if cell is None:
                        continue
                    blob = cell if isinstance(cell, bytes) else str(cell).encode("utf-8")
                    low = blob.lower()
                    for v in values:
                        needle = next((n for n in _needles(v) if n in low), None)
                        if needle is not None:
                            hits.append(StoreHit(v, "db", f"{table}.{col}", _context(low, needle)))
    finally:
        con.close()
    return hits


def _scan_files(values: list[str], root: Path) -> list[StoreHit]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        low = path.read_bytes().lower()
        name = str(path.relative_to(root)).lower().encode("utf-8")
        for v in values:
            needle = next((n for n in _needles(v) if n in low), None)
            if needle is not None:
                hits.append(StoreHit(v, "artifact", str(path), _context(low, needle)))
            elif _needles(v)[0] in name:
                hits.append(StoreHit(v, "artifact", str(path), "(in the file name)"))
    return hits


def find_in_store(
    values: Iterable[str], db_path: str | Path | None, artifact_root: str | Path | None
) -> list[StoreHit]:
    """Every occurrence of any of ``values`` in the database and the artifact folder.

    Values shorter than 4 characters are rejected: they would match everywhere.
    """
    vals = sorted({str(v) for v in values if v is not None and str(v) != ""})
    short = [v for v in vals if len(v) < 4]
    if short:
        raise ValueError(f"values {short} are too short to search for (4 characters at least)")
    hits: list[StoreHit] = []
    if db_path is not None:
        hits += _scan_db(vals, Path(db_path))
    if artifact_root is not None and Path(artifact_root).exists():
        hits += _scan_files(vals, Path(artifact_root))
    return hits
