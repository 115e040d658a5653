"""medtl's own code lineage (build-time record, else git at the package folder) kept apart from
the user's repository, a real wheel and sdist build recording the commit, and lineage tags on
every fold run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
from tracking_helpers import tiny_cfg

import medtl
from medtl.config import TrackingConfig
from medtl.tracking.lineage import LINEAGE_KEYS, collect_lineage, medtl_code_state

CHECKOUT = Path(__file__).resolve().parent.parent
PACKAGE = Path(medtl.__file__).resolve().parent


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _repo(path: Path, files: dict[str, str]) -> str:
    """A git repository at ``path`` with ``files`` committed; returns the commit."""
    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "-q")
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    _git(path, "add", "-A")
    _git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    return _git(path, "rev-parse", "HEAD")


def _medtl_source_commit() -> str:
    """The commit git gives for this checkout's medtl (skips where medtl is no git checkout)."""
    code = medtl_code_state()
    if code.source != "git":
        pytest.skip(f"medtl here is not a git checkout (source {code.source})")
    return _git(PACKAGE, "rev-parse", "HEAD")


def test_lineage_from_another_repository_names_both_apart(tmp_path):
    medtl_commit = _medtl_source_commit()
    user_commit = _repo(tmp_path / "user_repo", {"pipeline.yaml": "name: mine\n"})
    tags = collect_lineage(tiny_cfg(), "h", {}, {}, cwd=tmp_path / "user_repo")
    assert tags["medtl.git_commit"] == medtl_commit != user_commit
    assert tags["medtl.code.source"] == "git"
    assert tags["medtl.user_repo.commit"] == user_commit
    assert tags["medtl.user_repo.dirty"] == "false"
    (tmp_path / "user_repo" / "pipeline.yaml").write_text("name: changed\n")
    assert (
        collect_lineage(tiny_cfg(), "h", {}, {}, cwd=tmp_path / "user_repo")[
            "medtl.user_repo.dirty"
        ]
        == "true"
    )
    assert set(tags) == set(LINEAGE_KEYS)


def test_lineage_from_a_non_git_folder_still_knows_medtls_commit(tmp_path, monkeypatch):
    medtl_commit = _medtl_source_commit()
    monkeypatch.chdir(tmp_path)
    tags = collect_lineage(tiny_cfg(), "h", {}, {})
    assert tags["medtl.git_commit"] == medtl_commit and len(medtl_commit) == 40
    assert tags["medtl.user_repo.commit"] == "none" and tags["medtl.user_repo.dirty"] == "none"


def test_a_medtl_inside_the_users_repository_does_not_borrow_its_commit(tmp_path):
    """A venv in the user's repository (untracked) holds medtl: its commit is not medtl's."""
    _repo(tmp_path, {"train.py": "print('x')\n"})
    pkg = tmp_path / ".venv" / "site-packages" / "medtl"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    state = medtl_code_state(pkg)
    assert (state.commit, state.source) == ("unknown", "unknown")


def test_a_build_record_wins_over_git(monkeypatch):
    record = types.ModuleType("medtl._build_info")
    record.VERSION, record.COMMIT, record.DIRTY = "9.9.9", "c" * 40, "false"
    monkeypatch.setitem(sys.modules, "medtl._build_info", record)
    state = medtl_code_state()
    assert (state.version, state.commit, state.dirty, state.source) == (
        "9.9.9",
        "c" * 40,
        "false",
        "build",
    )


def _source_copy(dst: Path) -> str:
    """This checkout's package sources in a fresh git repository; returns its commit."""
    dst.mkdir()
    for name in ("pyproject.toml", "build_hooks.py", "MANIFEST.in", "README.md"):
        shutil.copy(CHECKOUT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_build_info.py")
    shutil.copytree(CHECKOUT / "medtl", dst / "medtl", ignore=ignore)
    return _repo(dst, {})


def _wheel(src: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    res = subprocess.run(
        [*cmd, "--no-index", "-q", "-w", str(out), str(src)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return next(out.glob("medtl-*.whl"))


def test_a_built_wheel_and_sdist_record_the_commit(tmp_path):
    """The real build hooks: a wheel from a git tree, and a wheel from that tree's sdist
    unpacked where there is no git, both carry the tree's commit; the source stays clean."""
    src = tmp_path / "src"
    commit = _source_copy(src)
    whl = _wheel(src, tmp_path / "wheels")
    with zipfile.ZipFile(whl) as zf:
        info = zf.read("medtl/_build_info.py").decode()
    assert f"COMMIT = '{commit}'" in info and "DIRTY = 'false'" in info
    assert f"VERSION = '{medtl.__version__}'" in info
    assert not (src / "medtl" / "_build_info.py").exists()

    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from setuptools import build_meta as b; print(b.build_sdist('../sd'))",
        ],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sdist = tmp_path / "sd" / res.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path / "unpacked", filter="data")
    unpacked = next((tmp_path / "unpacked").iterdir())
    assert subprocess.run(["git", "rev-parse"], cwd=unpacked, capture_output=True).returncode
    with zipfile.ZipFile(_wheel(unpacked, tmp_path / "wheels2")) as zf:
        assert f"COMMIT = '{commit}'" in zf.read("medtl/_build_info.py").decode()


def test_every_fold_run_carries_the_lineage_tags(tmp_path):
    from medtl.tracking.runs import TrainTracker
    from medtl.tracking.store import make_client

    cfg = tiny_cfg()
    lineage = collect_lineage(cfg, "f" * 64, {"images": 4, "patients": 2}, {"sha256": "0" * 64})
    tcfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="lineage")
    tracker = TrainTracker(tcfg, cfg, lineage)
    tracker.start()
    folds = [tracker.fold_run(k) for k in range(2)]
    for fr in folds:
        fr.end()
    tracker.end()
    client = make_client(tracker.tracking_uri)
    parent = client.get_run(tracker.parent_run_id).data.tags
    for k, fr in enumerate(folds):
        tags = client.get_run(fr.run_id).data.tags
        assert {key: tags.get(key) for key in LINEAGE_KEYS} == {
            key: parent[key] for key in LINEAGE_KEYS
        }
        assert tags["medtl.run_kind"] == "fold" and tags["medtl.fold"] == str(k)
        assert tags["mlflow.parentRunId"] == tracker.parent_run_id
    assert parent["medtl.manifest_hash"] == "f" * 64 and parent["medtl.run_kind"] == "parent"
