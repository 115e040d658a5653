"""The tracking path against a real `mlflow server` on a loopback port, with fold runs logging
concurrently from threads: parent/fold runs, model, registry, review, audit, predict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from server_helpers import free_port, stop_group, wait_until_up
from tracking_helpers import IDENTIFYING_DIR, tiny_factory, tiny_tracked_run, tiny_transform

from medtl.config import TrackingConfig
from medtl.tracking.store import OFFLINE_ENV

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120


_free_port = free_port


_stop = stop_group


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = (root / "server.log").open("wb")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | OFFLINE_ENV
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, f"{url}/health", root / "server.log", START_TIMEOUT_S, "mlflow server")
        yield {"url": url, "root": root}
    finally:
        _stop(proc)
        log.close()


def test_concurrent_folds_registry_and_predict_over_http(server):
    from medtl.inference import predict, resolve_model
    from medtl.tracking.registry import audit, register, review
    from medtl.tracking.store import make_client

    tcfg = TrackingConfig(uri=server["url"], experiment="medtl-server-test")
    tracker, run_dir, model_uri, fold_ids = tiny_tracked_run(
        tcfg, server["root"], concurrent_folds=True, n_folds=4
    )
    client = make_client(server["url"])
    assert len(set(fold_ids)) == 4
    for fid in fold_ids:
        fold = client.get_run(fid)
        assert fold.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
        assert len(client.get_metric_history(fid, "val_auroc")) == 3
        assert fold.info.status == "FINISHED"

    res = register(run_dir, "tiny-server", tcfg)  # from the run folder's run_info.json
    assert res["run_id"] == tracker.parent_run_id
    review("tiny-server", res["version"], "approve", "QA board", "", tcfg)
    info = audit("tiny-server@approved", tcfg)
    assert sorted(info["runs"]["fold_run_ids"]) == sorted(fold_ids)
    assert info["metrics"]["auroc"]["ci_high"] == pytest.approx(0.97)

    bundle = resolve_model("models:/tiny-server@approved", tcfg, model_factory=tiny_factory)
    local = resolve_model(run_dir / "model", model_factory=tiny_factory)
    images = server["root"] / IDENTIFYING_DIR / "images"
    a = predict(bundle, images, transform=tiny_transform())
    b = predict(local, images, transform=tiny_transform())
    np.testing.assert_allclose(a["prob_pos"], b["prob_pos"])

    # The artifacts went through the server into its artifact store.
    stored = {p.name for p in (server["root"] / "artifacts").rglob("*") if p.is_file()}
    assert {"weights.safetensors", "medtl_model.json", "report.md", "environment.json"} <= stored
