"""Cache files written so that a killed writer never leaves a half-written entry.

Every file is written as a temporary file in the destination folder itself, then renamed: a
rename inside one filesystem is atomic, a move across filesystems (MONAI's
``PersistentDataset`` writes under ``/tmp`` first) is a copy that a kill can cut short.
While it is written, a temporary file holds an exclusive ``flock``; the kernel drops the lock
when its process dies, so the next run can tell a dead writer's leftovers (lock free) from a
live concurrent writer's file (lock held) and deletes only the former.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def writer_id() -> str:
    """A name no other writer (process, host) will use: shard and temp names start with it."""
    host = socket.gethostname().split(".")[0].replace("-", "") or "host"
    return f"{host}{os.getpid()}x{uuid.uuid4().hex[:8]}"


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_locked_temp(folder: Path, suffix: str) -> tuple[Path, BinaryIO]:
    """A new temporary file in ``folder``, opened for writing and exclusively locked."""
    path = folder / f"{TEMP_PREFIX}{writer_id()}{suffix}"
    fh = path.open("xb")
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, fh


@contextlib.contextmanager
def atomic_file(dest: Path, durable: bool = False) -> Iterator[BinaryIO]:
    """Write ``dest`` through a locked temporary file beside it, renamed over it on success
    and removed on any error; ``durable`` also fsyncs (survives a power cut, not only a kill)."""
    tmp, fh = open_locked_temp(dest.parent, dest.suffix)
    try:
        yield fh
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        fh.close()
    if durable:
        fsync_dir(dest.parent)


def is_locked(path: Path) -> bool:
    """True while a live process holds ``path``'s writer lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the lock we may have taken
    return False


def remove_stale_temps(folder: Path) -> int:
    """Delete temporary files left by dead writers in ``folder``; returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for p in folder.glob(f"{TEMP_PREFIX}*"):
        if not is_locked(p):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def is_disk_full(err: BaseException) -> bool:
    """True for "no space left on device" and "disk quota exceeded"."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS
