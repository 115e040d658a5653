"""A registered model loads, predicts and serves in a fresh virtualenv where medtl was never
installed, from the code and requirements it was logged with.

The environment (built once per session, outside the checkout, every process started with its
working directory outside the checkout):

1. ``python -m venv`` from the same base interpreter as the test's own environment; then
   ``import medtl`` must fail there.
2. The model's own ``requirements.txt``, downloaded from the registry, is installed with
   ``pip install --no-index -r requirements.txt``. To keep the cost to seconds instead of
   downloading multi-GB torch/CUDA wheels, the distributions those requirements name, and what
   they require in turn (markers evaluated, extras followed), are made visible to the fresh
   venv as a read-only extra directory: symlinks to exactly those distributions' top-level
   entries in this test's environment, added to ``sys.path`` by a ``.pth`` file holding a plain
   directory line (which runs no code, so nothing like medtl's editable-install finder is
   loaded). pip therefore finds every pin already satisfied and installs nothing; with
   ``--no-index`` it would fail on any requirement the closure lacks. The console scripts pip
   writes for installed distributions (``mlflow``, ``uvicorn``) are written into the venv's
   ``bin`` the same way. The venv's own seeded setuptools (65 on Python 3.11, older than torch
   requires) is uninstalled first, as pip would replace it from an index. Honest limits: medtl itself and every distribution outside the
   requirement closure are absent, so a missing requirement fails the load; but namespace
   folders shared by several distributions (``nvidia/``, ``google/``) are linked whole, and the
   compiled wheels are this machine's (no fresh download is tested).
3. ``import medtl`` still fails (medtl is in no requirement); the model's own ``code/medtl`` is
   what the pyfunc imports.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from server_helpers import free_port, stop_group, wait_until_up

from medtl.tracking.store import OFFLINE_ENV

pytestmark = pytest.mark.integration

MODEL_NAME = "fresh-env-cxr"
AUDIT_KEY = "fresh-env-test-key-not-secret-0123456789abcdef"
CHECKOUT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180


# ---------------------------------------------------------------- real inputs
def write_j2k_dicom(path: Path, seed: int = 0, size: int = 48) -> np.ndarray:
    """A real JPEG 2000 Lossless DICOM radiograph (12-bit, MONOCHROME2); returns its pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    arr = (1500 + 2000 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.4) ** 2) * 8)).astype(np.uint16)
    arr = (arr + rng.integers(0, 200, arr.shape)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        SecondaryCaptureImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    ds.compress(JPEG2000Lossless, arr, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return arr


@pytest.fixture(scope="session")
def registered(tmp_path_factory):
    """A real-backbone bundle logged, registered and approved in a SQLite store."""
    from medtl.bundle import load_bundle, save_bundle
    from medtl.config import PipelineConfig, TrackingConfig
    from medtl.inference import predict
    from medtl.models import create_model
    from medtl.tracking.lineage import medtl_code_state
    from medtl.tracking.registry import register, review
    from medtl.tracking.runs import TrainTracker

    root = tmp_path_factory.mktemp("deploy_store")
    j2k = root / "images" / "cr_j2k.dcm"
    j2k.parent.mkdir()
    write_j2k_dicom(j2k)
    cfg = PipelineConfig.model_validate({"transforms": {"spatial_size": [32, 32]}})
    cfg.data.classes, cfg.data.task = ["normal", "nodule"], "binary"
    net = create_model(cfg.model, 2, spatial_dims=2, pretrained=False).eval()
    bundle_dir = save_bundle(root / "run" / "model", net, cfg, cfg.data.classes, "binary", 0.5)
    tcfg = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="fresh-env")
    tracker = TrainTracker(tcfg, cfg, {"medtl.seed": str(cfg.seed)})
    tracker.start()
    tracker.log_model(bundle_dir)
    tracker.end()
    with pytest.MonkeyPatch.context() as mp:  # review's key and anchor: this test's own
        mp.setenv("MEDTL_AUDIT_KEY", AUDIT_KEY)
        mp.setenv("MEDTL_AUDIT_ANCHOR", str(root / "audit_anchors.json"))
        version = register(tracker.parent_run_id, MODEL_NAME, tcfg)["version"]
        review(MODEL_NAME, version, "approve", "Dr Fresh (radiology)", "deploy test", tcfg)
    assert (root / "audit_anchors.json").is_file()
    local = predict(load_bundle(bundle_dir), [str(j2k)])
    assert local["error"].isna().all(), local["error"].tolist()
    return {
        "root": root,
        "uri": tracker.tracking_uri,
        "j2k": j2k,
        "local_prob": float(local["prob_nodule"].iloc[0]),
        "code": medtl_code_state(),
    }


@pytest.fixture(scope="session")
def downloaded(registered, tmp_path_factory):
    """The approved model's folder, as a deployment downloads it."""
    import mlflow

    dst = tmp_path_factory.mktemp("downloaded")
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{MODEL_NAME}@approved",
            dst_path=str(dst),
            tracking_uri=registered["uri"],
        )
    )


# ---------------------------------------------------------------- the fresh environment
def _requirement_closure(lines: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The distributions of this environment that ``lines`` name, and what they require."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    found: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if (key, frozenset(req.extras)) in seen:
            continue
        seen.add((key, frozenset(req.extras)))
        if key not in found:
            found[key] = importlib.metadata.distribution(req.name)  # missing: a real failure
        extras = {"", *req.extras}
        for line in found[key].requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return found


def _link_site(dists: dict[str, importlib.metadata.Distribution], site: Path) -> list[str]:
    """Symlink each distribution's top-level entries into ``site``; returns the entries."""
    site.mkdir()
    linked: set[str] = set()
    for dist in dists.values():
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top in linked:
                continue
            src = Path(str(dist.locate_file(top)))
            if src.exists():
                (site / top).symlink_to(src)
                linked.add(top)
    return sorted(linked)


def _write_console_scripts(dists, bindir: Path, python: Path) -> None:
    """The ``console_scripts`` pip writes for installed distributions, for the venv's python."""
    for dist in dists.values():
        for ep in dist.entry_points.select(group="console_scripts"):
            module, _, attr = ep.value.partition(":")
            script = bindir / ep.name
            if script.exists():
                continue
            head = attr.split(".")[0]
            script.write_text(
                f"#!{python}\nimport sys\nfrom {module} import {head}\nsys.exit({attr}())\n"
            )
            script.chmod(0o755)


def _env(extra: dict[str, str] | None = None, venv: Path | None = None) -> dict[str, str]:
    """A child environment with nothing pointing into the checkout or the test's venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI", "PYTEST"))
    }
    path = [p for p in env.get("PATH", "").split(os.pathsep) if str(CHECKOUT) not in p]
    if venv is not None:
        path.insert(0, str(venv / "bin"))
    env["PATH"] = os.pathsep.join(path)
    return env | OFFLINE_ENV | (extra or {})


def _run(cmd: list, cwd: Path, env: dict[str, str], timeout: int = 300):
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def fresh_env(tmp_path_factory, downloaded, registered):
    """The venv described in the module doc; ``python`` and ``cwd`` (outside the checkout)."""
    base = tmp_path_factory.mktemp("fresh_env")
    assert CHECKOUT not in base.resolve().parents
    venv = base / "venv"
    env = _env()
    made = _run([sys._base_executable, "-m", "venv", venv], base, env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # Python 3.11's venv seeds setuptools 65, older than torch needs; pip would upgrade it from
    # the index. Python 3.12+ seeds none: drop it so the required one is the linked one.
    dropped = _run([python, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], base, env)
    assert dropped.returncode == 0, dropped.stderr
    before = _run([python, "-c", "import medtl"], base, env)
    assert before.returncode != 0 and "No module named 'medtl'" in before.stderr

    lines = (downloaded / "requirements.txt").read_text().splitlines()
    dists = _requirement_closure(lines)
    linked = _link_site(dists, base / "linked-site")
    assert "medtl" not in linked and "torch" in linked
    purelib = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, env
    )
    (Path(purelib.stdout.strip()) / "linked_site.pth").write_text(f"{base / 'linked-site'}\n")
    _write_console_scripts(dists, venv / "bin", python)

    pip = _run(
        [python, "-m", "pip", "install", "--no-index", "-r", downloaded / "requirements.txt"],
        base,
        env,
    )
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    assert "Requirement already satisfied: pylibjpeg-openjpeg" in pip.stdout
    after = _run([python, "-c", "import medtl"], base, env)
    assert after.returncode != 0 and "No module named 'medtl'" in after.stderr
    tracking = {"MLFLOW_TRACKING_URI": registered["uri"]}
    return {"python": python, "venv": venv, "cwd": base, "env": _env(tracking, venv)}


# ---------------------------------------------------------------- the logged model itself
def test_logged_model_holds_no_path_of_the_training_machine(downloaded, registered):
    mlmodel = (downloaded / "MLmodel").read_text()
    assert "code: code" in mlmodel and "model_code_path: medtl_pyfunc.py" in mlmodel
    assert (downloaded / "code" / "medtl" / "tracking" / "pyfunc.py").is_file()
    assert not list(downloaded.rglob("__pycache__")) and not list(downloaded.rglob("*.pyc"))
    needles = {
        str(CHECKOUT),
        "/work/",
        str(registered["root"]),
        str(registered["root"].parent),
        str(Path(tempfile.gettempdir()) / "medtl-pyfunc-"),  # the logging staging folders
        str(Path.home()) + "/",
    }
    hits = []
    for f in downloaded.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [(f.name, n) for n in needles if n.encode() in data]
    assert hits == []


def test_requirements_pin_the_decoders_and_never_medtl(downloaded):
    reqs = dict(
        line.split("==", 1)
        for line in (downloaded / "requirements.txt").read_text().splitlines()
        if "==" in line
    )
    for pkg in ("pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pyjpegls"):
        assert reqs[pkg] == importlib.metadata.version(pkg)
    assert reqs["torch"] == importlib.metadata.version("torch").split("+")[0]
    assert "medtl" not in {r.lower() for r in reqs}
    assert "medtl" not in (downloaded / "requirements.txt").read_text().lower()


# ---------------------------------------------------------------- the fresh environment
_PREDICT = """
import base64, json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{name}@approved")
import medtl
from medtl.tracking.lineage import medtl_code_state
path = sys.argv[1]
b64 = base64.b64encode(open(path, "rb").read()).decode()
out = model.predict(pd.DataFrame({{"path": [path, None, None], "b64": [None, b64, "bm90IGFuIGltYWdl"]}}))
code = medtl_code_state()
print(json.dumps({{
    "medtl_file": medtl.__file__,
    "prob": out["prob_nodule"].tolist(),
    "pred": out["pred"].tolist(),
    "error": out["error"].tolist(),
    "code": [code.commit, code.source],
}}))
"""


def test_fresh_env_loads_the_approved_model_and_predicts_jpeg2000(fresh_env, registered):
    script = fresh_env["cwd"] / "predict.py"
    script.write_text(_PREDICT.format(name=MODEL_NAME))
    res = _run([fresh_env["python"], script, registered["j2k"]], fresh_env["cwd"], fresh_env["env"])
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # medtl came from the model's own code/ folder, not from this checkout or an install
    assert "/code/medtl/" in out["medtl_file"] and str(CHECKOUT) not in out["medtl_file"]
    assert out["prob"][0] == pytest.approx(registered["local_prob"], abs=1e-5)
    assert out["prob"][1] == pytest.approx(registered["local_prob"], abs=1e-5)
    assert math.isnan(out["prob"][2]) and "no known image format" in out["error"][2]
    assert out["error"][:2] == [None, None] and out["pred"][0] == out["pred"][1]
    assert out["code"] == [registered["code"].commit, "build"]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_fresh_env_mlflow_models_serve_answers_base64_jpeg2000(fresh_env, registered):
    port = free_port()
    mlflow_cli = fresh_env["venv"] / "bin" / "mlflow"
    assert shutil.which("uvicorn", path=fresh_env["env"]["PATH"]).startswith(str(fresh_env["venv"]))
    log = (fresh_env["cwd"] / "serve.log").open("wb")
    cmd = [
        mlflow_cli, "models", "serve", "-m", f"models:/{MODEL_NAME}@approved",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=fresh_env["cwd"],
        env=fresh_env["env"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    b64 = base64.b64encode(registered["j2k"].read_bytes()).decode()
    try:
        wait_until_up(
            proc, f"{url}/ping", fresh_env["cwd"] / "serve.log", START_TIMEOUT_S,
            "mlflow models serve", pause_s=1,
        )  # fmt: skip
        split = _post(
            f"{url}/invocations", {"dataframe_split": {"columns": ["b64"], "data": [[b64]]}}
        )
        inputs = _post(f"{url}/invocations", {"inputs": {"b64": [b64, "%%%"]}})
    finally:
        stop_group(proc)
        log.close()
    for body in (split, inputs):
        row = body["predictions"][0]
        assert row["error"] is None and row["image"] == "b64[0]"
        assert row["prob_nodule"] == pytest.approx(registered["local_prob"], abs=1e-5)
    assert "not valid base64" in inputs["predictions"][1]["error"]
