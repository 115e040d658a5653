"""Shared fixtures: real demo files on disk (built once per session), offline environment."""

from __future__ import annotations

import os
import tempfile

import pytest

# Offline and quiet for every test process (and the processes they start).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MEDTL_PSEUDONYM_SALT", "test-salt-not-secret")
# Reviews sign with a key file: one per test session, never the user's ~/.config/medtl.
os.environ.setdefault(
    "MEDTL_AUDIT_KEY_FILE",
    os.path.join(tempfile.mkdtemp(prefix="medtl-audit-test-"), "audit.key"),
)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo dataset written as real DICOM/NIfTI files (see medtl.demo_data)."""
    from medtl.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    return make_demo_data(root, n_patients=40, image_size=96, seed=0)
