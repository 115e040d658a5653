"""Benchmark: how much faster two processes are than one on this machine, for the same work
and with no start-up in the clock: the ceiling for "prepare, 2 workers vs 1" in ``scale.py``.

Two kinds of work, each timed over the same total amount, split evenly between the processes,
which start together at a barrier after their imports:

* ``decode``: medtl's own decode step (``preparation.worker.decode_one``: read the DICOM,
  deterministic ``cxr_2d`` transforms to ``--size`` px) over the files of a manifest, for
  example one that ``scale.py --keep`` left (512 px, 20% JPEG 2000);
* ``python loop``: a pure-Python integer loop that touches no memory: what the two vCPUs give
  when neither caches nor memory bandwidth are shared.

The ratio (1 process's wall over 2 processes' wall for the same work) is what the machine
allows; the gap from 2.0 is not medtl's pool. Writes ``benchmarks/results/two_core_ceiling.md``
and ``.jsonl``.

    python benchmarks/two_core_ceiling.py --manifest /tmp/scale/n5000/manifest.csv --images 600
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINE = Path(__file__).resolve().parent.parent / "pipelines/cxr_2d_finetune.yaml"


def _transform(size: int) -> Any:
    from medtl.config import load_config
    from medtl.jobs.prepare import build_preprocessing

    cfg = load_config(PIPELINE, [f"transforms.spatial_size=[{size},{size}]"])
    return build_preprocessing(cfg, 2).eval.deterministic


def _work(kind: str, items: list[dict], size: int, start: Any, out: Any) -> None:
    """One process: import and build first, wait at the barrier, then time only the work."""
    import torch

    torch.set_num_threads(1)  # as a decoding worker runs
    if kind == "decode":
        from medtl.preparation.worker import decode_one

        transform = _transform(size)
        decode_one(transform, items[0])  # lazy decoder imports out of the clock
    start.wait()
    t0 = time.perf_counter()
    if kind == "decode":
        for it in items:
            decode_one(transform, it)
    else:
        x = 0
        for i in range(len(items) * 400_000):
            x ^= i
    out.put(time.perf_counter() - t0)


def timed(kind: str, items: list[dict], procs: int, size: int) -> float:
    """Wall seconds for ``items`` split over ``procs`` processes started together."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs + 1), ctx.Queue()
    parts = [items[i::procs] for i in range(procs)]
    ps = [ctx.Process(target=_work, args=(kind, p, size, start, out)) for p in parts]
    for p in ps:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    for _ in ps:
        out.get()
    wall = time.perf_counter() - t0
    for p in ps:
        p.join()
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True, help="a manifest of DICOM files (image column)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64, help="transforms.spatial_size")
    ap.add_argument("--runs", type=int, default=3, help="pairs per kind, one after another")
    a = ap.parse_args()
    import pandas as pd

    df = pd.read_csv(a.manifest).head(a.images)
    base = Path(a.manifest).parent
    items = [{"image": str(base / p) if not os.path.isabs(p) else p} for p in df["image"]]
    rows = []
    for run in range(a.runs):  # the machine's speed drifts: each pair is side by side
        for kind in ("decode", "python loop"):
            one, two = timed(kind, items, 1, a.size), timed(kind, items, 2, a.size)
            rows.append({"run": run, "work": kind, "one_s": one, "two_s": two, "ratio": one / two})
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "two_core_ceiling.jsonl", "w") as raw:
        for r in rows:
            raw.write(json.dumps({**r, "images": len(items), "size": a.size}) + "\n")
    lines = [
        f"Two processes against one: {platform.platform(terse=True)}, {os.cpu_count()} cores, "
        f"{len(items)} images from {a.manifest}, {a.size} px; no start-up in the clock",
        "",
        "| run | work | 1 process, s | 2 processes, s | 2 vs 1 |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {r['run']} | {r['work']} | {r['one_s']:.1f} | {r['two_s']:.1f} | "
            f"{r['ratio']:.2f}x |"
            for r in rows
        ),
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "two_core_ceiling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
