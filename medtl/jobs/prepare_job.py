"""The `medtl prepare` job: the train job's data stages alone, so a large export is decoded
into the cache once, before the jobs that read it.

Why apart: fold jobs started together on a cold cache would each decode every image (k times
the work); a CPU node can fill the cache while the GPU box is busy. The stages, the cache keys
and the quarantine are those of `medtl train` with the same pipeline and ``--set`` values, so
its prepare stage then finds every image cached.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medtl.config import PipelineConfig
from medtl.data import write_quarantine
from medtl.jobs.prepare import prepare_data, read_inputs, split_patients
from medtl.jobs.train import make_run_dir, resolve_job


@dataclass
class PrepareOutcome:
    """What ``run_prepare`` did, as ``prepare.json`` in the run folder records it."""

    run_dir: str
    cache_dir: str
    images: int  # manifest rows
    ready: int  # decoded now or already cached: what training will read
    quarantined: int  # listed in quarantine.csv
    manifest_hash: str
    seconds: float


def run_prepare(
    cfg: PipelineConfig,
    *,
    manifest_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> PrepareOutcome:
    """Read and check the manifest, split it, decode every image into the cache; write
    ``quarantine.csv`` and ``prepare.json`` into the run folder (rank 0 under torchrun, each
    rank decoding its share).

    Raises ConfigError/ManifestError as `medtl train` would, before any decoding.
    """
    from medtl.training.distributed import init_distributed

    t0 = time.perf_counter()
    dist = init_distributed()
    manifest = resolve_job(cfg, manifest_path, None)
    run_dir = make_run_dir(cfg, out_dir, dist)
    inputs = read_inputs(cfg, manifest)
    data = prepare_data(cfg, inputs, split_patients(inputs, cfg), run_dir, dist)
    outcome = PrepareOutcome(
        run_dir=str(run_dir),
        cache_dir=str(data.cache_dir),
        images=len(inputs.records),
        ready=len(data.records),
        quarantined=len(data.quarantine),
        manifest_hash=data.manifest_hash,
        seconds=round(time.perf_counter() - t0, 2),
    )
    if dist.is_main:
        write_quarantine(data.quarantine, run_dir / "quarantine.csv")
        (run_dir / "prepare.json").write_text(json.dumps(asdict(outcome), indent=2) + "\n")
    if dist.world_size > 1:
        dist.barrier()
    return outcome
