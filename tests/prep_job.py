"""Helpers for the preparation tests: test-only transforms (slow, crashing, hanging) that wrap
the real deterministic transforms, and a preparation job script.

As a script (``python tests/prep_job.py ...``) it prepares the demo images into the packed
store through the decoding pool and writes its counts to ``--out``; the kill-and-resume test
starts it as a real subprocess and kills it with SIGKILL mid-run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

SIZE = [32, 32]


class SlowThen:
    """The wrapped transforms after ``delay_s`` of sleep: keeps entries in flight."""

    def __init__(self, inner: Any, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def __call__(self, data: dict) -> Any:
        time.sleep(self.delay_s)
        return self.inner(data)


class CrashOn:
    """Dies like a broken native decoder (``segv``: a NULL read; ``abort``: abort()) on the
    file whose name is ``name``; the wrapped transforms otherwise."""

    def __init__(self, inner: Any, crashes: dict[str, str]):
        self.inner, self.crashes = inner, crashes

    def __call__(self, data: dict) -> Any:
        how = self.crashes.get(Path(str(data["image"])).name)
        if how == "segv":
            ctypes.string_at(0)  # reads address 0: SIGSEGV, as a decoder bug would
        elif how == "abort":
            os.abort()
        elif how == "hang":
            time.sleep(3600)
        return self.inner(data)


def _refuse() -> None:
    raise RuntimeError("this transform cannot be rebuilt in a worker process")


class BrokenInWorker:
    """Transforms that pickle but cannot be unpickled: a worker that cannot even start."""

    def __call__(self, data: dict) -> dict:
        return data

    def __reduce__(self):
        return (_refuse, ())


def demo_pair(spatial_size: list[int] = SIZE, train: bool = False):
    """The demo's transforms (cxr_2d at ``spatial_size``, light augmentation when ``train``)."""
    from medtl.config import build_config
    from medtl.models.registry import PreprocessSpec
    from medtl.transforms import build_transforms

    cfg = build_config({"transforms": {"spatial_size": spatial_size, "augment": "light"}})
    lite = PreprocessSpec(input_size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    return build_transforms(cfg.transforms, lite, 1, "fold_sum", train=train)


def demo_items(manifest_csv: str | Path, limit: int) -> list[dict]:
    """The first ``limit`` demo images as cache items (``{"image": path}``)."""
    from medtl.config import build_config
    from medtl.data import records_from_manifest
    from medtl.manifest import read_manifest

    records, _ = records_from_manifest(read_manifest(manifest_csv), build_config({}))
    return [{"image": r["image"]} for r in records[:limit]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the demo images into the packed store, as ``prepare_records`` does."""
    from medtl.data import cache_folder, file_identity_hash
    from medtl.preparation import open_sink, prepare_cache

    pair = demo_pair()
    items = demo_items(args.manifest, args.limit)
    keys = [file_identity_hash(it).decode() for it in items]
    transform = SlowThen(pair.deterministic, args.delay) if args.delay else pair.deterministic
    sink = open_sink("packed", cache_folder(args.cache, pair), shard_entries=args.shard_entries)
    done = prepare_cache(items, keys, transform, sink, workers=args.workers)
    s = done.stats
    return {"hits": s.hits, "decoded": s.decoded, "quarantined": s.quarantined}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--manifest", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=24)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--shard-entries", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    Path(args.out).write_text(json.dumps(run(args)))


if __name__ == "__main__":
    main()
