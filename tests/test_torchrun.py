"""A real 2-process `torchrun` (gloo, CPU) `medtl train` job agrees with a single-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).parent.parent
ARGS = [
    "train",
    str(ROOT / "pipelines/cxr_2d_finetune.yaml"),
    "--set",
    "transforms.spatial_size=[48,48]",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=8",
    "--set",
    "cv.folds=2",
    "--set",
    "cv.only_folds=[0]",
    "--set",
    "evaluation.bootstrap=20",
    "--set",
    "tracking.enabled=false",
    "--set",
    "train.progress=false",
    "--set",
    "strategy.name=fine_tune",
    "--set",
    "strategy.freeze_stages=4",
]


def _torchrun() -> str:
    exe = Path(sys.executable).parent / "torchrun"
    return str(exe) if exe.exists() else shutil.which("torchrun")


@pytest.mark.integration
def test_two_process_torchrun_matches_single_process_format(demo_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDTL_CACHE_DIR": str(tmp_path / "cache")}
    single = tmp_path / "single"
    ddp = tmp_path / "ddp"
    base = ARGS + ["--manifest", str(demo_data.manifest_csv)]
    p1 = subprocess.run(
        [sys.executable, "-m", "medtl.cli", *base, "--out", str(single)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = subprocess.run(
        [
            _torchrun(),
            "--nproc_per_node=2",
            "--master_port=29533",
            "-m",
            "medtl.cli",
            *base,
            "--out",
            str(ddp),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p2.returncode == 0, (p2.stdout[-2000:], p2.stderr[-3000:])
    a = pd.read_csv(single / "oof_predictions.csv")
    b = pd.read_csv(ddp / "oof_predictions.csv")
    # Same columns, and validation covered exactly the same unique images (no padding duplicates).
    assert list(a.columns) == list(b.columns)
    assert sorted(a["image"]) == sorted(b["image"])
    assert not b["image"].duplicated().any()
    ma = json.loads((single / "metrics.json").read_text())
    mb = json.loads((ddp / "metrics.json").read_text())
    assert _keys(ma) == _keys(mb)
    # Only rank 0 wrote artifacts: one report, one model bundle.
    assert (ddp / "report.html").is_file() and (ddp / "model").is_dir()


def _keys(d, prefix=""):
    out = set()
    if isinstance(d, dict):
        for k, v in d.items():
            out |= _keys(v, f"{prefix}{k}.")
    else:
        out.add(prefix)
    return out
