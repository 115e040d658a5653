"""A preparation: every item decoded once into a cache, cached ones skipped, bad ones
quarantined, streamed through the decoding pool so memory stays flat.

Resumable by construction: an entry is looked up before it is decoded, and only committed
entries are found, so a rerun after a kill decodes exactly what was not finished.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from medtl.preparation.atomic import is_disk_full
from medtl.preparation.pool import DEFAULT_TIMEOUT_S, Task, decode_indexed, resolve_workers
from medtl.preparation.progress import PrepareProgress
from medtl.preparation.quarantine import QuarantineEntry
from medtl.preparation.sinks import CacheSink
from medtl.preparation.space import cache_space_error
from medtl.preparation.worker import Transform

log = logging.getLogger("medtl")

Outcome = dict[str, Any] | QuarantineEntry  # an item's non-array values, or why it was left out


@dataclass
class PrepareStats:
    """What a preparation did: cache hits, images decoded, files quarantined."""

    total: int
    hits: int = 0
    decoded: int = 0
    quarantined: int = 0
    workers: int = 0
    bytes_written: int = 0


@dataclass
class PreparedCache:
    """One outcome per item, in item order, and the counts."""

    outcomes: list[Outcome]
    stats: PrepareStats


def _values(decoded: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in decoded.items() if not isinstance(v, torch.Tensor | np.ndarray)}


def _entry_bytes(decoded: dict[str, Any]) -> int:
    return sum(int(v.nbytes) for v in decoded.values() if isinstance(v, torch.Tensor | np.ndarray))


class _Writes:
    """Sink writes that turn a full disk into ``CacheSpaceError`` with the space needed."""

    def __init__(self, sink: CacheSink, total: int) -> None:
        self.sink, self.total, self.entry_bytes, self.done = sink, total, 0, 0

    def _space(self, err: OSError, pending: int) -> Exception:
        # A failed write drops the open shard: its ``pending`` entries must be written again.
        remaining = self.total - self.done + pending
        return cache_space_error(self.sink.folder, self.entry_bytes, remaining, err)

    def put(self, key: str, decoded: dict[str, Any]) -> int:
        self.entry_bytes = self.entry_bytes or _entry_bytes(decoded)
        pending = self.sink.pending
        try:
            size = self.sink.put(key, decoded)
        except OSError as err:
            if is_disk_full(err):
                raise self._space(err, pending) from err
            raise
        self.done += 1
        return size

    def close(self) -> None:
        pending = self.sink.pending
        try:
            self.sink.close()
        except OSError as err:
            if is_disk_full(err):
                raise self._space(err, pending) from err
            raise


def prepare_cache(
    items: Sequence[dict],
    keys: Sequence[str] | None,
    transform: Transform,
    sink: CacheSink | None,
    *,
    workers: int | Literal["auto"] = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    label: str = "decoding images into the cache",
) -> PreparedCache:
    """Decode every item of ``items`` not already in ``sink`` (under ``keys``) and store it.

    ``sink=None`` decodes without caching (quarantine and pixel hashes only). Committed even
    when stopped by an error, so a rerun resumes.

    Raises:
        CacheSpaceError: the cache's disk is full (names the folder and the space needed).
        Exception: an error that does not come from a bad file, as the transforms raised it.
    """
    n = len(items)
    if sink is not None and (keys is None or len(keys) != n):
        raise ValueError("a cache needs one key per item")
    outcomes: list[Outcome | None] = [None] * n
    stats = PrepareStats(total=n)
    misses = n if sink is None or keys is None else sum(not sink.contains(k) for k in keys)
    stats.workers = resolve_workers(workers, misses)
    writes = _Writes(sink, misses) if sink is not None else None

    with PrepareProgress(n, label, progress) as bar:

        def tasks() -> Iterator[Task]:
            for i, item in enumerate(items):
                hit = sink.meta(keys[i]) if sink is not None and keys is not None else None
                if hit is not None:
                    outcomes[i] = hit
                    stats.hits += 1
                    bar.advance()
                    continue
                yield i, item

        try:
            for i, res in decode_indexed(tasks(), transform, stats.workers, timeout_s):
                if isinstance(res, QuarantineEntry):
                    outcomes[i] = res
                    stats.quarantined += 1
                    log.info("quarantined %s: %s", res.path, res.reason)
                else:
                    if writes is not None and keys is not None:
                        stats.bytes_written += writes.put(keys[i], res)
                    outcomes[i] = _values(res)
                    stats.decoded += 1
                bar.advance()
        finally:
            if writes is not None:
                writes.close()
    log.info(
        "prepared %d images: %d from the cache, %d decoded (%d worker(s)), %d quarantined",
        n, stats.hits, stats.decoded, stats.workers, stats.quarantined,
    )  # fmt: skip
    done = [o for o in outcomes if o is not None]
    if len(done) != n:  # every item is a hit, a decoded entry or a quarantine entry
        raise RuntimeError(f"preparation lost {n - len(done)} item(s); please report this")
    return PreparedCache(done, stats)
