"""The CLI is a thin layer: real subprocesses, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


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
    for verb in [
        "inspect",
        "manifest",
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
    ]:
        assert verb in p.stdout


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
