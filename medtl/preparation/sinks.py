"""Where a preparation puts what it decodes: the packed store or MONAI ``PersistentDataset``
files, behind one small interface the preparation loop writes through.

Both keep entries under the transform-key cache folder, keyed by the file identity hash, and
both write atomically (``atomic.py``). The ``.pt`` files are exactly what
``PersistentDataset`` itself would write (same name, same content), so it reads them as its
own cache hits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from medtl.errors import look_up_option
from medtl.preparation.atomic import atomic_file, remove_stale_temps
from medtl.preparation.store import PackedStore, ShardWriter, packed_folder
from medtl.preparation.worker import Payload, from_payload

log = logging.getLogger("medtl")

CACHE_STORES = ("packed", "persistent")
CacheStore = Literal["packed", "persistent"]


class CacheSink(Protocol):
    """What the preparation loop needs from a cache: hits, writes, commit."""

    folder: Path

    @property
    def pending(self) -> int:
        """Entries written but not yet safe from a kill."""
        ...

    def contains(self, key: str) -> bool:
        """Cheap presence check (no read)."""
        ...

    def meta(self, key: str) -> dict[str, Any] | None:
        """A committed entry's non-array values (``pixel_sha256``...); None on a miss."""
        ...

    def put(self, key: str, payload: Payload) -> int:
        """Store one decoded item; returns the bytes written."""
        ...

    def close(self) -> None:
        """Commit everything written."""
        ...


class PackedSink:
    """The packed store: committed entries read from their index, new ones appended to this
    process's shards."""

    def __init__(self, folder: Path, **writer: Any) -> None:
        self.folder = Path(folder)
        self.writer = ShardWriter(self.folder, **writer)
        self.store = PackedStore(self.folder)

    @property
    def pending(self) -> int:
        return self.writer.pending

    def contains(self, key: str) -> bool:
        return key in self.store

    def meta(self, key: str) -> dict[str, Any] | None:
        entry = self.store.entries.get(key)
        return dict(entry.meta) if entry is not None else None

    def put(self, key: str, payload: Payload) -> int:
        return self.writer.put(key, payload)

    def close(self) -> None:
        self.writer.close()


class PersistentSink:
    """MONAI ``PersistentDataset`` files, ``<folder>/<key>.pt``, each written atomically."""

    pending = 0  # every put is committed by its rename

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def meta(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            item = torch.load(path, weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - an unreadable entry is decoded again
            log.warning("cache file %s is unreadable (%s); decoding the image again", path, err)
            path.unlink(missing_ok=True)
            return None
        if not isinstance(item, dict):
            return None
        return {k: v for k, v in item.items() if not isinstance(v, torch.Tensor | np.ndarray)}

    def put(self, key: str, payload: Payload) -> int:
        from monai.utils import convert_to_tensor

        # What PersistentDataset saves: tensors without meta, pickle protocol 2.
        obj = convert_to_tensor(from_payload(payload), convert_numeric=False, track_meta=False)
        path = self._path(key)
        with atomic_file(path) as fh:
            torch.save(obj, fh, pickle_protocol=2)
            size = fh.tell()
        return int(size)

    def close(self) -> None:
        return None


def open_sink(
    kind: CacheStore, folder: Path, dtype: str = "float32", **writer: Any
) -> PackedSink | PersistentSink:
    """The sink for ``data.cache_store`` over the transform-key cache ``folder``."""
    look_up_option(kind, CACHE_STORES, "data.cache_store")
    if kind == "packed":
        return PackedSink(packed_folder(folder, dtype), dtype=dtype, **writer)
    return PersistentSink(folder)
