"""Manifest -> records -> MONAI datasets with an on-disk cache, quarantine and loaders.

The deterministic transforms run once per image (``prepare_records``, through the decoding
pool of ``medtl.preparation``) into a cache under ``cache_dir/<transform cache key>/``: packed
memory-mapped shards (``data.cache_store=packed``) or MONAI ``PersistentDataset`` files; every
epoch then reads the cached tensor and applies only the random part. Unreadable files are
quarantined with their reason instead of stopping a run, up to ``data.max_bad_fraction``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from medtl.augment import seed_monai_item
from medtl.config import PipelineConfig
from medtl.errors import (
    ConfigError,
    ManifestError,
    TooManyBadFilesError,
    look_up_option,
)
from medtl.io.base import PIXEL_HASH_KEY
from medtl.preparation import CacheStore, open_packed, open_sink, prepare_cache
from medtl.preparation.pool import DEFAULT_TIMEOUT_S
from medtl.preparation.quarantine import QuarantineEntry
from medtl.preparation.quarantine import quarantine_reason as _reason  # noqa: F401 (old name)
from medtl.preparation.quarantine import root_cause as _root_cause  # noqa: F401 (old name)
from medtl.spreadsheet import neutralise_cell
from medtl.transforms import PIXEL_HASH_DATA_KEY, TransformPair

log = logging.getLogger(__name__)

CACHE_MODES = ("disk", "memory", "none")
SLICE_COLUMN = "slice"  # optional manifest column: the center slice for 2.5D inputs


@dataclass(frozen=True)
class PreparedData:
    """Records whose images loaded, and the ones quarantined."""

    records: list[dict]
    quarantine: list[QuarantineEntry]


# --------------------------------------------------------------------------- records
def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""


def records_from_manifest(manifest: Any, cfg: PipelineConfig) -> tuple[list[dict], list[str]]:
    """One record per manifest row: ``{"image": abs path, "label", "patient_id", "row"}``.

    Single-label tasks get an integer class index into ``classes``; multi-label tasks (set
    in ``data.task`` or detected from cells containing ``data.label_separator``) get a
    multi-hot float list. ``classes`` is ``data.classes`` or the sorted unique labels.
    A ``slice`` column, when present, is copied for 2.5D inputs.

    Raises:
        ManifestError: missing label column, empty labels, or labels outside ``data.classes``.
    """
    dcfg = cfg.data
    df: pd.DataFrame = manifest.df
    label_col = getattr(manifest, "label_column", None) or dcfg.label_column
    patient_col = getattr(manifest, "patient_column", None) or dcfg.patient_column
    for col in (label_col, patient_col, "path"):
        if col not in df.columns:
            raise ManifestError(
                f"manifest has no '{col}' column (columns: {', '.join(map(str, df.columns))}); "
                "set data.label_column / data.patient_column to the right names"
            )
    sep = dcfg.label_separator
    raw = df[label_col].tolist()
    task = dcfg.task
    if task == "auto" and any(not _is_missing(v) and sep in str(v) for v in raw):
        task = "multilabel"
    multilabel = task == "multilabel"

    def tokens(v: Any) -> list[str]:
        if _is_missing(v):
            return []
        return (
            [t.strip() for t in str(v).split(sep) if t.strip()] if multilabel else [str(v).strip()]
        )

    cells = [tokens(v) for v in raw]
    if not multilabel:
        empty = [i for i, t in enumerate(cells) if not t]
        if empty:
            raise ManifestError(
                f"{len(empty)} manifest row(s) have no '{label_col}' value (first rows: "
                f"{empty[:5]}); fill them or drop those rows"
            )
    found = sorted({t for c in cells for t in c})
    classes = [str(c) for c in dcfg.classes] if dcfg.classes else found
    if dcfg.positive_class is not None:  # the finding goes last: the "positive" class of reports
        if dcfg.positive_class not in classes:
            raise ConfigError(
                f"data.positive_class '{dcfg.positive_class}' is not a label in the manifest; "
                f"labels: {', '.join(classes)}"
            )
        classes = [c for c in classes if c != dcfg.positive_class] + [dcfg.positive_class]
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ManifestError(
            f"label(s) {unknown} are not in data.classes {classes}; add them to data.classes "
            "or fix the manifest"
        )
    if len(classes) < 2 and not multilabel:
        raise ManifestError(
            f"need at least 2 classes to train, found {classes} in column '{label_col}'"
        )
    if task == "binary" and len(classes) != 2:
        raise ConfigError(f"data.task=binary but there are {len(classes)} classes: {classes}")
    index = {c: i for i, c in enumerate(classes)}

    has_slice = SLICE_COLUMN in df.columns
    records = []
    for row, (path, pid, cell) in enumerate(
        zip(df["path"].tolist(), df[patient_col].tolist(), cells, strict=True)
    ):
        if multilabel:
            hot = [0.0] * len(classes)
            for t in cell:
                hot[index[t]] = 1.0
            label: Any = hot
        else:
            label = index[cell[0]]
        rec = {"image": str(path), "label": label, "patient_id": str(pid), "row": row}
        if has_slice and not _is_missing(df[SLICE_COLUMN].iloc[row]):
            rec[SLICE_COLUMN] = int(df[SLICE_COLUMN].iloc[row])
        records.append(rec)
    return records, classes


# --------------------------------------------------------------------------- cache
def _cache_item(rec: dict) -> dict:
    """What the deterministic transforms see: the path (and 2.5D center slice)."""
    item = {"image": rec["image"]}
    if rec.get(SLICE_COLUMN) is not None:
        item[SLICE_COLUMN] = rec[SLICE_COLUMN]
    return item


def file_identity_hash(item: dict) -> bytes:
    """Cache file name for an item: resolved path, size and mtime (a folder: its files')."""
    p = Path(item["image"])
    try:
        if p.is_dir():
            # One stat per member: this runs on every __getitem__ of the cached dataset.
            with os.scandir(p) as it:
                stats = [(e.name, e.stat()) for e in it if e.is_file()]
            ident: Any = sorted((n, st.st_size, st.st_mtime_ns) for n, st in stats)
        else:
            st = p.stat()
            ident = [st.st_size, st.st_mtime_ns]
    except OSError:
        ident = "missing"
    blob = json.dumps([str(p.resolve()), ident, item.get(SLICE_COLUMN)], default=str)
    return hashlib.sha256(blob.encode()).hexdigest().encode()


def _inner_dataset(
    items: list[dict], transforms: TransformPair, cache_dir: str | Path | None, cache: str
) -> torch.utils.data.Dataset:
    """The cached deterministic part: ``disk`` reads the packed store when it holds every
    item (what ``data.cache_store=packed`` prepared), else MONAI ``PersistentDataset`` files
    (computed on a miss)."""
    from monai.data import CacheDataset, Dataset, PersistentDataset

    look_up_option(cache, CACHE_MODES, "data.cache")
    if cache == "disk":
        if cache_dir is None:
            raise ConfigError("data.cache=disk needs a cache folder: set data.cache_dir")
        folder = cache_folder(cache_dir, transforms)
        folder.mkdir(parents=True, exist_ok=True)
        keys = [file_identity_hash(it).decode() for it in items]
        packed = open_packed(folder, keys, transforms.deterministic)
        if packed is not None:
            return packed
        return PersistentDataset(
            items, transforms.deterministic, cache_dir=folder, hash_func=file_identity_hash
        )
    if cache == "memory":
        return CacheDataset(items, transforms.deterministic, num_workers=1, progress=False)
    return Dataset(items, transforms.deterministic)


def cache_folder(cache_dir: str | Path, transforms: TransformPair) -> Path:
    """Where ``transforms``' deterministic outputs are cached under ``cache_dir``."""
    return Path(cache_dir) / transforms.cache_key[:32]


def prepare_records(
    records: Sequence[dict],
    transforms: TransformPair,
    cache_dir: str | Path | None,
    max_bad_fraction: float,
    progress: bool = True,
    cache: Literal["disk", "memory", "none"] = "disk",
    *,
    workers: int | Literal["auto"] = 0,
    store: CacheStore = "persistent",
    decode_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> PreparedData:
    """Run the deterministic transforms once per record (filling the disk cache) and
    quarantine the files that cannot be read.

    Decoding goes through ``medtl.preparation``: ``workers`` processes (``data.prepare_workers``;
    0 = in this process), records streamed, entries written atomically into ``store``
    (``data.cache_store``), entries already cached skipped, so a killed preparation resumes.
    A decoder that crashes or runs past ``decode_timeout_s`` quarantines its file. Each
    readable record comes back as a copy with ``image_sha256`` (the decoded pixels' sha256,
    ``medtl.io.pixel_sha256``) when the transforms give one; a cache hit gives it without
    decoding. Records and quarantine keep the input order whatever the worker count.

    Raises:
        TooManyBadFilesError: the quarantined fraction exceeds ``max_bad_fraction``.
        CacheSpaceError: the cache folder's disk is full (names it and the space needed).
    """
    records = list(records)
    look_up_option(cache, CACHE_MODES, "data.cache")
    items = [_cache_item(r) for r in records]
    sink = None
    keys = None
    if cache == "disk" and cache_dir is not None:
        sink = open_sink(store, cache_folder(cache_dir, transforms))
        keys = [file_identity_hash(it).decode() for it in items]
    done = prepare_cache(
        items,
        keys,
        transforms.deterministic,
        sink,
        workers=workers,
        timeout_s=decode_timeout_s,
        progress=progress,
    )
    good: list[dict] = []
    bad: list[QuarantineEntry] = []
    for rec, out in zip(records, done.outcomes, strict=True):
        if isinstance(out, QuarantineEntry):
            bad.append(out)
        else:
            digest = out.get(PIXEL_HASH_DATA_KEY)
            good.append({**rec, PIXEL_HASH_KEY: digest} if digest else rec)
    check_bad_fraction(bad, len(records), max_bad_fraction)
    return PreparedData(good, bad)


def check_bad_fraction(bad: Sequence[QuarantineEntry], n: int, max_bad_fraction: float) -> None:
    """Raise TooManyBadFilesError when more than ``max_bad_fraction`` of ``n`` images are bad."""
    frac = len(bad) / n if n else 0.0
    if frac > max_bad_fraction:
        first = "; ".join(f"{Path(q.path).name} ({q.reason})" for q in bad[:3])
        raise TooManyBadFilesError(
            f"{len(bad)} of {n} images ({frac:.1%}) could not be read, above "
            f"data.max_bad_fraction={max_bad_fraction}; first: {first}. Fix or remove those "
            "files, or raise data.max_bad_fraction to train without them",
            bad,
        )


def write_quarantine(quarantine: Sequence[QuarantineEntry], path_csv: str | Path) -> Path:
    """Write ``path,reason`` rows (header only when nothing was quarantined); paths and reasons
    cannot run as spreadsheet formulas (``medtl.spreadsheet``)."""
    path_csv = Path(path_csv)
    path_csv.parent.mkdir(parents=True, exist_ok=True)
    with path_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        for q in quarantine:
            w.writerow([neutralise_cell(q.path), neutralise_cell(q.reason)])
    return path_csv


# --------------------------------------------------------------------------- dataset
class MedtlDataset(torch.utils.data.Dataset):
    """Cached deterministic part, then the random part; yields ``image``, ``label``, ``index``.

    ``records`` holds the record dicts in index order (labels, patient ids for samplers and
    reports); ``deterministic_view()`` is the same data without augmentation.

    A key ``(index, aug_seed)`` (what ``medtl.training.sampling.EpochSampler`` yields) seeds the
    item's augmentation from (epoch key, index) alone: persistent loader workers then give
    every epoch its own draws, the same whichever worker loads the item.
    """

    def __init__(self, records: list[dict], inner: Any, random: Any):
        self.records = records
        self.inner = inner
        self.random = random
        self._rng = np.random.RandomState(0)  # reseeded per keyed item (seed_monai_item)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        out = dict(self.inner[index])
        label = self.records[index]["label"]
        if self.random is not None and len(self.random.transforms):
            if aug_seed is not None:
                seed_monai_item(self.random, self._rng, aug_seed, index)
            out = self.random(out)
        image = out["image"]
        image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        dtype = torch.float32 if isinstance(label, list | tuple | np.ndarray) else torch.long
        return {
            "image": image.float(),
            "label": torch.as_tensor(label, dtype=dtype),
            "index": index,
        }

    def deterministic_view(self) -> MedtlDataset:
        """The same images without augmentation (feature extraction, evaluation)."""
        return MedtlDataset(self.records, self.inner, None)


def build_dataset(
    records: Sequence[dict],
    transforms: TransformPair,
    cache_dir: str | Path | None,
    cache: Literal["disk", "memory", "none"] = "disk",
) -> MedtlDataset:
    """A dataset over ``records``: deterministic part cached (``disk``: under
    ``cache_dir/<key>``; ``memory``: in RAM; ``none``: recomputed), random part per access."""
    records = list(records)
    inner = _inner_dataset([_cache_item(r) for r in records], transforms, cache_dir, cache)
    return MedtlDataset(records, inner, transforms.random)


def auto_workers(n_items: int, batch_size: int, cpu_count: int | None = None) -> int:
    """DataLoader workers: 0 on tiny data or <= 2 cores (start-up costs more than it
    saves), else ``min(4, cores - 1)``."""
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if cores <= 2 or n_items <= 4 * batch_size:
        return 0
    return min(4, cores - 1)


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    sampler: torch.utils.data.Sampler | None = None,
    shuffle: bool = False,
    num_workers: int | str = "auto",
    pin_memory: bool | None = None,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """A MONAI DataLoader (seeds each worker's random transforms) with sensible defaults."""
    from monai.data import DataLoader

    if num_workers == "auto":
        if not isinstance(dataset, Sized):
            raise TypeError("num_workers='auto' needs a dataset with a length (__len__)")
        workers = auto_workers(len(dataset), batch_size)
    else:
        workers = int(num_workers)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle if sampler is None else False,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )
