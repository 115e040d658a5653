"""`medtl compare`: paired comparison of two run folders or two models on the same patients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtl.errors import ConfigError, MedtlError
from medtl.evaluation.compare import compare_sources

CLASSES = ["normal", "nodule"]


def _scores(n_patients: int = 200, seed: int = 0) -> pd.DataFrame:
    """Several images per patient sharing a patient effect; a clean and a noisy score."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n_patients)
    pid = np.repeat([f"P{i:04d}" for i in range(n_patients)], per)
    y = np.repeat(rng.random(n_patients) < 0.4, per).astype(int)
    shared = np.repeat(rng.normal(size=n_patients), per) * 0.5
    clean = 2.0 * y + shared + rng.normal(size=len(y)) * 0.8
    noisy = clean + rng.normal(size=len(y)) * 3.0
    return pd.DataFrame(
        {"image": [f"img/{i:05d}.dcm" for i in range(len(y))], "patient_id": pid, "y": y}
    ).assign(clean=clean, noisy=noisy)


def _write_run(folder: Path, df: pd.DataFrame, score: str, threshold: float = 0.5) -> Path:
    """A run folder as `medtl train` writes it: OOF predictions (pred thresholded) + run_info."""
    folder.mkdir(parents=True)
    p = 1.0 / (1.0 + np.exp(-(df[score].to_numpy() - 1.0)))
    oof = pd.DataFrame(
        {
            "image": df["image"],
            "patient_id": df["patient_id"],
            "fold": np.arange(len(df)) % 5,
            "label": np.where(df["y"] == 1, CLASSES[1], CLASSES[0]),
            f"prob_{CLASSES[0]}": 1 - p,
            f"prob_{CLASSES[1]}": p,
            "pred": np.where(p >= threshold, CLASSES[1], CLASSES[0]),
        }
    )
    oof.to_csv(folder / "oof_predictions.csv", index=False)
    info = {
        "classes": CLASSES,
        "task": "binary",
        "fold_thresholds": {str(k): threshold for k in range(5)},
        "final_threshold": threshold,
    }
    (folder / "run_info.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    df = _scores()
    return {
        "root": root,
        "clean": _write_run(root / "run_clean", df, "clean"),
        "clean_copy": _write_run(root / "run_clean_copy", df, "clean"),
        "noisy": _write_run(root / "run_noisy", df, "noisy"),
        "df": df,
    }


def test_identical_runs_differ_by_nothing(runs, tmp_path):
    r = compare_sources(str(runs["clean"]), str(runs["clean_copy"]), out=tmp_path, n_boot=200)
    assert r.auroc.diff == 0.0 and r.auroc.delong_p == 1.0
    assert r.auroc.bootstrap_ci[0] <= 0.0 <= r.auroc.bootstrap_ci[1]
    assert r.auroc.delong_ci[0] <= 0.0 <= r.auroc.delong_ci[1]
    assert r.sensitivity.p_value == 1.0 and r.specificity.p_value == 1.0
    n = len(runs["df"])
    assert r.n_images == r.a.n_images == r.b.n_images == n
    assert r.n_patients == 200 and r.n_positive + r.n_negative == n
    assert r.a.name == "run_clean" and r.a.threshold is None


def test_a_known_difference_gives_a_ci_that_excludes_zero(runs, tmp_path):
    r = compare_sources(str(runs["clean"]), str(runs["noisy"]), out=tmp_path, n_boot=300)
    assert r.auroc.auc_a > r.auroc.auc_b + 0.1
    assert r.auroc.bootstrap_ci[0] > 0 and r.auroc.delong_ci[0] > 0
    assert r.auroc.delong_p < 0.001
    assert r.sensitivity.n == r.n_positive and r.specificity.n == r.n_negative
    assert r.sensitivity.rate_a is not None and r.sensitivity.a_only + r.sensitivity.b_only > 0


def test_only_shared_images_are_compared(runs, tmp_path):
    df = runs["df"]
    part = _write_run(tmp_path / "run_part", df.iloc[: len(df) // 2], "noisy")
    r = compare_sources(str(runs["clean"]), str(part), out=tmp_path / "out", n_boot=50)
    assert r.a.n_images == len(df) and r.b.n_images == r.n_images == len(df) // 2


def test_runs_without_shared_images_are_a_one_line_error(runs, tmp_path):
    other = runs["df"].assign(image=lambda d: "other/" + d["image"])
    b = _write_run(tmp_path / "run_other", other, "clean")
    with pytest.raises(MedtlError, match="share no images") as err:
        compare_sources(str(runs["clean"]), str(b), out=tmp_path / "out")
    assert "\n" not in str(err.value)


def test_shared_images_with_other_labels_are_refused(runs, tmp_path):
    flipped = runs["df"].assign(y=lambda d: 1 - d["y"])
    b = _write_run(tmp_path / "run_flipped", flipped, "clean")
    with pytest.raises(MedtlError, match=r"\d+ of \d+ shared images have a different"):
        compare_sources(str(runs["clean"]), str(b), out=tmp_path / "out")


def test_multiclass_runs_and_model_refs_without_manifest_are_refused(runs, tmp_path):
    multi = _write_run(tmp_path / "run_multi", runs["df"], "clean")
    info = json.loads((multi / "run_info.json").read_text())
    (multi / "run_info.json").write_text(json.dumps({**info, "task": "multiclass"}))
    with pytest.raises(ConfigError, match="binary tasks only"):
        compare_sources(str(runs["clean"]), str(multi), out=tmp_path / "out")
    with pytest.raises(ConfigError, match="--manifest"):
        compare_sources(str(runs["clean"]), "models:/cxr@approved", out=tmp_path / "out")


def test_report_files_are_written_standalone_and_match_the_result(runs, tmp_path):
    out = tmp_path / "cmp"
    r = compare_sources(str(runs["clean"]), str(runs["noisy"]), out=out, n_boot=100)
    assert r.markdown_path == out / "comparison.md"
    md = r.markdown_path.read_text()
    html = r.html_path.read_text()
    assert "run_clean" in md and "McNemar" in md and "resampled" in md
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html
    root = str(runs["root"])
    assert root not in md and root not in html and root not in r.json_path.read_text()
    data = json.loads(r.json_path.read_text())
    assert data == json.loads(json.dumps(r.to_dict()))
    assert data["auroc"]["diff"] == r.auroc.diff
    assert data["auroc"]["bootstrap_ci"] == list(r.auroc.bootstrap_ci)
    assert data["auroc"]["delong_p"] == r.auroc.delong_p
    assert data["sensitivity"]["p_value"] == r.sensitivity.p_value
    assert data["specificity"]["rate_b"] == r.specificity.rate_b
    assert data["counts"]["images"] == r.n_images and data["a"]["n_patients"] == r.a.n_patients


def test_mlflow_run_has_both_sources_and_the_difference(runs, tmp_path, monkeypatch):
    from medtl.tracking.store import make_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    off = compare_sources(str(runs["clean"]), str(runs["noisy"]), out=tmp_path / "o", n_boot=20)
    assert off.mlflow_run_id is None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = compare_sources(
        str(runs["clean"]), str(runs["noisy"]), out=tmp_path / "c", n_boot=50, tracking_uri=uri
    )
    run = make_client(uri).get_run(r.mlflow_run_id)
    tags = run.data.tags
    assert tags["medtl.compare.a"] == "run_clean" and tags["medtl.compare.b"] == "run_noisy"
    assert tags["medtl.run_kind"] == "comparison"
    assert run.data.metrics["auroc_diff"] == pytest.approx(r.auroc.diff)
    assert run.info.status == "FINISHED"
    names = {f.path for f in make_client(uri).list_artifacts(r.mlflow_run_id)}
    assert names == {"comparison.md", "comparison.html", "comparison.json"}
    exp = make_client(uri).get_experiment(run.info.experiment_id)
    assert exp.name == "medtl-compare"
    assert str(runs["root"]) not in json.dumps({**tags, **run.data.params})


def test_cli_compare_exits_zero_and_prints_the_table(runs, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = tmp_path / "cli"
    args = [str(runs["clean"]), str(runs["noisy"]), "--out", str(out), "--bootstrap", "50"]
    p = subprocess.run(
        [sys.executable, "-m", "medtl.cli", "compare", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert "AUROC" in p.stdout and "McNemar" in p.stdout
    assert str(out / "comparison.html") in p.stdout
    assert (out / "comparison.json").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "medtl.cli", "compare", str(runs["clean"]), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a busy small CPU, more threads spin far more than they help."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_models_on_a_manifest(demo_data, tmp_path, one_torch_thread):
    import torch

    from medtl.bundle import save_bundle
    from medtl.config import build_config
    from medtl.models import create_model

    cfg = build_config(
        {}, ["transforms.spatial_size=[32,32]", "data.positive_class=nodule", "model.weights=null"]
    )
    paths = []
    for seed, folder in ((0, tmp_path / "run_a" / "model"), (1, tmp_path / "model_b")):
        torch.manual_seed(seed)
        model = create_model(cfg.model, 2, pretrained=False).eval()
        paths.append(save_bundle(folder, model, cfg, CLASSES, "binary", 0.5 + 0.01 * seed))
    # A run folder stands for its model/ bundle when a manifest is given.
    (tmp_path / "run_a" / "oof_predictions.csv").write_text("image\n")
    (tmp_path / "run_a" / "run_info.json").write_text("{}")
    # The demo manifest's first patients (both classes), plus a row whose file is missing.
    demo = pd.read_csv(demo_data.manifest_csv, dtype=str)
    manifest = demo[demo["patient_id"].isin(demo["patient_id"].unique()[:14])].copy()
    manifest["image"] = [str(demo_data.manifest_csv.parent / p) for p in manifest["image"]]
    missing = manifest.iloc[[0]].assign(image=str(tmp_path / "gone.dcm"))
    manifest = pd.concat([manifest, missing], ignore_index=True)
    assert set(manifest["label"]) == set(CLASSES)
    manifest.to_csv(tmp_path / "holdout.csv", index=False)
    r = compare_sources(
        str(tmp_path / "run_a"),
        str(paths[1]),
        manifest=str(tmp_path / "holdout.csv"),
        out=tmp_path / "out",
        n_boot=50,
    )
    assert r.a.kind == r.b.kind == "model"
    assert r.a.name == "run_a" and r.b.name == "model_b"
    assert r.a.threshold == pytest.approx(0.5) and r.b.threshold == pytest.approx(0.51)
    assert r.a.n_unreadable == r.b.n_unreadable == 1
    assert r.n_images == r.a.n_images == len(manifest) - 1
    assert r.n_patients == 14 and r.n_positive == int((manifest["label"][:-1] == "nodule").sum())
    assert r.sensitivity.n == r.n_positive and 0.0 <= r.auroc.auc_a <= 1.0
    assert r.auroc.auc_a != r.auroc.auc_b  # two different networks
    assert r.data == "manifest holdout.csv, predicted by both models"
    assert json.loads(r.json_path.read_text())["b"]["n_unreadable"] == 1
