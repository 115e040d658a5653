"""The CLI is a thin layer: real subprocesses, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pydicom
import pytest
import yaml

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ROOT = Path(__file__).parent.parent


def medtl(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medtl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_every_verb():
    p = medtl("--help")
    assert p.returncode == 0
    # The command names: first word of each two-space-indented line after "Commands:"
    # (wrapped help text is indented further).
    listing = p.stdout.split("\nCommands:\n", 1)[1]
    commands = set(re.findall(r"^  (\S+)", listing, flags=re.MULTILINE))
    for verb in [
        "inspect",
        "manifest",
        "prepare",
        "train",
        "report",
        "evaluate",
        "predict",
        "register",
        "review",
        "audit",
        "weights",
        "demo",
        "demo-data",
        "config",
    ]:
        assert verb in commands, (verb, sorted(commands))


def test_inspect_reads_a_real_ct_and_writes_a_preview(tmp_path):
    png = tmp_path / "ct.png"
    p = medtl("inspect", str(TEST_FILES / "CT_small.dcm"), "--json", "--png", str(png))
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["modality"] == "CT"
    assert png.read_bytes()[:4] == b"\x89PNG"
    # No identifying header value of the file reaches the output.
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    for value in [str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)]:
        assert value not in p.stdout


def test_inspect_unreadable_file_is_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes()[:3000])
    p = medtl("inspect", str(bad))
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "broken.dcm" in lines[0]


def test_manifest_validate_exit_codes(demo_data, tmp_path):
    ok = medtl("manifest", "validate", str(demo_data.manifest_csv))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "content hash" in ok.stdout
    df = pd.read_csv(demo_data.manifest_csv)
    df["image"] = [str(demo_data.manifest_csv.parent / p) for p in df["image"]]
    df.loc[0, "image"] = str(tmp_path / "does" / "not" / "exist.dcm")
    bad = tmp_path / "bad_manifest.csv"
    df.to_csv(bad, index=False)
    p = medtl("manifest", "validate", str(bad))
    assert p.returncode == 1
    assert "exist.dcm" in p.stdout


def test_manifest_scan_cli(demo_data, tmp_path):
    out = tmp_path / "scanned.csv"
    p = medtl(
        "manifest",
        "scan",
        str(demo_data.dicom_dir),
        "--labels",
        str(demo_data.labels_csv),
        "--key",
        "AccessionNumber",
        "--out",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    scanned = pd.read_csv(out)
    assert len(scanned) == len(pd.read_csv(demo_data.manifest_csv))
    assert {"image", "label", "patient_id"} <= set(scanned.columns)


def test_config_command_prints_resolved_yaml():
    p = medtl("config", "pipelines/cxr_2d_finetune.yaml", "--set", "train.epochs=3")
    assert p.returncode == 0, p.stderr
    assert "epochs: 3" in p.stdout and "gradual_unfreeze" in p.stdout


def test_weights_list_shows_the_verified_default():
    p = medtl("weights", "list")
    assert p.returncode == 0, p.stderr
    assert "tf_efficientnet_lite0" in p.stdout and "radimagenet_resnet50" in p.stdout
    lite0 = next(ln for ln in p.stdout.splitlines() if "tf_efficientnet_lite0 " in ln)
    assert "verified" in lite0


def test_missing_weights_error_names_file_and_folder(demo_data, tmp_path):
    p = medtl(
        "train",
        "pipelines/cxr_2d_finetune.yaml",
        "--manifest",
        str(demo_data.manifest_csv),
        "--set",
        "model.backbone=resnet50",
        "--out",
        str(tmp_path / "run"),
        env={"MEDTL_WEIGHTS_DIR": str(tmp_path / "weights"), "TORCH_HOME": str(tmp_path / "th")},
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert str(tmp_path / "weights") in p.stderr


# ---------------------------------------------------------------- demo, registry, review, audit
DEMO_NAME = "medtl-demo-cxr"
DEMO_FAST = [
    "transforms.spatial_size=[64,64]",
    "cv.folds=2",
    "evaluation.bootstrap=50",
    "evaluation.gallery_per_cell=0",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One small, fast `medtl demo` (its own SQLite store); the registry tests share it."""
    out = tmp_path_factory.mktemp("cli_demo") / "demo_run"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    sets = [a for kv in DEMO_FAST for a in ("--set", kv)]
    pipeline = ROOT / "pipelines" / "cxr_2d_feature_extraction.yaml"
    args = ["demo", "--out", str(out), "--pipeline", str(pipeline)]
    p = medtl(*args, "--patients", "32", "--size", "64", *sets, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run_info = json.loads((out / "run" / "run_info.json").read_text())
    return SimpleNamespace(out=out, env=env, proc=p, run=out / "run", run_info=run_info)


def _client(demo_run):
    import mlflow

    uri = demo_run.env["MLFLOW_TRACKING_URI"]
    return mlflow.MlflowClient(uri, registry_uri=uri)


def _aliases(client, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _pooled_auroc(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["pooled"]["summary"]["auroc"]


def test_demo_builds_data_trains_registers_and_predicts(demo_run):
    out = demo_run.out
    info = json.loads((out / "data" / "demo_info.json").read_text())
    assert (info["n_patients"], info["image_size"]) == (32, 64)  # --patients, --size
    assert pd.read_csv(out / "data" / "manifest.csv")["patient_id"].nunique() == 32
    cfg = yaml.safe_load((demo_run.run / "config.yaml").read_text())
    assert cfg["transforms"]["spatial_size"] == [64, 64]  # --set wins over the demo's own
    assert (cfg["cv"]["folds"], cfg["evaluation"]["bootstrap"]) == (2, 50)
    assert cfg["strategy"]["name"] == "feature_extraction"  # --pipeline
    assert json.loads((demo_run.run / "metrics.json").read_text())["n_boot"] == 50
    folds = pd.read_csv(demo_run.run / "fold_assignments.csv")
    assert sorted(folds["fold"].unique()) == [0, 1]
    assert (demo_run.run / "report.html").is_file()
    assert (demo_run.run / "model" / "weights.safetensors").is_file()
    preds = pd.read_csv(out / "holdout_predictions.csv")
    holdout = pd.read_csv(out / "data" / "holdout_manifest.csv")
    assert len(preds) == len(holdout) and preds["prob_nodule"].between(0, 1).all()
    # Registered as version 1 with alias candidate in the demo's store, which the printed
    # review command names.
    client = _client(demo_run)
    assert _aliases(client, DEMO_NAME)["candidate"] == "1"
    mv = client.get_model_version(DEMO_NAME, "1")
    assert mv.run_id == demo_run.run_info["mlflow"]["parent_run_id"]
    uri = demo_run.env["MLFLOW_TRACKING_URI"]
    assert f"MLFLOW_TRACKING_URI={uri} medtl review {DEMO_NAME} 1 --approve" in demo_run.proc.stdout


def test_register_cli_makes_a_candidate_version_with_the_runs_metrics(demo_run):
    p = medtl("register", str(demo_run.run), "--name", "cli-copy", env=demo_run.env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "registered cli-copy version 1 (alias: candidate)"
    client = _client(demo_run)
    assert _aliases(client, "cli-copy") == {"candidate": "1"}
    tags = client.get_model_version("cli-copy", "1").tags
    assert tags["medtl.run_id"] == demo_run.run_info["mlflow"]["parent_run_id"]
    assert tags["medtl.status"] == "pending_review"
    a = _pooled_auroc(demo_run.run)
    assert tags["medtl.metric.auroc"] == f"{a['value']:.4f} ({a['low']:.4f} to {a['high']:.4f})"
    assert tags["medtl.manifest_hash"] == demo_run.run_info["manifest_hash"]


def test_review_cli_approves_and_audit_cli_shows_reviewer_and_lineage(demo_run):
    from medtl.models.registry import LITE0_SHA256

    env = demo_run.env
    p = medtl(
        "review",
        DEMO_NAME,
        "1",
        "--approve",
        "--by",
        "Dr. CLI Reviewer",
        "--note",
        "folds checked",
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"{DEMO_NAME} version 1: approved by Dr. CLI Reviewer"
    assert _aliases(_client(demo_run), DEMO_NAME)["approved"] == "1"

    a = medtl("audit", f"{DEMO_NAME}@approved", "--json", env=env)
    assert a.returncode == 0, a.stderr
    info = json.loads(a.stdout)
    assert (info["model"]["version"], info["model"]["status"]) == ("1", "approved")
    assert "approved" in info["model"]["aliases"] and "candidate" in info["model"]["aliases"]
    rev = info["reviews"][-1]
    assert (rev["decision"], rev["by"], rev["note"]) == (
        "approve",
        "Dr. CLI Reviewer",
        "folds checked",
    )
    run_info = demo_run.run_info
    assert info["data"]["manifest_hash"] == run_info["manifest_hash"]
    assert info["data"]["n_patients"] == "32"
    assert info["weights"]["sha256"] == LITE0_SHA256
    assert info["weights"]["backbone"] == "tf_efficientnet_lite0"
    assert info["runs"]["parent_run_id"] == run_info["mlflow"]["parent_run_id"]
    assert len(info["runs"]["fold_run_ids"]) == 2
    auroc = _pooled_auroc(demo_run.run)
    assert info["metrics"]["auroc"]["ci_low"] == pytest.approx(auroc["low"])
    assert info["metrics"]["auroc"]["ci_high"] == pytest.approx(auroc["high"])


# ---------------------------------------------------------------- weights
def test_weights_convert_import_list_and_load(tmp_path, monkeypatch):
    """A Keras RadImageNet .h5 converts, imports with its sha256 recorded, is listed as
    verified, and the imported file loads tensor for tensor."""
    import torch
    from test_radimagenet import (
        _keras_layers_from_torch,
        _resnet_keras_name,
        _write_keras_h5,
        warvito_resnet50_state_dict,
    )

    from medtl.config import ModelConfig
    from medtl.models import create_model
    from medtl.models.weights import sha256_file

    wdir = tmp_path / "weights"
    env = {
        "MEDTL_WEIGHTS_DIR": str(wdir),
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
    }
    sd = warvito_resnet50_state_dict(seed=3)
    h5 = tmp_path / "RadImageNet-ResNet50_notop.h5"
    _write_keras_h5(h5, _keras_layers_from_torch(sd, _resnet_keras_name))

    converted = tmp_path / "converted" / "rin50.safetensors"
    c = medtl(
        "weights",
        "convert",
        str(h5),
        "--backbone",
        "radimagenet_resnet50",
        "--out",
        str(converted),
        env=env,
    )
    assert c.returncode == 0, c.stderr
    res = ast.literal_eval(c.stdout.strip())
    assert res["path"] == str(converted) and res["tensors"] == len(sd)
    assert res["sha256"] == sha256_file(converted)

    i = medtl("weights", "import", str(converted), "--as", "radimagenet_resnet50", env=env)
    assert i.returncode == 0, i.stderr
    imported = ast.literal_eval(i.stdout.strip())
    dest = Path(imported["path"])
    assert dest.parent == wdir and dest.suffix == ".safetensors"
    assert imported["sha256"] == sha256_file(dest) == res["sha256"]
    index = json.loads((wdir / "index.json").read_text())
    assert index[dest.name]["sha256"] == res["sha256"]

    listed = medtl("weights", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(ln for ln in listed.stdout.splitlines() if "radimagenet_resnet50 " in ln)
    # The table is 200 columns wide off a terminal: a long tmp path is shortened with "…".
    assert "verified" in row and dest.stem[:24] in row

    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(wdir))
    monkeypatch.setenv("TORCH_HOME", env["TORCH_HOME"])
    monkeypatch.setenv("HF_HUB_CACHE", env["HF_HUB_CACHE"])
    cfg = ModelConfig(backbone="radimagenet_resnet50", weights="radimagenet", in_channels=3)
    model = create_model(cfg, 2)
    assert model.weights_info["source"] == "weights_dir" and model.weights_info["verified"]
    assert model.weights_info["path"] == str(dest)
    state = model.backbone.state_dict()
    for k in ("conv1.weight", "layer2.0.downsample.1.running_var", "layer4.2.conv3.bias"):
        torch.testing.assert_close(state[k], sd[k])
