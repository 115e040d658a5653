"""Decoding at scale: a crash-isolated process pool (the one place files are decoded), a
resumable preparation loop over it, and the caches it fills (packed memory-mapped shards or
MONAI ``PersistentDataset`` files), all written atomically.

Sits between ``medtl.transforms`` and ``medtl.data``: it never imports ``medtl.data``.
"""

from medtl.preparation.dataset import PackedDataset, open_packed
from medtl.preparation.pool import (
    DecodePool,
    PoolStartError,
    decode_indexed,
    decode_stream,
    resolve_workers,
)
from medtl.preparation.prepare import PreparedCache, PrepareStats, prepare_cache
from medtl.preparation.quarantine import QuarantineEntry
from medtl.preparation.sinks import CACHE_STORES, CacheStore, open_sink
from medtl.preparation.space import CacheSpaceError
from medtl.preparation.store import PACKED_DTYPES, PackedStore, ShardWriter, packed_folder

__all__ = [
    "CACHE_STORES",
    "PACKED_DTYPES",
    "CacheSpaceError",
    "CacheStore",
    "DecodePool",
    "PackedDataset",
    "PackedStore",
    "PoolStartError",
    "PrepareStats",
    "PreparedCache",
    "QuarantineEntry",
    "ShardWriter",
    "decode_indexed",
    "decode_stream",
    "open_packed",
    "open_sink",
    "packed_folder",
    "prepare_cache",
    "resolve_workers",
]
