"""Interrupted tracking: a `medtl train` SIGKILLed while it logs to MLflow, rerun into the
same folder, leaves one FINISHED parent run and the broken one FAILED; a live fold-job
sibling's parent run is left open; a locked SQLite store is retried, then explained."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medtl.errors import MedtlError

ROOT = Path(__file__).parent.parent
PIPELINE = ROOT / "pipelines/cxr_2d_feature_extraction.yaml"
# The cheapest whole job: frozen features + logistic head, 32 px, two folds, no model logging.
SETTINGS = [
    "transforms.spatial_size=[32,32]",
    "cv.folds=2",
    "evaluation.bootstrap=20",
    "evaluation.gallery_per_cell=0",
    "evaluation.subgroups=[]",
    "train.progress=false",
    "data.num_workers=0",
    "data.prepare_workers=0",  # decode in the job's process: no decoding pool to start
    "tracking.log_model=false",
]


def _store(tmp: Path) -> list[str]:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return [f"tracking.uri={uri}", f"tracking.artifact_location={tmp / 'art'}"]


def _folder_runs(client, folder: Path) -> list:
    """Every run tagged with this run folder, in whichever experiment exists yet."""
    from medtl.tracking.interrupted import RUN_FOLDER_TAG, run_folder_id

    exp = client.get_experiment_by_name("medtl")
    if exp is None:
        return []
    tag = f"tags.`{RUN_FOLDER_TAG}` = '{run_folder_id(folder)}'"
    return list(client.search_runs([exp.experiment_id], filter_string=tag))


def _kind(runs: list, kind: str) -> list:
    return [r for r in runs if r.data.tags.get("medtl.run_kind") == kind]


def _wait_until_a_fold_run_logs(uri: str, out: Path, job: subprocess.Popen, log: Path) -> str:
    """Poll the store until the job's parent run is RUNNING and one of its fold runs has
    logged metrics: the job is then logging to MLflow. Returns the parent run id.

    The store is opened only once ``job.json`` names the parent run: before that the job
    may be creating the store's tables, and a second process doing so at the same time
    breaks mlflow's schema migration."""
    from medtl.tracking.store import make_client

    client = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert job.poll() is None, f"job ended before it logged a fold:\n{log.read_text()[-3000:]}"
        if client is None and (out / "job.json").is_file():
            client = make_client(uri)
        runs = _folder_runs(client, out) if client is not None else []
        parents = [r for r in _kind(runs, "parent") if r.info.status == "RUNNING"]
        if parents and any(r.data.metrics for r in _kind(runs, "fold")):
            return parents[0].info.run_id
        time.sleep(0.1)
    raise AssertionError(f"no fold run logged within 300 s:\n{log.read_text()[-3000:]}")


def test_a_killed_train_reruns_into_one_finished_parent_and_the_broken_one_failed(tmp_path):
    from medtl.demo_data import make_demo_data

    demo = make_demo_data(
        tmp_path / "demo", n_patients=12, image_size=32, with_3d=False, n_holdout=0,
        target_patients=0,
    )  # fmt: skip
    out, log = tmp_path / "run", tmp_path / "killed.log"
    settings = [*SETTINGS, *_store(tmp_path), f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, "-m", "medtl.cli", "train", str(PIPELINE)]
    cmd += ["--manifest", str(demo.manifest_csv), "--out", str(out)]
    for s in settings:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as fh:
        job = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        from medtl.config import load_config  # imported while the job starts up
        from medtl.jobs import run_train
        from medtl.tracking.store import make_client

        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        broken = _wait_until_a_fold_run_logs(uri, out, job, log)
        job.send_signal(signal.SIGKILL)
        assert job.wait(timeout=60) == -signal.SIGKILL
    finally:
        if job.poll() is None:
            job.kill()
    client = make_client(uri)
    assert client.get_run(broken).info.status == "RUNNING"  # killed mid-job, left open
    assert json.loads((out / "job.json").read_text())["parent_run_id"] == broken

    outcome = run_train(
        load_config(PIPELINE, settings), manifest_path=demo.manifest_csv, out_dir=out
    )

    runs = _folder_runs(client, out)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    parents = {r.info.run_id: r for r in _kind(runs, "parent")}
    new = outcome.parent_run_id
    assert set(parents) == {broken, new}
    assert [i for i, r in parents.items() if r.info.status == "FINISHED"] == [new]
    old = parents[broken]
    assert old.info.status == "FAILED"
    assert old.data.tags["medtl.interrupted"] == "true"
    assert old.data.tags["medtl.superseded_by"] == new
    children = {}
    for r in _kind(runs, "fold"):
        children.setdefault(r.data.tags["mlflow.parentRunId"], []).append(r)
    assert children[broken] and all(r.info.status == "FAILED" for r in children[broken])
    assert sorted(r.data.tags["medtl.fold"] for r in children[new]) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in children[new])
    assert json.loads((out / "job.json").read_text())["parent_run_id"] == new


_HOLD_ACTIVE = """
import fcntl, sys
fh = open(sys.argv[1], "a+")
fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
print("held", flush=True)
sys.stdin.read()
"""


def _tiny_job_record(run_dir: Path, uri: str, parent: str) -> None:
    from medtl.jobs.run_store import JobIdentity, JobRecord, write_job_record

    write_job_record(run_dir, JobRecord(JobIdentity("x", {}, {}), parent, uri))


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the tests below (a new one costs seconds of schema migrations)."""
    from medtl.tracking.store import make_client

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    make_client(uri).search_experiments()
    return uri


def test_a_live_fold_job_siblings_parent_stays_open_until_it_is_killed(tmp_path, store_uri):
    """A sibling holding the run folder's active lock (a real process) keeps its parent run
    and fold run open; once SIGKILLed, a fold job joining the parent ends the dead fold run
    but not the shared parent, and a whole job ends the parent too, naming its successor."""
    from tracking_helpers import tiny_cfg

    from medtl.config import TrackingConfig
    from medtl.jobs.run_store import ACTIVE_FILE
    from medtl.jobs.tracking import attach_tracking, start_tracking
    from medtl.manifest import ValidationReport
    from medtl.tracking.interrupted import run_folder_id
    from medtl.tracking.runs import TrainTracker
    from medtl.tracking.store import make_client

    uri = store_uri
    cfg = tiny_cfg(tracking=TrackingConfig(uri=uri, artifact_location=str(tmp_path / "art")))
    validation = ValidationReport([], [], {"images": 4, "patients": 2}, "h")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = TrainTracker(cfg.tracking, cfg, {}, run_folder_id(run_dir))
    shared = first.start()
    dead_fold = first.fold_run(0).run_id
    _tiny_job_record(run_dir, first.tracking_uri, shared)
    client = make_client(uri)

    sibling = subprocess.Popen(
        [sys.executable, "-c", _HOLD_ACTIVE, str(run_dir / ACTIVE_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert sibling.stdout is not None and sibling.stdout.readline() == b"held\n"
        busy = start_tracking(cfg, {}, validation, "h", True, print, run_dir=run_dir)
        busy.end("FINISHED")
        assert client.get_run(shared).info.status == "RUNNING"  # the sibling's, left open
        assert client.get_run(dead_fold).info.status == "RUNNING"
        sibling.send_signal(signal.SIGKILL)
        assert sibling.wait(timeout=30) == -signal.SIGKILL
    finally:
        if sibling.poll() is None:
            sibling.kill()

    joined = attach_tracking(cfg, {}, shared, print, run_dir=run_dir)
    joined.end_folds("FINISHED")
    assert client.get_run(dead_fold).info.status == "FAILED"
    assert client.get_run(shared).info.status == "RUNNING"  # fold jobs share it: kept open

    rerun = start_tracking(cfg, {}, validation, "h", True, print, run_dir=run_dir)
    new = rerun.ids["parent_run_id"]
    rerun.end("FINISHED")
    old = client.get_run(shared)
    assert old.info.status == "FAILED" and old.data.tags["medtl.superseded_by"] == new
    assert client.get_run(new).info.status == "FINISHED"


# ---------------------------------------------------------------- SQLite "database is locked"
def _locked_store(uri: str):
    """A run in the store, and a second connection to the store's file to lock it with."""
    from medtl.tracking.store import ensure_experiment, make_client, sqlite_path

    client = make_client(uri)
    run = client.create_run(ensure_experiment(client, "locks", None))
    holder = sqlite3.connect(sqlite_path(uri), isolation_level=None, check_same_thread=False)
    return run.info.run_id, holder


# SQLite's own busy wait off: every locked call fails at once, so the retries are what waits.
NO_BUSY_WAIT = {"busy_ms": 0}


def test_a_lock_released_after_half_a_second_is_waited_out_by_retrying(store_uri, caplog):
    from medtl.tracking.lock_retry import LockRetry
    from medtl.tracking.store import make_client

    run_id, holder = _locked_store(store_uri)
    # Pauses 0.1, 0.2, 0.4 ... s: the lock goes after 0.5 s, long before the 8th try.
    client = make_client(store_uri, LockRetry(tries=8, first_s=0.1, **NO_BUSY_WAIT))
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.5, lambda: holder.execute("ROLLBACK"))
    release.start()
    try:
        with caplog.at_level(logging.WARNING, logger="medtl"):
            client.set_tag(run_id, "medtl.note", "written after the lock")
    finally:
        release.join()
        holder.close()
    retries = [r for r in caplog.records if "is locked (try" in r.getMessage()]
    assert 1 <= len(retries) <= 7  # it did wait, and got through before running out
    assert client.get_run(run_id).data.tags["medtl.note"] == "written after the lock"


def test_a_store_locked_throughout_says_to_use_a_tracking_server(store_uri, caplog):
    from mlflow.exceptions import MlflowException

    from medtl.tracking.lock_retry import DEFAULT_RETRY, LockRetry
    from medtl.tracking.store import make_client

    assert 5 <= DEFAULT_RETRY.worst_case_s() <= 8 and DEFAULT_RETRY.tries == 6  # ~6 s
    run_id, holder = _locked_store(store_uri)
    client = make_client(store_uri, LockRetry(tries=4, first_s=0.05, **NO_BUSY_WAIT))
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING, logger="medtl"), pytest.raises(MedtlError) as err:
            client.set_tag(run_id, "medtl.note", "never written")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    msg = str(err.value)
    assert "after 4 tries" in msg and "database is locked" in msg
    assert "does not take concurrent writers" in msg
    assert "mlflow server --backend-store-uri " + store_uri in msg
    assert "docker/compose.yaml" in msg
    assert "set tracking.uri" in msg
    assert len([r for r in caplog.records if "is locked (try" in r.getMessage()]) == 3
    assert "medtl.note" not in client.get_run(run_id).data.tags
    caplog.clear()
    with pytest.raises(MlflowException):  # any other error: raised at once, not retried
        client.get_run("0" * 32)
    assert not [r for r in caplog.records if "is locked" in r.getMessage()]
