"""Config schema: every pipeline validates; mistakes name the key before any training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medtl.config import PipelineConfig, build_config, load_config, parse_overrides
from medtl.errors import ConfigError

PIPELINES = sorted((Path(__file__).parent.parent / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name == path.stem


def test_required_pipelines_exist():
    names = {p.name for p in PIPELINES}
    assert {"cxr_2d_feature_extraction.yaml", "cxr_2d_finetune.yaml"} <= names
    assert any("3d" in n or "2p5d" in n for n in names)


def test_overrides_parse_yaml_values():
    assert parse_overrides(["train.epochs=2", "transforms.spatial_size=[64,64]"]) == {
        "train": {"epochs": 2},
        "transforms": {"spatial_size": [64, 64]},
    }
    cfg = build_config({}, ["train.epochs=2", "cv.folds=3", "train.lr=0.01"])
    assert (cfg.train.epochs, cfg.cv.folds, cfg.train.lr) == (2, 3, 0.01)


@pytest.mark.parametrize(
    "override, must_mention",
    [
        ("train.epohcs=2", ["train.epohcs", "train.epochs"]),
        ("strategy.name=finetune", ["strategy.name", "fine_tune", "gradual_unfreeze"]),
        ("cv.folds=1", ["cv.folds"]),
        ("trian.epochs=2", ["trian", "train"]),
        ("train.sampler=weighted", ["train.sampler", "balanced"]),
        ("transforms.spatial_size=[64,64,64]", ["spatial_size", "cxr_2d"]),
        ("train.epochs", ["key=value"]),
    ],
)
def test_bad_keys_and_values_name_the_key(override, must_mention):
    with pytest.raises(ConfigError) as exc:
        build_config({}, [override])
    for word in must_mention:
        assert word in str(exc.value)


def test_missing_pipeline_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_identity_changes_with_config():
    a = build_config({}, [])
    b = build_config({}, ["train.lr=0.5"])
    assert a.identity() != b.identity()
    assert a.identity() == build_config({}, []).identity()


def test_cli_rejects_bad_key_before_training(tmp_path):
    """`medtl train` fails fast with one line naming the key; no run folder is created."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medtl.cli",
            "train",
            str(PIPELINES[0]),
            "--set",
            "train.epohcs=2",
            "--manifest",
            "x.csv",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.epohcs" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
