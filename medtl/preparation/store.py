"""The packed cache: decoded images as raw arrays in large shard files, read back one array
per ``pread``.

Layout under ``<cache folder>/packed-<dtype>/``: each writer appends entries to its own
``<writer id>-<n>.bin`` (written as a locked ``.tmp-`` file, then renamed) and commits it by
writing ``<writer id>-<n>.json`` last: the shard's index (entry key -> array offsets, shapes,
the other values the transforms returned) with the data file's size and sha256. Readers trust
only entries in a committed index, so a killed writer leaves nothing they can see (its
temporary file is deleted by the next writer), and concurrent writers (fold jobs, torchrun
ranks) never share a file name. An entry's key is the same file identity hash the
``PersistentDataset`` cache uses, under the same transform-key folder: the same invalidation.

Reads copy each array out of the page cache into its own buffer with one ``pread`` instead of
memory-mapping the shards: mapped pages count as the reading process's resident memory, so an
epoch over a memory map grew a job's RSS by the size of the whole cache (the scale benchmark's
feature-extraction and fine-tune stages); the copy is one the decode made anyway.
``pread`` takes its offset and leaves the file position alone, so DataLoader workers forked
with an open descriptor share it safely.

Dtypes: ``float32`` stores the transforms' output bit for bit; ``float16`` and ``uint8``
(linear min-max per array, 256 levels) are lossy and smaller, for feeding a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from medtl.errors import ConfigError, look_up_option
from medtl.preparation.atomic import (
    fsync_dir,
    is_locked,
    open_locked_temp,
    remove_stale_temps,
    writer_id,
)
from medtl.preparation.worker import Payload

log = logging.getLogger("medtl")

FORMAT = 1
PACKED_DTYPES = ("float32", "float16", "uint8")
ALIGN = 64  # every array starts on a 64-byte boundary (cache lines, SIMD loads)


def packed_folder(cache_folder: str | Path, dtype: str = "float32") -> Path:
    """The packed store of one transform-key cache folder, for one stored dtype."""
    look_up_option(dtype, PACKED_DTYPES, "packed cache dtype")
    return Path(cache_folder) / f"packed-{dtype}"


@dataclass(frozen=True)
class ArrayRef:
    """Where one array of an entry lies in its shard, and how to turn it back into values."""

    offset: int
    shape: tuple[int, ...]
    stored: str  # dtype on disk
    orig: str  # dtype the transforms gave
    scale: float = 1.0  # uint8: value = stored * scale + shift
    shift: float = 0.0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.stored).itemsize


@dataclass(frozen=True)
class Entry:
    """One cached item: its arrays in shard ``shard`` and its other (JSON) values."""

    shard: str
    arrays: dict[str, ArrayRef]
    meta: dict[str, Any]


# --------------------------------------------------------------------------- encoding
def _encode(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, float, float]:
    """``arr`` in the stored dtype, and the (scale, shift) that decodes it."""
    if dtype == "uint8" and arr.dtype.kind == "f":
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        q = np.rint((arr - lo) / scale).clip(0, 255).astype(np.uint8)
        return q, scale, lo
    if dtype == "float16" and arr.dtype.kind == "f":
        return arr.astype(np.float16), 1.0, 0.0
    return np.ascontiguousarray(arr), 1.0, 0.0  # exact (and non-float arrays, always)


def decode_tensor(raw: np.ndarray, ref: ArrayRef, copy: bool = True) -> torch.Tensor:
    """Stored values back to the transforms' dtype, as a new tensor with its own memory
    (``copy=False``: ``raw`` is already a buffer of its own, as a store read gives, and may
    become the tensor's memory).

    The widening runs in torch: its half -> float conversion is vectorised, NumPy's is
    about ten times slower (measured in ``benchmarks/cache_store.py``)."""
    t = torch.from_numpy(np.array(raw) if copy else raw)
    want = getattr(torch, ref.orig)
    if ref.stored == "uint8" and ref.orig != "uint8":
        return t.to(want).mul_(ref.scale).add_(ref.shift)
    return t.to(want)


def decode_array(raw: np.ndarray, ref: ArrayRef) -> np.ndarray:
    """``decode_tensor`` as a NumPy array."""
    return decode_tensor(raw, ref).numpy()


# --------------------------------------------------------------------------- writing
class ShardWriter:
    """Appends entries to this process's current shard; commits a shard every
    ``shard_entries`` entries, ``shard_bytes`` bytes or ``commit_every_s`` seconds (what a
    kill can lose), and on ``close``."""

    def __init__(
        self,
        folder: str | Path,
        dtype: str = "float32",
        shard_entries: int = 1024,
        shard_bytes: int = 512 * 2**20,
        commit_every_s: float = 30.0,
    ) -> None:
        self.folder = Path(folder)
        self.dtype = look_up_option(dtype, PACKED_DTYPES, "packed cache dtype")
        if shard_entries < 1:
            raise ConfigError(f"shard_entries must be >= 1, got {shard_entries}")
        self.limits = (shard_entries, shard_bytes, commit_every_s)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale(self.folder)
        self._id = writer_id()
        self._n = 0
        self._fh: BinaryIO | None = None
        self._tmp: Path | None = None
        self._entries: list[dict[str, Any]] = []
        self._pos = 0
        self._sha = hashlib.sha256()
        self._opened = 0.0
        self.committed: list[str] = []  # shard names this writer committed

    @property
    def pending(self) -> int:
        """Entries written to the open shard but not committed yet."""
        return len(self._entries)

    def _open(self) -> BinaryIO:
        if self._fh is None:
            self._tmp, self._fh = open_locked_temp(self.folder, ".bin")
            self._entries, self._pos, self._sha = [], 0, hashlib.sha256()
            self._opened = time.monotonic()
        return self._fh

    def _write(self, fh: BinaryIO, data: bytes | memoryview) -> None:
        fh.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def put(self, key: str, payload: Payload) -> int:
        """Append one decoded item (arrays and JSON values); returns the bytes it took.
        A failed write (a full disk) drops the open shard, so nothing half-written remains."""
        meta = {k: v for k, v in payload.items() if not isinstance(v, torch.Tensor | np.ndarray)}
        json.dumps(meta)  # a value JSON cannot hold fails here, before anything is written
        try:
            return self._put(key, payload, meta)
        except BaseException:
            self.abort()
            raise

    def _put(self, key: str, payload: Payload, meta: dict[str, Any]) -> int:
        fh = self._open()
        arrays: dict[str, Any] = {}
        start = self._pos
        for name, value in payload.items():
            if name in meta:
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            enc, scale, shift = _encode(value, self.dtype)
            pad = -self._pos % ALIGN
            if pad:
                self._write(fh, b"\0" * pad)
            off = self._pos
            self._write(fh, np.ascontiguousarray(enc).reshape(-1).view(np.uint8).data)
            arrays[name] = [off, list(enc.shape), enc.dtype.str, value.dtype.str, scale, shift]
        self._entries.append({"key": key, "arrays": arrays, "meta": meta})
        size = self._pos - start
        n_max, b_max, t_max = self.limits
        if (
            len(self._entries) >= n_max
            or self._pos >= b_max
            or time.monotonic() - self._opened >= t_max
        ):
            self.commit()
        return size

    def commit(self) -> None:
        """Make the open shard visible: data file renamed, then its index written last."""
        if self._fh is None or self._tmp is None:
            return
        fh, tmp = self._fh, self._tmp
        name = f"{self._id}-{self._n:05d}"
        try:
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, self.folder / f"{name}.bin")
            index = {
                "format": FORMAT,
                "dtype": self.dtype,
                "data_file": f"{name}.bin",
                "data_bytes": self._pos,
                "data_sha256": self._sha.hexdigest(),
                "entries": self._entries,
            }
            itmp, ifh = open_locked_temp(self.folder, ".json")
            try:
                ifh.write(json.dumps(index, separators=(",", ":")).encode())
                ifh.flush()
                os.fsync(ifh.fileno())
                os.replace(itmp, self.folder / f"{name}.json")
            except BaseException:
                itmp.unlink(missing_ok=True)
                raise
            finally:
                ifh.close()
            fsync_dir(self.folder)
        except BaseException:
            self.abort()
            (self.folder / f"{name}.bin").unlink(missing_ok=True)
            raise
        fh.close()
        self._fh, self._tmp = None, None
        self.committed.append(name)
        self._n += 1

    def abort(self) -> None:
        """Drop the open shard (its entries are not committed)."""
        if self._fh is not None:
            self._fh.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._fh, self._tmp, self._entries = None, None, []

    def close(self) -> None:
        """Commit what is pending."""
        self.commit()


def remove_stale(folder: Path) -> None:
    """Delete a dead writer's leftovers: temporary files, and a renamed data file whose
    index was never written (its lock is free)."""
    n = remove_stale_temps(folder)
    for data in folder.glob("*.bin"):
        if not data.with_suffix(".json").exists() and not is_locked(data):
            data.unlink(missing_ok=True)
            n += 1
    if n:
        log.info("removed %d unfinished cache file(s) left by a stopped writer in %s", n, folder)


# --------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=4096)
def _read_index(path: str, mtime_ns: int, size: int) -> tuple[str, int, list[tuple[str, Entry]]]:
    """A committed shard index, parsed once per file version (committed files never change)."""
    doc = json.loads(Path(path).read_bytes())
    if doc.get("format") != FORMAT:
        return "", 0, []
    shard = str(doc["data_file"])
    out = []
    for e in doc["entries"]:
        arrays = {
            k: ArrayRef(
                int(a[0]), tuple(a[1]), np.dtype(a[2]).name, np.dtype(a[3]).name, a[4], a[5]
            )
            for k, a in e["arrays"].items()
        }
        out.append((e["key"], Entry(shard, arrays, e["meta"])))
    return shard, int(doc["data_bytes"]), out


class PackedStore:
    """The committed entries of one packed folder, read with ``pread``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.entries: dict[str, Entry] = {}
        self.shards: dict[str, int] = {}
        self._fds: dict[str, int] = {}
        self.refresh()

    def refresh(self) -> None:
        """Pick up shards committed since the last look (by this or another writer)."""
        if not self.folder.is_dir():
            return
        for idx in sorted(self.folder.glob("*.json")):
            if idx.name.startswith("."):
                continue
            st = idx.stat()
            shard, size, entries = _read_index(str(idx), st.st_mtime_ns, st.st_size)
            data = self.folder / shard
            if not shard or not data.is_file() or data.stat().st_size < size:
                log.warning("packed cache shard %s is incomplete; its entries are ignored", idx)
                continue
            self.shards[shard] = size
            for key, entry in entries:
                self.entries.setdefault(key, entry)  # duplicates (two writers) are equal

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def has_all(self, keys: list[str]) -> bool:
        """True when every key has a committed entry."""
        return all(k in self.entries for k in keys)

    def _fd(self, shard: str) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.folder / shard, os.O_RDONLY)
        return fd

    def _pread(self, shard: str, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes of ``shard`` from ``offset``, in a new uint8 array."""
        buf = np.empty(nbytes, np.uint8)
        view, got = memoryview(buf.data), 0
        while got < nbytes:
            n = os.preadv(self._fd(shard), [view[got:]], offset + got)
            if n == 0:
                raise OSError(
                    f"packed cache shard {self.folder / shard} ends at byte {offset + got}, "
                    f"before the {nbytes} bytes its index names; delete the folder "
                    f"{self.folder} to rebuild the cache"
                )
            got += n
        return buf

    def raw(self, key: str, name: str = "image") -> np.ndarray:
        """One array as stored, in its own memory (no conversion)."""
        entry = self.entries[key]
        ref = entry.arrays[name]
        buf = self._pread(entry.shard, ref.offset, ref.nbytes)
        return buf.view(ref.stored).reshape(ref.shape)

    def close(self) -> None:
        """Close the shard files this store opened (reopened on the next read)."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        self.close()

    def read(self, key: str) -> dict[str, Any]:
        """The entry as the transforms returned it: torch tensors (own memory) and values."""
        entry = self.entries[key]
        out: dict[str, Any] = dict(entry.meta)
        for name, ref in entry.arrays.items():
            out[name] = decode_tensor(self.raw(key, name), ref, copy=False)
        return out

    def verify(self) -> list[str]:
        """Shards whose data no longer match the sha256 in their index (none expected)."""
        bad = []
        for idx in sorted(self.folder.glob("*.json")):
            if idx.name.startswith("."):  # an index being written
                continue
            doc = json.loads(idx.read_bytes())
            h = hashlib.sha256()
            with (self.folder / doc["data_file"]).open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != doc["data_sha256"]:
                bad.append(idx.name)
        return bad

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}  # files are reopened in a DataLoader worker, never pickled
        return state
