"""`medtl prepare`: the train job's data stages alone. The cache it fills is the one the train
job's prepare stage reads (nothing decoded again, no entry rewritten), and a corrupt file is
named in its quarantine, as `medtl train` would name it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from medtl.cli import main
from medtl.config import load_config
from medtl.jobs.prepare import prepare_data, read_inputs, split_patients
from medtl.training.distributed import DistContext

PIPELINE = Path(__file__).parent.parent / "pipelines/cxr_2d_finetune.yaml"


def _manifest(demo_data, tmp_path: Path) -> tuple[Path, Path]:
    """Twenty demo images (absolute paths) and one corrupt DICOM of a patient of its own."""
    df = pd.read_csv(demo_data.manifest_csv).head(20)
    df["image"] = [str(demo_data.manifest_csv.parent / p) for p in df["image"]]
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 20)
    row = {**df.iloc[0].to_dict(), "image": str(bad), "patient_id": "P-broken"}
    df = pd.concat([df, pd.DataFrame([row])], ignore_index=True)
    df.to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv", bad


def _entries(cache: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file()
    }


def test_prepare_fills_the_cache_train_reads_and_quarantines_by_name(demo_data, tmp_path, caplog):
    manifest, bad = _manifest(demo_data, tmp_path)
    cache, run = tmp_path / "cache", tmp_path / "run"
    sets = ["transforms.spatial_size=[32,32]", f"data.cache_dir={cache}", "data.prepare_workers=1"]
    sets += [
        "cv.folds=2",
        "data.max_bad_fraction=0.1",
        "tracking.enabled=false",
        "train.progress=false",
    ]
    res = CliRunner().invoke(
        main,
        ["prepare", str(PIPELINE), "--manifest", str(manifest), "--out", str(run)]
        + [x for s in sets for x in ("--set", s)],
    )
    assert res.exit_code == 0, res.output
    assert "20 of 21 images in the cache" in res.output
    assert "1 unreadable file(s) quarantined" in res.output
    quarantine = pd.read_csv(run / "quarantine.csv")
    assert quarantine["path"].tolist() == [str(bad)] and quarantine["reason"].str.len().min() > 0
    done = json.loads((run / "prepare.json").read_text())
    assert (done["images"], done["ready"], done["quarantined"]) == (21, 20, 1)
    assert done["cache_dir"] == str(cache)
    written = _entries(cache)
    assert written

    # The train job's prepare stage with the same pipeline: every readable image is a hit.
    cfg = load_config(PIPELINE, sets)
    inputs = read_inputs(cfg, manifest)
    with caplog.at_level(logging.INFO, logger="medtl"):
        data = prepare_data(cfg, inputs, split_patients(inputs, cfg), run, DistContext())
    assert "21 images: 20 from the cache, 0 decoded" in caplog.text
    assert [q.path for q in data.quarantine] == [str(bad)] and len(data.records) == 20
    assert _entries(cache) == written  # no entry rewritten, none added


def test_prepare_without_a_manifest_names_the_option(tmp_path):
    res = CliRunner().invoke(main, ["prepare", str(PIPELINE), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "--manifest" in res.output and "Traceback" not in res.output


def test_prepare_with_missing_weights_names_the_file_before_decoding(
    demo_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cache = tmp_path / "cache"
    res = CliRunner().invoke(
        main,
        ["prepare", str(PIPELINE), "--manifest", str(demo_data.manifest_csv)]
        + ["--out", str(tmp_path / "run"), "--set", "model.backbone=resnet50"]
        + ["--set", f"data.cache_dir={cache}", "--set", "tracking.enabled=false"],
    )
    assert res.exit_code == 2, res.output
    assert str(tmp_path / "weights") in res.output and "Traceback" not in res.output
    assert not cache.exists()  # refused before any image was decoded


def test_too_many_bad_files_stops_with_every_one_listed(demo_data, tmp_path):
    """Above data.max_bad_fraction the job stops, as `medtl train` does, and the full list is
    on disk: the one-line message can only name the first few."""
    manifest, bad = _manifest(demo_data, tmp_path)
    run = tmp_path / "run"
    sets = ["transforms.spatial_size=[32,32]", f"data.cache_dir={tmp_path / 'cache'}"]
    sets += ["data.prepare_workers=0", "cv.folds=2", "tracking.enabled=false"]
    res = CliRunner().invoke(
        main,
        ["prepare", str(PIPELINE), "--manifest", str(manifest), "--out", str(run)]
        + [x for s in sets for x in ("--set", s)],
    )
    assert res.exit_code == 2, res.output
    assert "above data.max_bad_fraction=0.01" in res.output and "Traceback" not in res.output
    assert f"listed in {run / 'quarantine.csv'}" in res.output
    assert pd.read_csv(run / "quarantine.csv")["path"].tolist() == [str(bad)]
    assert not (run / "prepare.json").exists()
