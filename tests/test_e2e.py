"""The whole product on real demo files: train -> report -> register -> review -> audit -> predict.

One CPU smoke run of the main job (lightning-hydra-template habit), against the embedded
SQLite MLflow store, followed by the PHI search over the entire tracking store.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from medtl.config import load_config

ROOT = Path(__file__).parent.parent
FAST = [
    "transforms.spatial_size=[64,64]",
    "cv.folds=3",
    "evaluation.bootstrap=50",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """One feature-extraction run registered in a fresh SQLite store."""
    from medtl.jobs import run_train

    work = tmp_path_factory.mktemp("e2e")
    # A hospital export always has a bad file: a truncated DICOM joins the demo manifest.
    manifest = pd.read_csv(demo_data.manifest_csv)
    good = demo_data.manifest_csv.parent / manifest.loc[0, "image"]
    bad = work / "export" / "truncated_IM9999.dcm"  # outside the shared demo tree
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[:2000])
    extra = manifest.iloc[[0]].assign(image=str(bad))  # absolute paths are allowed
    manifest_path = demo_data.manifest_csv.parent / "manifest_with_bad_file.csv"
    pd.concat([manifest, extra]).to_csv(manifest_path, index=False)
    cfg = load_config(ROOT / "pipelines/cxr_2d_feature_extraction.yaml", FAST)
    cfg.tracking.uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg.tracking.artifact_location = str(work / "mlartifacts")
    cfg.data.cache_dir = str(work / "cache")
    outcome = run_train(
        cfg,
        manifest_path=manifest_path,
        out_dir=work / "run",
        register_name="demo-cxr",
    )
    return work, cfg, outcome


def test_run_writes_every_report_file(trained):
    work, cfg, outcome = trained
    run = outcome.run_dir
    for name in [
        "config.yaml",
        "run_info.json",
        "fold_assignments.csv",
        "oof_predictions.csv",
        "quarantine.csv",
        "metrics.json",
        "report.md",
        "report.html",
    ]:
        assert (run / name).is_file(), name
    oof = pd.read_csv(run / "oof_predictions.csv")
    assert {"image", "patient_id", "fold", "label", "prob_normal", "prob_nodule", "pred"} <= set(
        oof.columns
    )
    # Every non-test image gets exactly one out-of-fold prediction.
    folds = pd.read_csv(run / "fold_assignments.csv")
    # (the quarantined file keeps its fold assignment but has no prediction)
    assert len(oof) == int((folds["split"] != "test").sum()) - 1
    assert oof.groupby("patient_id")["fold"].nunique().max() == 1
    # Real ImageNet features beat chance on the demo finding.
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.dumps(metrics)  # JSON-serialisable
    assert outcome.metrics


def test_corrupt_file_is_quarantined_named_and_reported(trained):
    run = trained[2].run_dir
    q = pd.read_csv(run / "quarantine.csv")
    assert list(q["path"].map(lambda p: Path(p).name)) == ["truncated_IM9999.dcm"]
    assert q["reason"].str.len().min() > 5
    assert "truncated_IM9999.dcm" in (run / "report.md").read_text()
    assert trained[2].n_quarantined == 1


def test_report_regenerates_from_stored_predictions(trained):
    run = trained[2].run_dir
    before = (run / "metrics.json").read_text()
    (run / "report.html").unlink()
    p = subprocess.run(
        [sys.executable, "-m", "medtl.cli", "report", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert (run / "report.html").is_file()
    assert json.loads((run / "metrics.json").read_text()) == json.loads(before)


def test_report_html_is_standalone(trained):
    html = (trained[2].run_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']https?://""", html)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert images, "plots must be embedded"
    assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CI" in html or "95%" in html


def test_register_review_audit_predict(trained, demo_data, tmp_path):
    from medtl.inference import predict, resolve_model
    from medtl.tracking.registry import audit, render_audit, review

    work, cfg, outcome = trained
    assert outcome.registered is not None
    version = str(
        outcome.registered["version"]
        if isinstance(outcome.registered, dict)
        else outcome.registered.version
    )
    review("demo-cxr", version, "approve", "Dr. Test Reviewer", "looks fine", cfg.tracking)
    info = audit("demo-cxr@approved", cfg.tracking)
    text = render_audit(info)
    assert "Dr. Test Reviewer" in text
    assert outcome.metrics and info
    assert cfg.model.backbone in text
    # Predict from the registry on held-out demo data; reproduces the local bundle's output.
    bundle = resolve_model("models:/demo-cxr@approved")
    preds = predict(bundle, demo_data.holdout_manifest_csv)
    local = predict(resolve_model(str(outcome.bundle_dir)), demo_data.holdout_manifest_csv)
    assert list(preds.columns[:1]) == ["image"] and "pred" in preds.columns
    pd.testing.assert_frame_equal(preds, local)


def test_evaluate_reproduces_predict(trained, demo_data, tmp_path):
    """`medtl evaluate` on held-out data scores exactly what `medtl predict` outputs."""
    work, cfg, outcome = trained
    env_uri = cfg.tracking.uri
    preds_csv = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "medtl.cli"]
    env = {"MLFLOW_TRACKING_URI": env_uri}
    import os

    env = {**os.environ, **env}
    p = subprocess.run(
        cmd
        + [
            "predict",
            "--model",
            "models:/demo-cxr/1",
            str(demo_data.holdout_manifest_csv),
            "--out",
            str(preds_csv),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    e = subprocess.run(
        cmd
        + [
            "evaluate",
            "--model",
            "models:/demo-cxr/1",
            "--manifest",
            str(demo_data.holdout_manifest_csv),
            "--out",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert e.returncode == 0, e.stderr
    preds = pd.read_csv(preds_csv)
    evald = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    merged = preds.merge(evald, on="image", suffixes=("", "_eval"))
    assert len(merged) == len(preds)
    assert (merged["prob_nodule"] - merged["prob_nodule_eval"]).abs().max() < 1e-6


def test_no_phi_anywhere_in_tracking_store(trained, demo_data):
    """Every identifying header value of the demo data is absent from DB and artifacts."""
    from medtl.demo_data import demo_phi_values
    from medtl.tracking.phi_search import find_in_store

    work, cfg, outcome = trained
    values = demo_phi_values(demo_data)
    assert len(values) > 20
    hits = find_in_store(values, work / "mlflow.db", work / "mlartifacts")
    assert hits == []
    # The run folder and the model bundle too.
    for f in list(outcome.run_dir.rglob("*")):
        if f.is_file() and f.suffix in {".csv", ".json", ".md", ".html", ".yaml", ".txt"}:
            text = f.read_text(errors="ignore")
            leaked = [v for v in values if v in text]
            assert not leaked, f"{f}: {leaked[:3]}"
    # The store really holds the run (the search is not vacuous).
    con = sqlite3.connect(work / "mlflow.db")
    assert con.execute("select count(*) from runs").fetchone()[0] >= 4
