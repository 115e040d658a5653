"""A full disk while the cache is written: one clear error instead of a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

from medtl.errors import MedtlError


class CacheSpaceError(MedtlError):
    """The cache folder's disk (or quota) is full; says where and how much is needed."""


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable: the loop returns at TB


def cache_space_error(
    folder: Path, entry_bytes: int, remaining: int, err: OSError
) -> CacheSpaceError:
    """The error for a write into ``folder`` that failed with ENOSPC/EDQUOT, with an estimate
    of the space still needed (``remaining`` entries of about ``entry_bytes`` each)."""
    try:
        free: int | None = shutil.disk_usage(folder).free
    except OSError:
        free = None
    needed = entry_bytes * max(remaining, 1)
    free_txt = (
        f"{_size(free)} ({free} bytes) are free" if free is not None else "free space unknown"
    )
    return CacheSpaceError(
        f"no space left to write the image cache in {folder} ({err.strerror or err}): about "
        f"{_size(needed)} ({needed} bytes) more are needed for the {remaining} image(s) not yet "
        f"cached ({_size(entry_bytes)} each), {free_txt}. Free space there, or set "
        "data.cache_dir (or $MEDTL_CACHE_DIR) to a disk with room; entries already written "
        "are kept and reused"
    )
