"""Benchmark: the image cache's read speed (MONAI ``PersistentDataset`` vs the packed store)
and preparation through the decoding pool with 1 vs 2 workers.

Part 1, cached reads at 224 px, one channel: the same N entries (float32 (1, 224, 224), what
the ``cxr_2d`` transforms cache) written once as ``PersistentDataset`` ``.pt`` files and once
as packed shards in float32, float16 and uint8, then read back in one process with one torch
thread (so images/s is per core), page cache warm:

* the store alone (``inner[i]``: what the dataset reads before augmentation);
* the dataset medtl trains on (``MedtlDataset[i]``) and a DataLoader epoch (batch 64,
  ``num_workers=0``, default collate);
* packed only: a batch gathered in the stored dtype (what a GPU feeder pins and copies,
  converting on the device).

Part 2, preparation of synthetic radiographs (uncompressed and JPEG 2000 lossless DICOM)
through ``prepare_records`` into the packed store: in this process (``workers=0``), and the
pool with 1 and 2 workers (the pool's one-time start-up is measured apart).

Prints Markdown and writes it to ``benchmarks/results/cache_store.md``.

    python benchmarks/cache_store.py                 # ~3-5 min on 2 cores
    python benchmarks/cache_store.py --entries 500 --files 8
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SIDE = 224


def best_rate(fn, n: int, repeat: int = 3) -> tuple[float, float]:
    """Best-of-``repeat`` items per second of ``fn()`` (which handles ``n`` items): per CPU
    second of this process (= per core; the cores here are shared with other jobs, so wall
    time understates it) and per wall second."""
    cpu, wall = float("inf"), float("inf")
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        cpu = min(cpu, time.process_time() - c0)
        wall = min(wall, time.perf_counter() - t0)
    return n / max(cpu, 1e-9), n / wall


def rss_mb() -> float:
    """This process's resident memory now (Linux), MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _pair(size: int):
    from medtl.config import build_config
    from medtl.models import get_backbone_spec
    from medtl.transforms import build_transforms

    cfg = build_config({"transforms": {"spatial_size": [size, size], "augment": "none"}})
    pre = get_backbone_spec(cfg.model.backbone).preprocess
    return build_transforms(cfg.transforms, pre, 1, cfg.model.channel_adapt, train=False)


def write_stores(tmp: Path, n: int, pair) -> tuple[list[dict], dict[str, Path], dict[str, float]]:
    """N records (placeholder files: their identity is the cache key), one cache folder per
    store holding the same synthetic entries, and each store's write rate (entries/s, wall)."""
    import torch

    from medtl.data import cache_folder, file_identity_hash
    from medtl.preparation import ShardWriter, packed_folder
    from medtl.preparation.sinks import PersistentSink

    src = tmp / "src"
    src.mkdir()
    recs = []
    for i in range(n):
        p = src / f"im{i:05d}.dcm"
        p.write_bytes(b"")
        recs.append({"image": str(p), "label": i % 2})
    keys = [file_identity_hash({"image": r["image"]}).decode() for r in recs]
    rng = np.random.default_rng(0)
    base = rng.uniform(-1, 1, (1, SIDE, SIDE)).astype(np.float32)
    caches = {name: tmp / name for name in ("persistent", "float32", "float16", "uint8")}
    sinks = {"persistent": PersistentSink(cache_folder(caches["persistent"], pair))}
    for d in ("float32", "float16", "uint8"):
        sinks[d] = ShardWriter(packed_folder(cache_folder(caches[d], pair), d), dtype=d)
    entries = [
        {"image": torch.from_numpy(np.roll(base, i, axis=2)), "pixel_sha256": f"{i:064x}"}
        for i in range(n)
    ]
    write_rate = {}
    for name, sink in sinks.items():
        t0 = time.perf_counter()
        for k, entry in zip(keys, entries, strict=True):
            sink.put(k, entry)
        sink.close()
        write_rate[name] = n / (time.perf_counter() - t0)
    return recs, caches, write_rate


def read_rows(tmp: Path, n: int) -> list[list[str]]:
    """Part 1: cached read throughput per store."""
    from medtl.data import build_dataset, make_loader
    from medtl.preparation import PackedDataset

    pair = _pair(SIDE)
    recs, caches, write_rate = write_stores(tmp, n, pair)
    rows = []
    for name, cache in caches.items():
        ds = build_dataset(recs, pair, cache, "disk")
        inner = ds.inner
        assert isinstance(inner, PackedDataset) == (name != "persistent"), name
        label = "MONAI PersistentDataset (.pt per image)" if name == "persistent" else name
        for i in range(n):  # warm the page cache
            inner[i]
        store = best_rate(lambda inner=inner: [inner[i] for i in range(n)], n)
        item = best_rate(lambda ds=ds: [ds[i] for i in range(n)], n)
        loader = make_loader(ds, batch_size=64, num_workers=0, pin_memory=False)
        epoch = best_rate(lambda loader=loader: [b for b in loader], n)
        gather = "n/a"
        if isinstance(inner, PackedDataset):
            st, keys = inner.store, inner.keys

            def batches(st=st, keys=keys) -> None:
                for s in range(0, n, 64):
                    np.stack([st.raw(k) for k in keys[s : s + 64]])

            gather = f"{best_rate(batches, n)[0]:,.0f}"
        mb = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6
        rows.append(
            [
                label,
                f"{store[0]:,.0f} ({store[1]:,.0f})",
                f"{item[0]:,.0f}",
                f"{epoch[0]:,.0f}",
                gather,
                f"{write_rate[name]:,.0f}",
                f"{mb:.0f}",
            ]
        )
    return rows


def write_dicoms(tmp: Path, files: int, rows_cols: tuple[int, int]) -> dict[str, list[Path]]:
    """Synthetic radiographs as uncompressed and JPEG 2000 lossless DICOM."""
    import loading  # benchmarks/loading.py: the radiograph generator and DICOM writer
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    loading.ROWS, loading.COLS = rows_cols  # the generator's image size
    rng = np.random.default_rng(0)
    images = [loading.radiograph(rng) for _ in range(files)]
    out: dict[str, list[Path]] = {}
    for name, uid in (("uncompressed", ExplicitVRLittleEndian), ("JPEG 2000", JPEG2000Lossless)):
        folder = tmp / name.replace(" ", "")
        folder.mkdir()
        out[name] = []
        for i, px in enumerate(images):
            p = folder / f"im{i:03d}.dcm"
            loading.write_dicom(p, px, uid)
            out[name].append(p)
    return out


class Timed:
    """The wrapped transforms, adding the CPU seconds they took in the process that ran them
    (``cpu_s``): the decoding cost of a worker, whatever share of the cores it was given."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, data: dict) -> dict:
        c0 = time.process_time()
        out = dict(self.inner(data))
        out["cpu_s"] = time.process_time() - c0
        return out


def prepare_rows(tmp: Path, files: int, side: int) -> tuple[list[list[str]], float]:
    """Part 2: a preparation into the packed store (``prepare_cache``, what ``prepare_records``
    runs) in this process vs the pool with 1 and 2 workers: wall time and CPU per image."""
    from medtl.data import cache_folder, file_identity_hash
    from medtl.preparation import open_sink, prepare_cache

    pair = _pair(SIDE)
    dicoms = write_dicoms(tmp, files, (side, side))
    # One-time pool start-up (forkserver + preloading torch/MONAI), measured on its own.
    t0 = time.perf_counter()
    warm = [{"image": str(dicoms["uncompressed"][0])}]
    prepare_cache(warm, None, pair.deterministic, None, workers=2)
    startup = time.perf_counter() - t0
    rows = []
    for name, paths in dicoms.items():
        items = [{"image": str(p)} for p in paths]
        keys = [file_identity_hash(it).decode() for it in items]
        base = None
        for workers in (0, 1, 2):
            sink = open_sink("packed", cache_folder(tmp / f"prep_{name}_{workers}", pair))
            before, c0, t0 = rss_mb(), time.process_time(), time.perf_counter()
            done = prepare_cache(items, keys, Timed(pair.deterministic), sink, workers=workers)
            dt, parent_cpu = time.perf_counter() - t0, time.process_time() - c0
            assert done.stats.decoded == len(items)
            decode_cpu = sum(o["cpu_s"] for o in done.outcomes)  # type: ignore[index]
            # In this process the decoding CPU is part of the parent's own; in the pool it is not.
            total_cpu = parent_cpu if workers == 0 else parent_cpu + decode_cpu
            base = base or dt
            how = "in this process (workers=0)" if workers == 0 else f"pool, {workers} worker(s)"
            n = len(items)
            rows.append(
                [
                    name,
                    how,
                    f"{dt / n * 1e3:.0f}",
                    f"{n / dt:.1f}",
                    f"{base / dt:.2f}x",
                    f"{decode_cpu / n * 1e3:.0f}",
                    f"{total_cpu / n * 1e3:.0f}",
                    f"{rss_mb() - before:+.0f}",
                ]
            )
    return rows, startup


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1000, help="cached entries (224 px)")
    ap.add_argument("--files", type=int, default=16, help="DICOM files per transfer syntax")
    ap.add_argument("--side", type=int, default=1024, help="radiograph rows = columns")
    ap.add_argument("--skip-prepare", action="store_true", help="part 1 only")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="medtl_bench_cache_"))
    load = os.getloadavg()[0]
    try:
        (tmp / "reads").mkdir()
        reads = read_rows(tmp / "reads", a.entries)
        prep, startup = ([], 0.0) if a.skip_prepare else prepare_rows(tmp, a.files, a.side)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = max(load, os.getloadavg()[0])

    head1 = [
        "store",
        "store read (wall)",
        "MedtlDataset item",
        "DataLoader epoch",
        "raw batch",
        "write (wall)",
        "MB",
    ]
    lines = [
        f"### Cached reads: {a.entries} entries, float32 (1, {SIDE}, {SIDE}), images/s per core",
        "",
        "Images per CPU-second of the reading process (= per core), wall-clock rate in brackets; "
        "`write`: entries/s written (wall, fsync per shard for packed).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(1-minute load average up to {load:.1f} during the run: cores shared), torch "
        f"{torch.__version__}, 1 torch thread, page cache warm, best of 3. `raw batch`: 64 "
        "entries gathered in the stored dtype (no conversion: a GPU feeder's host side).",
        "",
        "| " + " | ".join(head1) + " |",
        "|" + "|".join("---" for _ in head1) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in reads]
    if prep:
        head2 = [
            "transfer syntax",
            "decoding",
            "wall ms / image",
            "images / s",
            "speed-up",
            "decode CPU ms / image",
            "decode + parent CPU ms / image",
            "RSS MB",
        ]
        lines += [
            "",
            f"### Preparation: {a.files} radiographs per syntax, {a.side}x{a.side} 12-bit, "
            f"cxr_2d to {SIDE} px, packed store",
            "",
            f"Pool start-up (forkserver, preloading torch/MONAI/pydicom; once per process): "
            f"{startup:.1f} s, not counted below. `decode CPU`: CPU time of the transforms in "
            "the process that ran them; `decode + parent CPU`: that plus this process's own "
            "(receiving, writing the store). `RSS MB`: this process's resident memory growth.",
            "",
            "| " + " | ".join(head2) + " |",
            "|" + "|".join("---" for _ in head2) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in prep]
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_store.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
