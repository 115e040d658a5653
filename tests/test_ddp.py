"""A real 2-process `torchrun` (gloo, CPU) job of `fit` completes, and its gathered validation
probabilities have the single-process format: N unique rows in dataset order."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

JOB = Path(__file__).parent / "fit_job.py"


def _torchrun() -> str:
    exe = Path(sys.executable).parent / "torchrun"
    return str(exe) if exe.exists() else shutil.which("torchrun")


@pytest.mark.integration
@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy.name=fine_tune", "strategy.freeze_stages=3", "train.epochs=1"],
        ["strategy.name=feature_extraction"],
    ],
    ids=["fine_tune", "feature_extraction"],
)
def test_torchrun_fit_gathers_val_probs_in_order(demo_data, tmp_path, strategy):
    cmd = [
        _torchrun(),
        "--nproc_per_node=2",
        "--master_port=29547",
        str(JOB),
        "--manifest",
        str(demo_data.manifest_csv),
        "--workdir",
        str(tmp_path / "w"),
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "ddp.npz"),
    ]
    for s in strategy:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    r = np.load(tmp_path / "ddp.npz")
    assert int(r["world_size"]) == 2
    n = len(r["val_labels"])
    # Exactly N rows (MONAI DistributedSampler(even_divisible=False): no padding duplicates) ...
    assert r["val_probs"].shape == (n, 2)
    np.testing.assert_allclose(r["val_probs"].sum(1), 1.0, atol=1e-5)
    # ... in dataset order: the same model's single-process predictions match row by row.
    np.testing.assert_allclose(r["val_probs"], r["ref_probs"], atol=1e-5)
    # Only rank 0 wrote checkpoints (one best.pt, no per-rank files).
    assert sorted(f.name for f in (tmp_path / "w").iterdir() if f.suffix == ".pt") in (
        ["best.pt"],
        ["best.pt", "last.pt"],
    )
