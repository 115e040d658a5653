"""Nested model selection and recalibration: nothing is chosen on the fold that is reported.

- Optimism check: pure-noise labels, many epochs, early stopping. Choosing epochs on the
  reported fold (cv.selection=outer) scores well above chance; the inner rule does not.
- Permuting fold k's labels leaves fold k's chosen epoch, calibrated probabilities and
  threshold unchanged (they come from its own training patients only).
- Recalibration lowers the demo's ECE without worsening its Brier score.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
    "train.epochs=30",
    "train.early_stopping_patience=15",
    "train.lr=0.3",
    "train.sampler=random",
    "train.loss=ce",
]


@pytest.fixture(scope="module")
def noise_manifest(tmp_path_factory) -> Path:
    """100 patients, one PNG of pure noise each, labels drawn at random: nothing to learn."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(7)
    rows = []
    for i in range(100):
        path = root / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
        label = ["neg", "pos"][int(rng.random() < 0.5)]
        rows.append({"image": path.name, "label": label, "patient_id": f"p{i}"})
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
            "cv.folds=5",
            "evaluation.subgroups=[]",
            "evaluation.gallery_per_cell=0",
            "evaluation.calibration=none",
            f"cv.selection={selection}",
        ],
    )
    cfg.data.cache_dir = str(work / "cache")
    run_train(cfg, manifest_path=manifest, out_dir=work / selection)
    m = json.loads((work / selection / "metrics.json").read_text())
    return {
        "pooled": m["pooled"]["summary"]["auroc"],
        "fold_mean": m["fold_summary"]["summary"]["auroc"]["mean"],
    }


def test_selection_on_the_reported_fold_is_optimistic_and_inner_is_not(noise_manifest, tmp_path):
    outer = _noise_auroc(noise_manifest, tmp_path, "outer")
    inner = _noise_auroc(noise_manifest, tmp_path, "inner")
    # Pure noise, yet each fold's epoch chosen on that fold scores well above chance.
    assert outer["fold_mean"] > 0.58, outer
    assert inner["fold_mean"] < outer["fold_mean"] - 0.08, (inner, outer)
    # Nested selection: chance, within its interval. (Pooling the fold models dilutes the
    # outer optimism, since each fold model's scores sit on its own scale: see the note.)
    assert inner["pooled"]["low"] < 0.5 < inner["pooled"]["high"], inner
    assert outer["pooled"]["value"] > inner["pooled"]["value"]


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
    meta = json.loads((tmp_path / "run" / "model" / "medtl_model.json").read_text())
    assert meta["calibration"]["method"] == "platt"
    bundle_meta_calibration = meta["calibration"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "before" in report and "Rule:" in report and "per patient" in report
    # The registered bundle predicts calibrated probabilities, and study-level rows on request.
    out = tmp_path / "preds.csv"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "medtl.cli",
            "predict",
            "--model",
            str(tmp_path / "run" / "model"),
            str(demo_data.manifest_csv),
            "--out",
            str(out),
            "--by",
            "study_id",
            "--allow-unapproved",  # the run's own bundle folder: never reviewed
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    studies = pd.read_csv(tmp_path / "preds_by_study_id.csv")
    manifest = pd.read_csv(demo_data.manifest_csv)
    assert len(studies) == manifest["study_id"].nunique()
    from medtl.inference import predict, resolve_model

    bundle = resolve_model(str(tmp_path / "run" / "model"))
    few = manifest.head(12).assign(
        image=lambda d: str(demo_data.manifest_csv.parent) + "/" + d["image"]
    )
    calibrated = predict(bundle, few)[["prob_normal", "prob_nodule"]].to_numpy()
    bundle.meta["calibration"] = None
    raw = predict(bundle, few)[["prob_normal", "prob_nodule"]].to_numpy()
    assert not np.allclose(raw, calibrated)
    np.testing.assert_allclose(
        apply_calibration(bundle_meta_calibration, raw, "binary"), calibrated, rtol=1e-6
    )
