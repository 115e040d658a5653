"""MLflow tracking against the embedded SQLite store: runs, lineage, artifacts, model, registry,
prediction from the registry, and the store-wide PHI search."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from tracking_helpers import IDENTIFYING_DIR, tiny_factory, tiny_tracked_run, tiny_transform

from medtl.config import TrackingConfig
from medtl.errors import ConfigError
from medtl.tracking.lineage import collect_lineage, data_counts, git_state
from medtl.tracking.store import (
    OFFLINE_ENV,
    offline_environment,
    resolve_artifact_location,
    resolve_tracking_uri,
)


# ---------------------------------------------------------------- pure: store, lineage
def test_resolve_tracking_uri_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(TrackingConfig())
    assert default == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert (
        resolve_artifact_location(TrackingConfig(), default)
        == (tmp_path.resolve() / "mlartifacts").as_uri()
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    assert resolve_artifact_location(TrackingConfig(), "http://127.0.0.1:5000") is None
    assert resolve_tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"
    assert (
        resolve_tracking_uri(TrackingConfig(uri="store.db"))
        == f"sqlite:///{tmp_path.resolve() / 'store.db'}"
    )


@pytest.mark.parametrize("uri", ["./mlruns", "file:///tmp/mlruns"])
def test_file_store_is_refused_with_a_fix(uri):
    with pytest.raises(ConfigError, match="sqlite:///"):
        resolve_tracking_uri(TrackingConfig(uri=uri))


def test_offline_environment(monkeypatch):
    for k in OFFLINE_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # an explicit user choice is kept
    env = offline_environment()
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DO_NOT_TRACK"] == "true"
    assert env["HF_HUB_OFFLINE"] == "0"


def test_git_state(tmp_path):
    assert git_state(tmp_path) == ("unknown", "unknown")
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    run("add", "f.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    commit, dirty = git_state(tmp_path)
    assert len(commit) == 40 and dirty == "false"
    (tmp_path / "f.txt").write_text("b")
    assert git_state(tmp_path) == (commit, "true")


def test_lineage_tags_are_counts_only():
    from tracking_helpers import tiny_cfg

    # The shape medtl.manifest.validate_manifest writes, plus a stray identifier list.
    summary = {
        "images": 10,
        "patients": 4,
        "class_counts": {"pos": 3, "neg": 7},
        "patients_per_class": {"pos": 2, "neg": 3},
        "sites": {"St Elsewhere General": 10},
        "ids": ["MRN1"],
    }
    assert data_counts(summary) == {
        "n_images": 10,
        "n_patients": 4,
        "class_counts": {"neg": 7, "pos": 3},
        "patients_per_class": {"neg": 3, "pos": 2},
    }
    tags = collect_lineage(tiny_cfg(), "abc", summary, {"source": "pkg", "sha256": "9" * 64})
    assert all(isinstance(v, str) for v in tags.values())
    assert tags["medtl.data.class_counts"] == '{"neg": 7, "pos": 3}'
    assert (
        tags["medtl.weights_sha256"] == "9" * 64
        and tags["medtl.backbone"] == "tf_efficientnet_lite0"
    )
    assert "MRN1" not in json.dumps(tags) and "Elsewhere" not in json.dumps(tags)


# ---------------------------------------------------------------- SQLite store, end to end
@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqlite_store")
    tcfg = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="medtl-test")
    tracker, run_dir, model_uri, fold_ids = tiny_tracked_run(tcfg, root)
    return {
        "root": root,
        "tcfg": tcfg,
        "tracker": tracker,
        "run_dir": run_dir,
        "model_uri": model_uri,
        "folds": fold_ids,
    }


def test_parent_and_fold_runs(tracked):
    from medtl.tracking.store import make_client

    client = make_client(tracked["tracker"].tracking_uri)
    parent = client.get_run(tracked["tracker"].parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["data.manifest"] == "manifest.csv"
    assert "tracking.uri" not in parent.data.params
    assert parent.data.params["transforms.spatial_size"] == "[32, 32]"
    assert parent.data.tags["medtl.manifest_hash"] == "f" * 64
    assert parent.data.metrics["auroc_ci_low"] == pytest.approx(0.82)
    for k, fid in enumerate(tracked["folds"]):
        fold = client.get_run(fid)
        assert fold.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert fold.data.tags["medtl.fold"] == str(k) and fold.info.status == "FINISHED"
        hist = client.get_metric_history(fid, "train_loss")
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2, 3]
    inputs = parent.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.digest == ("f" * 64)[:36]
    assert json.loads(ds.profile) == {
        "manifest_hash": "f" * 64,
        "n_images": 4,
        "n_patients": 4,
        "class_counts": {"neg": 2, "pos": 2},
        "patients_per_class": {"neg": 2, "pos": 2},
    }


def test_artifacts_are_selected_and_redacted(tracked):
    import mlflow

    from medtl.tracking.store import make_client

    client = make_client(tracked["tracker"].tracking_uri)
    run_id = tracked["tracker"].parent_run_id

    def walk(path=None):
        out = []
        for f in client.list_artifacts(run_id, path):
            out += walk(f.path) if f.is_dir else [f.path]
        return out

    files = set(walk())
    assert {
        "report.md",
        "metrics.json",
        "config.yaml",
        "environment.json",
        "plots/img_00.png",
        "folds/fold_0/history.csv",
        "run_info.json",
    } <= files
    assert not any("checkpoints" in f or f.startswith("model/") for f in files)
    report = mlflow.artifacts.load_text(f"runs:/{run_id}/report.md")
    assert IDENTIFYING_DIR not in report and "<manifest_dir>/manifest.csv" in report
    env = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/environment.json"))
    assert env["packages"]["torch"] and env["packages"]["mlflow"]


def test_register_review_audit_predict(tracked, tmp_path):
    from medtl.inference import predict, resolve_model
    from medtl.tracking.registry import audit, register, render_audit, review

    tcfg = tracked["tcfg"]
    res = register(tracked["tracker"].parent_run_id, "tiny-cxr", tcfg)
    assert res["version"] == "1" and res["alias"] == "candidate"
    review("tiny-cxr", res["version"], "approve", "Dr Reviewer (radiology)", "looks fine", tcfg)

    bundle = resolve_model("models:/tiny-cxr@approved", tcfg, model_factory=tiny_factory)
    local = resolve_model(tracked["run_dir"] / "model", model_factory=tiny_factory)
    assert bundle.threshold == pytest.approx(0.42) and bundle.classes == ["neg", "pos"]
    images = tracked["root"] / IDENTIFYING_DIR / "images"
    a = predict(bundle, images, transform=tiny_transform())
    b = predict(local, images, transform=tiny_transform())
    np.testing.assert_allclose(a["prob_pos"], b["prob_pos"])
    assert list(a["pred"]) == list(b["pred"]) and a["error"].isna().all()
    for ref in (
        "models:/tiny-cxr/1",
        f"runs:/{tracked['tracker'].parent_run_id}/model",
        tracked["model_uri"],
    ):
        assert (
            resolve_model(ref, tcfg, model_factory=tiny_factory).meta["weights_sha256"]
            == bundle.meta["weights_sha256"]
        )

    info = audit("tiny-cxr", tcfg)
    assert info["ok"], info["integrity"]["breaks"]  # chain, anchor, alias, bytes verified
    assert info["model"]["version"] == "1" and info["model"]["aliases"] == ["approved", "candidate"]
    assert info["model"]["status"] == "approved" and info["model"]["threshold"] == pytest.approx(
        0.42
    )
    assert info["data"] == {
        "manifest_hash": "f" * 64,
        "n_images": "4",
        "n_patients": "4",
        "class_counts": {"neg": 2, "pos": 2},
    }
    assert info["weights"]["sha256"] == "0" * 64 and info["code"]["medtl_version"]
    assert info["metrics"]["auroc"] == {"value": 0.91, "ci_low": 0.82, "ci_high": 0.97}
    assert [r["decision"] for r in info["reviews"]] == ["approve"]
    assert sorted(info["runs"]["fold_run_ids"]) == sorted(tracked["folds"])
    text = render_audit(info)
    assert (
        "0.910 (0.820 to 0.970)" in text and "Dr Reviewer (radiology)" in text and "f" * 64 in text
    )


def test_find_in_store_reports_planted_values(tracked):
    from medtl.tracking.phi_search import find_in_store
    from medtl.tracking.store import make_client

    root = tracked["root"]
    client = make_client(tracked["tracker"].tracking_uri)
    client.set_tag(tracked["tracker"].parent_run_id, "planted", "Planted^Value-7731")
    (root / "mlartifacts" / "planted.bin").write_bytes(
        b"\x00\x01" + "planted^value-7731".encode("utf-16-le")
    )
    hits = find_in_store(
        {"PLANTED^VALUE-7731", IDENTIFYING_DIR, "MRN12345678"},
        root / "mlflow.db",
        root / "mlartifacts",
    )
    where = {(h.value, h.where, h.location.rsplit("/", 1)[-1]) for h in hits}
    assert ("PLANTED^VALUE-7731", "db", "tags.value") in where
    assert ("PLANTED^VALUE-7731", "artifact", "planted.bin") in where
    # The identifying export folder reached neither the database nor any artifact.
    assert not [h for h in hits if h.value != "PLANTED^VALUE-7731"]
    with pytest.raises(ValueError, match="too short"):
        find_in_store({"ab"}, None, None)


def test_real_backbone_bundle_through_pyfunc(demo_data, tracked):
    """The default path a user takes: real network, real transforms, MLflow pyfunc loading."""
    pytest.importorskip("medtl.models")
    pytest.importorskip("medtl.transforms")
    import mlflow
    import pandas as pd

    from medtl.bundle import load_bundle, save_bundle
    from medtl.config import PipelineConfig
    from medtl.inference import predict
    from medtl.models import create_model
    from medtl.tracking.runs import TrainTracker

    manifest = pd.read_csv(demo_data.holdout_manifest_csv).head(3)
    classes = sorted(pd.read_csv(demo_data.holdout_manifest_csv)["label"].astype(str).unique())
    cfg = PipelineConfig.model_validate({"transforms": {"spatial_size": [64, 64]}})
    cfg.data.classes, cfg.data.task = classes, "binary" if len(classes) == 2 else "multiclass"
    net = create_model(cfg.model, len(classes), spatial_dims=2, pretrained=False).eval()
    out = save_bundle(tracked["root"] / "real_model", net, cfg, classes, cfg.data.task, 0.5)
    bundle = load_bundle(out)
    images = [str(demo_data.root / p) for p in manifest["image"]]
    local = predict(bundle, images)
    assert local["error"].isna().all()

    tracker = TrainTracker(tracked["tcfg"], cfg, {"medtl.seed": "42"})
    tracker.start()
    uri = tracker.log_model(out, manifest[["image"]])
    tracker.end()
    served = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": images}))
    np.testing.assert_allclose(
        served[f"prob_{classes[-1]}"], local[f"prob_{classes[-1]}"], rtol=1e-5
    )


def test_params_carry_file_names_not_local_folders(tmp_path):
    """A home folder in model.weights_path or data.manifest must not become an MLflow param."""
    from medtl.config import build_config
    from medtl.tracking.runs import TrainTracker

    cfg = build_config(
        {},
        [
            "model.weights_path=/home/dr_smith/weights/resnet50.pth",
            "data.manifest=/data/st_marys/manifest.csv",
            "data.cache_dir=/scratch/dr_smith/cache",
        ],
    )
    params = TrainTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'x.db'}"), cfg, {})._params()
    assert params["model.weights_path"] == "resnet50.pth"
    assert params["data.manifest"] == "manifest.csv"
    assert "data.cache_dir" not in params and "tracking.uri" not in params
    assert "dr_smith" not in json.dumps(params) and "st_marys" not in json.dumps(params)


# The error a PostgreSQL-backed `mlflow server` gave when two trainings logged one manifest at
# the same moment (MLflow looks the dataset up, then inserts it).
_RACE = (
    "BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique "
    'constraint "dataset_pk" DETAIL: Key (experiment_id, name, digest)=(1, x-manifest, 847c) '
    "already exists. [SQL: INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, ...)]"
)


def test_a_dataset_logged_by_another_job_at_once_is_linked_not_fatal(tmp_path):
    from mlflow.exceptions import RestException

    from medtl.config import build_config
    from medtl.tracking.runs import TrainTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build_config({}, [f"tracking.uri={uri}"])
    first, second = (TrainTracker(cfg.tracking, cfg, {}) for _ in range(2))
    first.start(), second.start()
    first.log_dataset("ab" * 32, {"n_images": 4})  # the other job's insert, already in
    real, calls = second._client.log_inputs, []

    def racing(*args, **kwargs):  # the second job's lookup ran before that insert
        calls.append(1)
        if len(calls) == 1:
            raise RestException({"error_code": "BAD_REQUEST", "message": _RACE})
        return real(*args, **kwargs)

    second._client.log_inputs = racing
    second.log_dataset("ab" * 32, {"n_images": 4})
    assert len(calls) == 2
    for t in (first, second):
        inputs = t._client.get_run(t.parent_run_id).inputs.dataset_inputs
        assert [d.dataset.digest for d in inputs] == ["ab" * 18]

    def other_error(*args, **kwargs):
        raise RestException({"error_code": "BAD_REQUEST", "message": "INVALID_PARAMETER_VALUE"})

    second._client.log_inputs = other_error
    with pytest.raises(RestException, match="INVALID_PARAMETER_VALUE"):
        second.log_dataset("cd" * 32, None)
