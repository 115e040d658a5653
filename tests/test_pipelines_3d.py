"""The CT pipelines (2.5D and 3D) run end to end on the demo NIfTI volumes, and the 3D model
learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from medtl.config import load_config

ROOT = Path(__file__).parent.parent

# The demo CT set is 12 volumes: a 2-fold model trains on 6 patients, too few for an inner
# validation split that holds both classes (cv.selection=inner then cannot choose a
# threshold), so these smoke runs select on the outer fold.
COMMON = [
    "cv.folds=2",
    "cv.selection=outer",
    "evaluation.bootstrap=20",
    "tracking.enabled=false",
    "train.progress=false",
]
# 3D from random init on 6 volumes: with the pipeline's light augmentation the training loss
# stays at chance for 8+ epochs; without it, 6 epochs bring it clearly down (5 seeds tried).
LEARN_3D = ["train.epochs=6", "transforms.augment=none", "train.early_stopping_patience=null"]


@pytest.mark.parametrize(
    "pipeline, extra",
    [
        ("ct_2p5d_finetune.yaml", ["transforms.spatial_size=[48,48]", "train.epochs=1"]),
        ("ct_3d_densenet.yaml", ["transforms.spatial_size=[64,64,32]", *LEARN_3D]),
    ],
)
def test_ct_pipeline_runs_on_demo_volumes(pipeline, extra, demo_data, tmp_path):
    from medtl.jobs import run_train

    cfg = load_config(ROOT / "pipelines" / pipeline, extra + COMMON)
    out = run_train(cfg, manifest_path=demo_data.manifest_3d_csv, out_dir=tmp_path / "run")
    n = len(pd.read_csv(demo_data.manifest_3d_csv))
    oof = pd.read_csv(out.run_dir / "oof_predictions.csv")
    assert len(oof) == n and oof["image"].is_unique
    assert oof[["prob_normal", "prob_nodule"]].sum(axis=1).round(5).eq(1).all()
    pooled = json.loads((out.run_dir / "metrics.json").read_text())["pooled"]
    assert pooled["n"] == n and 0 <= pooled["summary"]["auroc"]["value"] <= 1
    assert (out.run_dir / "model" / "weights.safetensors").is_file()

    histories = [pd.read_csv(f) for f in sorted(out.run_dir.glob("folds/fold_*/history.csv"))]
    assert len(histories) == 2
    for h in histories:
        assert h["epoch"].tolist() == list(range(cfg.train.epochs))
    if cfg.model.backbone == "densenet121_3d":
        # The model learns: in every fold the training loss of the last two epochs is below
        # that of the first two, and on average below ln 2, the loss of a constant prediction
        # under the class-balanced sampler. (Out-of-fold AUROC cannot show it: 12 volumes
        # give a CI about 0.6 wide.)
        last = [h["train_loss"].iloc[-2:].mean() for h in histories]
        first = [h["train_loss"].iloc[:2].mean() for h in histories]
        assert all(lo < hi for lo, hi in zip(last, first, strict=True)), (first, last)
        assert sum(last) / len(last) < math.log(2), last
