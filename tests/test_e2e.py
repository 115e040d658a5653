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
# Fast, yet the pooled AUROC's 95% CI excludes chance: at 64 px and 3 folds its lower bound
# was 0.50-0.70 across seeds (0.503 at the default seed); at 128 px (the frozen ImageNet
# features see the nodule better), 5 folds (more training patients per fold) and 200
# resamples (a steadier percentile) it was 0.56-0.78 over 8 seeds, 0.735 at the default.
FAST = [
    "transforms.spatial_size=[128,128]",
    "cv.folds=5",
    "evaluation.bootstrap=200",
    "train.progress=false",
]
REGISTERED = "demo-cxr"


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
        register_name=REGISTERED,
    )
    return work, cfg, outcome


def _pooled(outcome) -> dict:
    """``{metric: {value, low, high}}`` of the pooled out-of-fold results in metrics.json."""
    return json.loads((outcome.run_dir / "metrics.json").read_text())["pooled"]["summary"]


def _with_ci(m: dict, digits: int) -> str:
    """How the registry and the model card print a metric: ``value (low to high)``."""
    return f"{m['value']:.{digits}f} ({m['low']:.{digits}f} to {m['high']:.{digits}f})"


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


def test_demo_model_beats_chance_out_of_fold(trained):
    """Real ImageNet features find the demo nodule: the whole 95% CI of the pooled
    out-of-fold AUROC (patient bootstrap) lies above 0.5."""
    outcome = trained[2]
    metrics = json.loads((outcome.run_dir / "metrics.json").read_text())
    assert metrics["n_boot"] == 200 and metrics["ci"] == 0.95
    auroc = metrics["pooled"]["summary"]["auroc"]
    assert 0.5 < auroc["low"] <= auroc["value"] <= auroc["high"] <= 1, auroc
    assert metrics["pooled"]["n_patients"] == 40
    # The outcome carries the same pooled numbers the report does.
    assert outcome.metrics["pooled"]["summary"]["auroc"] == auroc


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
    import mlflow

    from medtl.inference import predict, resolve_model
    from medtl.manifest import manifest_content_hash, read_manifest
    from medtl.models.registry import LITE0_SHA256
    from medtl.tracking.registry import audit, render_audit, review

    work, cfg, outcome = trained
    pooled = _pooled(outcome)
    run_info = json.loads((outcome.run_dir / "run_info.json").read_text())
    # Registration: version 1 of the name, alias candidate, from this run's parent run.
    reg = outcome.registered
    assert reg is not None
    assert (reg["name"], reg["version"], reg["alias"]) == (REGISTERED, "1", "candidate")
    assert reg["run_id"] == outcome.parent_run_id == run_info["mlflow"]["parent_run_id"]
    assert reg["model_uri"] == f"models:/{REGISTERED}/1"
    client = mlflow.MlflowClient(cfg.tracking.uri, registry_uri=cfg.tracking.uri)

    def aliases() -> dict[str, str]:
        return {a: str(v) for a, v in client.get_registered_model(REGISTERED).aliases.items()}

    assert aliases() == {"candidate": "1"}
    tags = client.get_model_version(REGISTERED, "1").tags
    assert tags["medtl.status"] == "pending_review"
    assert tags["medtl.run_id"] == outcome.parent_run_id
    # The version carries the run's pooled metrics with their CIs, as in metrics.json.
    for name in ("auroc", "auprc", "sensitivity", "specificity"):
        assert tags[f"medtl.metric.{name}"] == _with_ci(pooled[name], 4), name
    assert tags["medtl.manifest_hash"] == run_info["manifest_hash"]
    # The model card states the AUROC with its CI.
    assert tags["medtl.model_card"] == reg["model_card"]
    card = Path(
        mlflow.artifacts.download_artifacts(
            reg["model_card"].removesuffix(".html") + ".md",
            dst_path=str(tmp_path),
            tracking_uri=cfg.tracking.uri,
        )
    ).read_text()
    assert f"| auroc | {_with_ci(pooled['auroc'], 3)} |" in card
    assert "95% confidence intervals" in card

    entry = review(REGISTERED, "1", "approve", "Dr. Test Reviewer", "looks fine", cfg.tracking)
    assert (entry["seq"], entry["decision"], entry["by"]) == (1, "approve", "Dr. Test Reviewer")
    assert aliases() == {"candidate": "1", "approved": "1"}
    info = audit(f"{REGISTERED}@approved", cfg.tracking)
    m = info["model"]
    assert (m["name"], m["version"], m["status"]) == (REGISTERED, "1", "approved")
    assert m["aliases"] == ["approved", "candidate"]
    assert m["classes"] == ["normal", "nodule"]
    assert m["threshold"] == pytest.approx(run_info["final_threshold"])
    [rev] = info["reviews"]
    assert (rev["decision"], rev["by"], rev["note"]) == (
        "approve",
        "Dr. Test Reviewer",
        "looks fine",
    )
    # Lineage: the data is this manifest (its content hash, recomputed here), the weights the
    # shipped ImageNet file, the runs this run and its five folds.
    manifest = demo_data.manifest_csv.parent / "manifest_with_bad_file.csv"
    assert info["data"]["manifest_hash"] == run_info["manifest_hash"]
    assert info["data"]["manifest_hash"] == manifest_content_hash(read_manifest(manifest))
    assert info["data"]["n_patients"] == "40"
    assert info["weights"] == {
        "backbone": cfg.model.backbone,
        "source": run_info["lineage"]["medtl.weights_source"],
        "sha256": LITE0_SHA256,
    }
    assert info["code"]["strategy"] == "feature_extraction"
    assert info["runs"]["parent_run_id"] == outcome.parent_run_id
    assert len(info["runs"]["fold_run_ids"]) == cfg.cv.folds
    auroc = info["metrics"]["auroc"]
    assert (auroc["value"], auroc["ci_low"], auroc["ci_high"]) == pytest.approx(
        (pooled["auroc"]["value"], pooled["auroc"]["low"], pooled["auroc"]["high"])
    )
    text = render_audit(info)
    assert "approve by Dr. Test Reviewer (looks fine)" in text
    assert f"manifest sha256: {run_info['manifest_hash']}" in text
    assert f"sha256: {LITE0_SHA256}" in text
    # Predict from the registry on held-out demo data; reproduces the local bundle's output.
    bundle = resolve_model(f"models:/{REGISTERED}@approved")
    preds = predict(bundle, demo_data.holdout_manifest_csv)
    local = predict(resolve_model(str(outcome.bundle_dir)), demo_data.holdout_manifest_csv)
    assert len(preds) == len(pd.read_csv(demo_data.holdout_manifest_csv))
    assert list(preds.columns[:1]) == ["image"] and "pred" in preds.columns
    pd.testing.assert_frame_equal(preds, local)
    # The bundle records what it was trained on: the intended-use profile `predict` checks.
    profile = bundle.meta["input_profile"]
    assert profile["modality"] == ["CR", "DX"] and profile["body_part"] == ["CHEST"]
    assert profile["rows"] == profile["columns"] == [96, 96]


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
            "--allow-unapproved",  # this test may run alone, before the version is approved
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
    # Provenance on every row; the held-out radiographs are inside the training profile.
    assert (preds["model_name"] == "demo-cxr").all() and (preds["model_version"] == 1).all()
    assert preds["model_sha256"].str.len().eq(64).all() and preds["out_of_profile"].isna().all()
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
