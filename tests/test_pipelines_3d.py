"""The CT pipelines (2.5D and 3D) run end to end on the demo NIfTI volumes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medtl.config import load_config

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    "pipeline, extra",
    [
        ("ct_2p5d_finetune.yaml", ["transforms.spatial_size=[48,48]"]),
        ("ct_3d_densenet.yaml", ["transforms.spatial_size=[64,64,32]"]),
    ],
)
def test_ct_pipeline_runs_on_demo_volumes(pipeline, extra, demo_data, tmp_path):
    from medtl.jobs import run_train

    cfg = load_config(
        ROOT / "pipelines" / pipeline,
        extra
        + [
            "train.epochs=1",
            "cv.folds=2",
            "evaluation.bootstrap=20",
            "tracking.enabled=false",
            "train.progress=false",
        ],
    )
    out = run_train(cfg, manifest_path=demo_data.manifest_3d_csv, out_dir=tmp_path / "run")
    oof = pd.read_csv(out.run_dir / "oof_predictions.csv")
    assert len(oof) == len(pd.read_csv(demo_data.manifest_3d_csv))
    assert oof[["prob_normal", "prob_nodule"]].sum(axis=1).round(5).eq(1).all()
    assert json.loads((out.run_dir / "metrics.json").read_text())
    assert (out.run_dir / "model" / "weights.safetensors").is_file()
