"""The team setup, run for real: PostgreSQL on loopback, `mlflow server` on it, two `medtl
train` jobs logging their fold runs at the same time, then register, review and audit.

PostgreSQL comes from Debian's `postgresql` package, installed by scripts/system_deps.sh
(the Makefile's test target; this fixture also calls it). Where it cannot be installed or
started the test is skipped with the reason, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from server_helpers import free_port, stop_group, wait_until_up

from medtl.tracking.store import OFFLINE_ENV

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parent.parent
START_TIMEOUT_S = 180
# The fast train settings of the other end-to-end tests, smaller still: this test is about
# the tracking path, not the model.
TRAIN_FAST = [
    "transforms.spatial_size=[32,32]",
    "cv.folds=2",
    "evaluation.bootstrap=20",
    "evaluation.gallery_per_cell=0",
    "train.progress=false",
    "tracking.experiment=medtl-postgres",
]
AUDIT_KEY = "test-audit-key-not-secret-0123456789abcdef"  # >= 32 characters


def _unavailable(reason: str) -> None:
    """Skip with the reason; under CI the project's own files must have installed it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: scripts/system_deps.sh must install it)")
    pytest.skip(reason)


_free_port = free_port


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's bin folder, installing the package if missing."""

    def find() -> list[str]:
        return sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))

    if not find():
        subprocess.run(["bash", str(ROOT / "scripts" / "system_deps.sh")], timeout=900)
    found = find()
    if not found:
        _unavailable("PostgreSQL is not installed (apt-get install postgresql needs root)")
    return Path(found[-1]).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        _unavailable(f"{what} failed ({p.returncode}): {(p.stderr or p.stdout)[-1500:]}")


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth), database ``mlflow``."""
    try:
        import psycopg2  # noqa: F401  (MLflow's PostgreSQL driver)
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install psycopg2-binary, the dev extra)")
    bin_dir = _pg_bin()
    # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="medtl-pg-"))
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    _run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow"]), "initdb")  # fmt: skip
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        _run(_as_postgres([*ctl, "-o", opts, "-l", str(root / "pg.log"), "-w", "start"]), "pg_ctl start")  # fmt: skip
        _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"], "createdb")  # fmt: skip
        yield {"dsn": f"postgresql://mlflow@127.0.0.1:{port}/mlflow", "port": port}
    finally:
        subprocess.run(_as_postgres([*ctl, "-m", "immediate", "-w", "stop"]), capture_output=True, timeout=120)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    stop_group(proc, grace_s=5)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """`mlflow server` with the PostgreSQL backend store and proxied artifacts, two workers."""
    root = tmp_path_factory.mktemp("pg_mlflow")
    port = _free_port()
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | OFFLINE_ENV
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        # SQLAlchemy's plain postgresql:// means psycopg 3 here; the driver is psycopg2.
        "--backend-store-uri", postgres["dsn"].replace("postgresql://", "postgresql+psycopg2://"),
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "2",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(proc, f"{url}/health", log_path, START_TIMEOUT_S, "mlflow server")
            yield {"url": url, "root": root, "db": postgres["dsn"]}
        finally:
            _stop(proc)


def _medtl_env(server) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": server["url"],
        "MEDTL_AUDIT_KEY": AUDIT_KEY,
        "MEDTL_AUDIT_ANCHOR": str(server["root"] / "audit_anchors.json"),  # not in ~/.config
        "MEDTL_PSEUDONYM_SALT": "test-salt-not-secret",
    }


def _medtl(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medtl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _two_trains_at_once(server, work: Path) -> list[Path]:
    """Two `medtl train` processes against the server at the same time (the first registers
    its model as ``pg-model``); their run folders."""
    env = _medtl_env(server)
    data = work / "data"
    made = _medtl("demo-data", str(data), "--patients", "16", "--size", "32", env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    pipeline = ROOT / "pipelines" / "cxr_2d_feature_extraction.yaml"
    sets = [a for kv in TRAIN_FAST for a in ("--set", kv)]
    base = [sys.executable, "-m", "medtl.cli", "train", str(pipeline)]
    base += ["--manifest", str(data / "manifest.csv"), *sets]
    jobs = {
        work / "run_a": ["--set", "seed=1", "--register", "pg-model"],
        work / "run_b": ["--set", "seed=2"],
    }
    procs = [
        subprocess.Popen(
            [*base, "--out", str(out), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for out, extra in jobs.items()
    ]
    for p in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-3000:]
    return list(jobs)


def test_two_trains_log_folds_concurrently_then_register_review_audit(server, tmp_path):
    import psycopg2

    from medtl.tracking.store import make_client

    runs = _two_trains_at_once(server, tmp_path)
    infos = [json.loads((r / "run_info.json").read_text()) for r in runs]
    parents = [i["mlflow"]["parent_run_id"] for i in infos]
    assert all(i["mlflow"]["tracking_uri"] == server["url"] for i in infos)
    client = make_client(server["url"])
    exp = client.get_experiment_by_name("medtl-postgres")
    folds = {}
    for pid in parents:
        children = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pid}'"
        )
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        folds[pid] = sorted(c.info.run_id for c in children)
    # The two jobs' fold runs were open at the same time: their lifetimes overlap.
    spans = [
        (min(r.info.start_time for r in rs), max(r.info.end_time for r in rs))
        for rs in ([client.get_run(f) for f in folds[p]] for p in parents)
    ]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    # Everything went to PostgreSQL: 2 parent + 4 fold runs in its `runs` table.
    with psycopg2.connect(server["db"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (exp.experiment_id,))
        assert cur.fetchone()[0] == 6

    env = _medtl_env(server)
    aliases = client.get_registered_model("pg-model").aliases  # registered by the first train
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1"}
    rev = _medtl("review", "pg-model", "1", "--approve", "--by", "Dr. QA", "--note", "ok", env=env)
    assert rev.returncode == 0, rev.stderr[-2000:]
    aud = _medtl("audit", "pg-model@approved", "--json", env=env)
    assert aud.returncode == 0, aud.stderr[-2000:]
    info = json.loads(aud.stdout)
    assert info["model"]["version"] == "1" and "approved" in info["model"]["aliases"]
    assert info["runs"]["parent_run_id"] == parents[0]
    assert sorted(info["runs"]["fold_run_ids"]) == folds[parents[0]]
    assert info["runs"]["tracking_uri"] == server["url"]
    assert info["data"]["manifest_hash"] == infos[0]["manifest_hash"]
    assert [r["by"] for r in info["reviews"]] == ["Dr. QA"]
    # The bundle's files went through the server into its artifact store.
    stored = {p.name for p in (server["root"] / "artifacts").rglob("*") if p.is_file()}
    assert {"weights.safetensors", "medtl_model.json", "report.html"} <= stored
