"""A torch Dataset over the packed store: the cached deterministic outputs, read by key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medtl.preparation.store import PACKED_DTYPES, PackedStore, packed_folder


class PackedDataset(torch.utils.data.Dataset):
    """Item ``i`` is the store's entry ``keys[i]``: ``{"image": Tensor, ...}`` as the
    deterministic transforms returned it. Keys are computed once, when the dataset is built
    (``PersistentDataset`` hashes the file's identity again on every read)."""

    def __init__(self, store: PackedStore, keys: Sequence[str], transform: Any = None) -> None:
        self.store = store
        self.keys = list(keys)
        # The deterministic transforms the entries came from, held but never run: MONAI's
        # DataLoader seeds a dataset with ``set_rnd``, which walks its attributes in name order
        # and gives each Randomizable the next seed. PersistentDataset holds its ``transform``,
        # so holding it here gives the random part after us the same seed: an augmented epoch
        # is the same whichever store it reads.
        self.transform = transform

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.store.read(self.keys[index])


def open_packed(
    cache_folder: str | Path, keys: Sequence[str], transform: Any = None
) -> PackedDataset | None:
    """A dataset over the packed store of ``cache_folder`` when one stored dtype holds every
    key (the most exact first: float32, float16, uint8); None otherwise. ``transform``: the
    deterministic transforms the store was filled with (see ``PackedDataset``)."""
    for dtype in PACKED_DTYPES:
        folder = packed_folder(cache_folder, dtype)
        if not folder.is_dir():
            continue
        store = PackedStore(folder)
        if keys and store.has_all(list(keys)):
            return PackedDataset(store, keys, transform)
    return None
