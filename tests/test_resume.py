"""A training process killed with SIGKILL after its first checkpoint, then resumed from last.pt,
ends with exactly the weights and metrics of an uninterrupted run (CPU, fixed seed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

JOB = Path(__file__).parent / "fit_job.py"
# Gradual unfreezing (trainable set changes between epochs), light augmentation, dropout,
# warm-up + cosine schedule and a class-balanced sampler: every source of state that a
# resume has to restore or replay.
SETTINGS = [
    "strategy.name=gradual_unfreeze",
    "strategy.head_only_epochs=1",
    "train.epochs=3",
    "train.warmup_epochs=0.5",
    "model.dropout=0.2",
    "transforms.augment=light",
    "train.checkpoint_every=1",
]


def _run(manifest, workdir, cache, out, kill_after=None):
    cmd = [
        sys.executable,
        str(JOB),
        "--manifest",
        str(manifest),
        "--workdir",
        str(workdir),
        "--cache",
        str(cache),
        "--out",
        str(out),
    ]
    for s in SETTINGS:
        cmd += ["--set", s]
    if kill_after is not None:
        cmd += ["--kill-after-epoch", str(kill_after)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_kill_and_resume_equals_uninterrupted(demo_data, tmp_path):
    cache = tmp_path / "cache"
    full = _run(demo_data.manifest_csv, tmp_path / "full", cache, tmp_path / "full.npz")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _run(demo_data.manifest_csv, tmp_path / "res", cache, tmp_path / "res.npz", 0)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert not (tmp_path / "res.npz").exists()
    ck = torch.load(tmp_path / "res" / "last.pt", weights_only=True)
    assert ck["epoch"] == 0 and len(ck["history"]) == 1

    resumed = _run(demo_data.manifest_csv, tmp_path / "res", cache, tmp_path / "res.npz")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "res.npz")
    assert list(a["epochs_run"]) == [0, 1, 2]
    assert list(b["epochs_run"]) == [1, 2]  # really resumed: epoch 0 was not trained again
    assert a["history"].shape == (3, 4)
    np.testing.assert_array_equal(a["history"], b["history"])  # losses, AUROC, lr per epoch
    assert int(a["best_epoch"]) == int(b["best_epoch"])
    np.testing.assert_array_equal(a["val_probs"], b["val_probs"])
    weights = [k for k in a.files if k.startswith("w/")]
    assert len(weights) > 100
    for k in weights:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
