"""Nested model selection and recalibration: nothing is chosen on the fold that is reported.

- Optimism check: pure-noise labels, many epochs, early stopping. Choosing epochs on the
  reported fold (cv.selection=outer) scores well above chance; the inner rule does not.
- Permuting fold k's labels leaves fold k's chosen epoch, calibrated probabilities and
  threshold unchanged (they come from its own training patients only).
- Recalibration lowers the demo's ECE without worsening its Brier score.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtl.config import load_config
from medtl.evaluation.calibrators import apply_calibration
from medtl.jobs import run_train
from medtl.jobs.folds import run_fold
from medtl.jobs.pooling import fold_operating_point
from medtl.jobs.prepare import prepare_data, read_inputs, split_patients
from medtl.training.distributed import DistContext

ROOT = Path(__file__).parent.parent
FE = ROOT / "pipelines/cxr_2d_feature_extraction.yaml"
QUIET = ["train.progress=false", "tracking.enabled=false", "evaluation.bootstrap=200"]
# A torch head trained for many epochs with early stopping: an epoch is chosen per fold.
TORCH_HEAD = [
    "strategy.head_trainer=torch",
    "train.epochs=40",
    "train.early_stopping_patience=8",
    "train.lr=0.05",
    "train.sampler=random",
    "train.loss=ce",
]


@pytest.fixture(scope="module")
def noise_manifest(tmp_path_factory) -> Path:
    """150 patients, one PNG of pure noise each, labels drawn at random: nothing to learn."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(7)
    rows = []
    for i in range(150):
        path = root / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
        rows.append(
            {"image": path.name, "label": rng.choice(["neg", "pos"]), "patient_id": f"p{i}"}
        )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def _noise_auroc(manifest: Path, work: Path, selection: str) -> dict:
    cfg = load_config(
        FE,
        QUIET
        + TORCH_HEAD
        + [
            "data.positive_class=pos",
            "transforms.spatial_size=[32,32]",
            "model.weights=null",
            "model.allow_random_init=true",
            "cv.folds=3",
            "evaluation.subgroups=[]",
            "evaluation.gallery_per_cell=0",
            "evaluation.calibration=none",
            f"cv.selection={selection}",
        ],
    )
    cfg.data.cache_dir = str(work / "cache")
    run_train(cfg, manifest_path=manifest, out_dir=work / selection)
    return json.loads((work / selection / "metrics.json").read_text())["pooled"]["summary"]["auroc"]


def test_selection_on_the_reported_fold_is_optimistic_and_inner_is_not(noise_manifest, tmp_path):
    outer = _noise_auroc(noise_manifest, tmp_path, "outer")
    inner = _noise_auroc(noise_manifest, tmp_path, "inner")
    assert outer["value"] > 0.6, outer  # pure noise, yet "well above chance"
    assert inner["low"] < 0.5 < inner["high"], inner  # chance, within its interval
    assert inner["value"] < outer["value"] - 0.05


@pytest.fixture(scope="module")
def demo_inputs(demo_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("selection")
    cfg = load_config(
        FE,
        QUIET
        + TORCH_HEAD
        + ["transforms.spatial_size=[64,64]", "cv.folds=3", "evaluation.gallery_per_cell=0"],
    )
    cfg.data.cache_dir = str(work / "cache")
    return cfg, work


def _fold0(cfg, manifest: Path, run_dir: Path, permute: bool):
    """Fold 0 by the inner rule, optionally with fold 0's labels shuffled among its images."""
    cfg = cfg.model_copy(deep=True)
    inputs = read_inputs(cfg, manifest)
    split_df = split_patients(inputs, cfg)
    data = prepare_data(cfg, inputs, split_df, run_dir, DistContext())
    if permute:
        fold0 = [r for r in data.records if r["fold"] == 0]
        labels = [r["label"] for r in fold0]
        for r, lab in zip(fold0, np.random.default_rng(3).permutation(labels), strict=True):
            r["label"] = int(lab)
        assert [r["label"] for r in fold0] != labels
    result = run_fold(cfg, data, 0, run_dir, DistContext())
    point = fold_operating_point([result], 0, data.task, cfg)
    return result, point, apply_calibration(point.calibration, result.probs, data.task)


def test_permuting_a_folds_labels_changes_nothing_chosen_for_it(demo_data, demo_inputs):
    cfg, work = demo_inputs
    a, point_a, cal_a = _fold0(cfg, demo_data.manifest_csv, work / "as_is", permute=False)
    b, point_b, cal_b = _fold0(cfg, demo_data.manifest_csv, work / "permuted", permute=True)
    assert a.best_epoch == b.best_epoch
    assert point_a.threshold == point_b.threshold
    assert point_a.calibration == point_b.calibration
    np.testing.assert_array_equal(cal_a, cal_b)
    # The labels really were different: fold 0's own scores would have seen it.
    assert [r["label"] for r in a.val_records] != [r["label"] for r in b.val_records]


def test_recalibration_lowers_ece_and_keeps_brier_on_the_demo(demo_data, tmp_path):
    cfg = load_config(
        FE,
        QUIET + ["transforms.spatial_size=[64,64]", "cv.folds=3", "evaluation.gallery_per_cell=0"],
    )
    cfg.data.cache_dir = str(tmp_path / "cache")
    run_train(cfg, manifest_path=demo_data.manifest_csv, out_dir=tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    before, after = m["recalibration"]["before"], m["recalibration"]["after"]
    assert after["ece"]["value"] < before["ece"]["value"]
    assert after["brier"]["value"] <= before["brier"]["value"]
    oof = pd.read_csv(tmp_path / "run" / "oof_predictions.csv")
    assert {"uncal_prob_nodule", "prob_nodule"} <= set(oof.columns)
    bundle = json.loads((tmp_path / "run" / "model" / "medtl_model.json").read_text())
    assert bundle["calibration"]["method"] == "platt"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "before" in report and "Rule:" in report
