"""Folds as separate jobs: `medtl train --folds K` jobs running at once into one run folder,
then `--collect`, give what one uninterrupted job gives; a missing fold, a fold of another
config and a fold job of another config are refused by name; a fold job resumed with other
workers, device and cache folder keeps its checkpoint.

The concurrent fold jobs run with tracking off: two processes writing one SQLite MLflow store
lock it (a real `mlflow server` is what concurrent fold jobs need, and
test_mlflow_server.py covers concurrent fold runs against one). The tracking path of fold
jobs (joining the first job's parent run, `--collect` finishing it) is checked here with
sequential jobs on SQLite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medtl.config import load_config
from medtl.errors import ConfigError, MedtlError

ROOT = Path(__file__).parent.parent
PIPELINE = ROOT / "pipelines/cxr_2d_finetune.yaml"
# Tiny but through every stage: inner selection, calibration, refit, report, bundle.
SETTINGS = [
    "transforms.spatial_size=[32,32]",
    "train.epochs=1",
    "train.batch_size=8",
    "cv.folds=2",
    "evaluation.bootstrap=20",
    "evaluation.gallery_per_cell=0",
    "train.progress=false",
    "strategy.name=fine_tune",
    "strategy.freeze_stages=4",
    "data.num_workers=0",
]
OFF = ["tracking.enabled=false"]


def test_identity_leaves_out_where_and_how_fast_but_not_what():
    a = load_config(PIPELINE, ["train.lr=0.001"])
    b = load_config(
        PIPELINE,
        [
            "cv.only_folds=[1]",
            "data.manifest=/elsewhere/m.csv",
            "data.cache_dir=/scratch/cache",
            "data.num_workers=7",
            "data.prepare_workers=3",
            "train.device=cuda:1",
            "train.progress=false",
            "tracking.uri=http://mlflow:5000",
            "tracking.register_name=x",
        ],
    )
    assert a.identity() == b.identity()
    assert a.full_identity() != b.full_identity()
    assert "train.lr" in a.identity_view() and "data.cache_dir" not in a.identity_view()
    for what in ["train.lr=0.01", "cv.folds=3", "seed=1", "transforms.spatial_size=[64,64]"]:
        assert load_config(PIPELINE, [what]).identity() != a.identity(), what


def _cfg(*extra: str):
    return load_config(PIPELINE, [*SETTINGS, *extra])


def _train(manifest, out, *extra, **kw):
    from medtl.jobs import run_train

    return run_train(_cfg(*extra), manifest_path=manifest, out_dir=out, **kw)


def _fold_job(
    manifest: Path, out: Path, k: int | None, cache: Path, *flags: str
) -> subprocess.Popen:
    """`medtl train` as a subprocess: fold ``k`` only, or (None) the whole job. One thread
    each, so that the uninterrupted run and the fold jobs sum in the same order."""
    cmd = [sys.executable, "-m", "medtl.cli", "train", str(PIPELINE), "--manifest", str(manifest)]
    for s in [*SETTINGS, *OFF, f"data.cache_dir={cache}"]:
        cmd += ["--set", s]
    cmd += ["--out", str(out), *flags] + (["--folds", str(k)] if k is not None else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _copy_run(src: Path, dst: Path) -> Path:
    """The run folder without its checkpoints (the fold results are what collect reads)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt"))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run, and the same run as two concurrent fold jobs + --collect."""
    from medtl.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("fold_jobs")
    demo = make_demo_data(
        root / "demo", n_patients=16, image_size=48, with_3d=False, n_holdout=0, target_patients=0
    )
    cache = root / "cache"
    job = _fold_job(demo.manifest_csv, root / "whole", None, cache)
    log = job.communicate(timeout=600)[0].decode()
    assert job.returncode == 0, log[-3000:]
    whole = SimpleNamespace(run_dir=root / "whole")
    run = root / "jobs"
    procs = [_fold_job(demo.manifest_csv, run, k, cache) for k in (0, 1)]
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    assert not (run / "oof_predictions.csv").exists()  # a fold job neither pools nor reports
    assert not (run / "model").exists()
    job = _fold_job(demo.manifest_csv, run, None, cache, "--collect")
    log = job.communicate(timeout=600)[0].decode()
    assert job.returncode == 0, log[-3000:]
    collected = SimpleNamespace(run_dir=run)
    return {"root": root, "demo": demo, "cache": cache, "whole": whole, "run": run,
            "collected": collected, "logs": logs}  # fmt: skip


def test_fold_jobs_then_collect_equal_one_uninterrupted_run(runs):
    whole, run = runs["whole"].run_dir, runs["run"]
    a = (whole / "oof_predictions.csv").read_bytes()
    assert a == (run / "oof_predictions.csv").read_bytes()
    assert len(pd.read_csv(run / "oof_predictions.csv")["fold"].unique()) == 2
    # Same refit from the same folds: the registered weights are the same bytes too.
    weights = "model/weights.safetensors"
    assert (whole / weights).read_bytes() == (run / weights).read_bytes()
    assert (whole / "fold_assignments.csv").read_bytes() == (
        run / "fold_assignments.csv"
    ).read_bytes()
    # Both fold jobs shared one record: the first wrote it, the second matched it.
    record = json.loads((run / "job.json").read_text())
    assert (
        record["identity"]["config_identity"]
        == json.loads((runs["whole"].run_dir / "metrics.json").read_text())["config_identity"]
    )


def test_collect_names_a_missing_fold(runs):
    run = _copy_run(runs["run"], runs["root"] / "missing")
    (run / "folds/fold_1/result.json").unlink()
    (run / "oof_predictions.csv").unlink()  # the copy's, from the fixture's collect
    with pytest.raises(MedtlError, match=r"fold 1 has not finished") as err:
        _train(runs["demo"].manifest_csv, run, *OFF, collect_folds=True)
    assert "Folds that match: 0" in str(err.value)
    assert not (run / "oof_predictions.csv").exists()


def test_collect_names_a_fold_of_another_config_and_the_key(runs, tmp_path):
    # Fold 1 trained for real under another learning rate, in a run of its own ...
    other = tmp_path / "other_lr"
    _train(runs["demo"].manifest_csv, other, *OFF, "train.lr=0.05", folds=[1])
    # ... then dropped into the run folder whose other fold used the default.
    run = _copy_run(runs["run"], tmp_path / "mixed")
    shutil.rmtree(run / "folds/fold_1")
    shutil.copytree(other / "folds/fold_1", run / "folds/fold_1")
    with pytest.raises(MedtlError) as err:
        _train(runs["demo"].manifest_csv, run, *OFF, collect_folds=True)
    msg = str(err.value)
    assert "fold 1 was trained under another config" in msg
    assert "train.lr: 0.001 here, 0.05 in fold 1" in msg
    assert "fold 0" not in msg.split("Folds that match")[0]


def test_a_fold_job_of_another_config_is_refused_before_training(runs):
    run = runs["run"]
    before = (run / "folds/fold_1/result.json").read_bytes()
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.05 here, 0\.001 there"):
        _train(runs["demo"].manifest_csv, run, *OFF, "train.lr=0.05", folds=[1])
    assert (run / "folds/fold_1/result.json").read_bytes() == before


def test_resumed_fold_job_with_other_workers_device_and_cache_keeps_its_checkpoint(runs):
    """A fold job killed after its last checkpoint (no result yet), restarted where only
    where/how-fast settings differ: last.pt is accepted, not trained over."""
    run = runs["run"]
    fold = run / "folds/fold_0"
    kept = pd.read_csv(run / "oof_predictions.csv").query("fold == 0")
    (fold / "result.json").unlink()
    last = fold / "last.pt"
    stamp, data = last.stat().st_mtime_ns, last.read_bytes()
    out = _train(
        runs["demo"].manifest_csv,
        run,
        *OFF,
        "data.num_workers=1",
        "train.device=cpu",
        f"data.cache_dir={runs['root'] / 'other_cache'}",
        folds=[0],
    )
    assert out.folds_run == [0]
    assert last.stat().st_mtime_ns == stamp and last.read_bytes() == data  # not retrained
    stored = json.loads((fold / "result.json").read_text())
    assert [r["image"] for r in stored["val_records"]] == kept["image"].tolist()
    probs = np.load(fold / "result.npz")["probs"]  # the resumed model's, predicted afresh
    np.testing.assert_allclose(probs[:, 1], kept["uncal_prob_nodule"], rtol=1e-6)


def test_bad_fold_flags_are_refused_naming_the_flag(runs, tmp_path):
    from medtl.cli import main

    base = ["train", str(PIPELINE), "--manifest", str(runs["demo"].manifest_csv)]
    both = CliRunner().invoke(
        main, [*base, "--out", str(tmp_path / "x"), "--folds", "0", "--collect"]
    )
    assert both.exit_code == 2 and "--folds and --collect exclude each other" in both.output
    no_out = CliRunner().invoke(main, [*base, "--folds", "0"])
    assert no_out.exit_code == 2 and "--folds needs --out" in no_out.output
    bad = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "x"), "--folds", "zero"])
    assert bad.exit_code == 2 and "--folds takes fold numbers" in bad.output
    with pytest.raises(ConfigError, match=r"--folds 5: no such fold; this split has folds 0, 1"):
        _train(runs["demo"].manifest_csv, tmp_path / "y", *OFF, folds=[5])
    assert not (tmp_path / "y" / "job.json").exists()
    with pytest.raises(MedtlError, match="holds no fold jobs"):
        _train(runs["demo"].manifest_csv, tmp_path / "z", *OFF, collect_folds=True)


def test_fold_jobs_join_one_parent_run_that_collect_finishes(runs, tmp_path):
    """Sequential fold jobs on SQLite: one parent run, one child per fold; collect logs each
    fold's metrics on the fold jobs' runs and the pooled ones on the parent, and ends it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = [f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path / 'art'}"]
    track += ["tracking.log_model=false", f"data.cache_dir={runs['cache']}"]
    run = tmp_path / "tracked"
    for k in (0, 1):
        _train(runs["demo"].manifest_csv, run, *track, folds=[k])
    parent = json.loads((run / "job.json").read_text())["parent_run_id"]
    client = MlflowClient(uri)
    assert client.get_run(parent).info.status == "RUNNING"  # open until collect
    out = _train(runs["demo"].manifest_csv, run, *track, collect_folds=True)
    assert out.parent_run_id == parent
    runs_ = client.search_runs([client.get_run(parent).info.experiment_id])
    assert sorted(r.data.tags.get("medtl.run_kind") for r in runs_) == ["fold", "fold", "parent"]
    folds = {
        r.data.tags["medtl.fold"]: r for r in runs_ if r.data.tags.get("medtl.run_kind") == "fold"
    }
    assert set(folds) == {"0", "1"}
    for r in folds.values():
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert r.info.status == "FINISHED"
        assert "train_loss" in r.data.metrics  # logged by its fold job
        assert "n" in r.data.metrics  # the report's per-fold metrics, logged by collect
    p = client.get_run(parent)
    assert p.info.status == "FINISHED" and "n" in p.data.metrics
