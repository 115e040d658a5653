"""Records, the on-disk cache, quarantine and loaders over real demo DICOM files."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
import torch

from medtl.config import build_config
from medtl.data import (
    auto_workers,
    build_dataset,
    cache_folder,
    make_loader,
    prepare_records,
    records_from_manifest,
    write_quarantine,
)
from medtl.errors import ConfigError, ManifestError, TooManyBadFilesError
from medtl.manifest import Manifest, read_manifest
from medtl.models.registry import PreprocessSpec
from medtl.transforms import build_transforms

LITE = PreprocessSpec(input_size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _cfg(**transforms):
    return build_config({"transforms": {"spatial_size": [32, 32], **transforms}})


def _pair(cfg, train=False):
    return build_transforms(cfg.transforms, LITE, 1, "fold_sum", train=train)


@pytest.fixture(scope="module")
def demo_records(demo_data):
    cfg = _cfg()
    records, classes = records_from_manifest(read_manifest(demo_data.manifest_csv), cfg)
    return records[:12], classes


def _manifest(tmp_path, labels, **extra):
    df = pd.DataFrame(
        {"image": [f"im{i}.dcm" for i in range(len(labels))], "label": labels, **extra}
    )
    df["patient_id"] = [f"p{i // 2}" for i in range(len(labels))]
    return Manifest.from_dataframe(df, tmp_path)


def test_records_single_label(tmp_path):
    m = _manifest(tmp_path, ["normal", "nodule", "normal", "nodule"], slice=[3, 4, 5, 6])
    records, classes = records_from_manifest(m, _cfg())
    assert classes == ["nodule", "normal"]
    assert [r["label"] for r in records] == [1, 0, 1, 0]
    assert records[1]["patient_id"] == "p0" and records[3]["row"] == 3
    assert records[2]["slice"] == 5
    assert Path(records[0]["image"]).is_absolute()


def test_positive_class_goes_last(tmp_path):
    m = _manifest(tmp_path, ["normal", "nodule", "normal", "nodule"])
    cfg = _cfg()
    cfg.data.positive_class = "nodule"
    records, classes = records_from_manifest(m, cfg)
    assert classes == ["normal", "nodule"]
    assert [r["label"] for r in records] == [0, 1, 0, 1]
    cfg.data.positive_class = "effusion"
    with pytest.raises(ConfigError, match="data.positive_class 'effusion'.*nodule, normal"):
        records_from_manifest(m, cfg)


def test_records_given_classes_and_multilabel(tmp_path):
    m = _manifest(tmp_path, ["effusion|nodule", "", "nodule", "cardiomegaly"])
    records, classes = records_from_manifest(m, _cfg())
    assert classes == ["cardiomegaly", "effusion", "nodule"]
    assert [r["label"] for r in records] == [[0, 1, 1], [0, 0, 0], [0, 0, 1], [1, 0, 0]]

    cfg = build_config({"data": {"classes": ["b", "a", "c"]}})
    records, classes = records_from_manifest(_manifest(tmp_path, ["a", "c", "b", "a"]), cfg)
    assert classes == ["b", "a", "c"] and [r["label"] for r in records] == [1, 2, 0, 1]
    with pytest.raises(ManifestError, match=r"\['d'\] are not in data.classes"):
        records_from_manifest(_manifest(tmp_path, ["a", "d", "b", "a"]), cfg)


def test_cached_epoch_equals_uncached(demo_records, tmp_path):
    records, _ = demo_records
    pair = _pair(_cfg())
    prepared = prepare_records(records, pair, tmp_path, 0.0, progress=False)
    assert len(prepared.records) == len(records) and not prepared.quarantine
    folder = cache_folder(tmp_path, pair)
    assert len(list(folder.glob("*.pt"))) == len(records)

    def epoch(cache):
        ds = build_dataset(records, pair, tmp_path, cache)
        return [b for b in make_loader(ds, batch_size=5, num_workers=0)]

    raw, cached, memory = epoch("none"), epoch("disk"), epoch("memory")
    for a, b, c in zip(raw, cached, memory, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
    assert raw[0]["image"].shape == (5, 1, 32, 32) and raw[0]["image"].dtype == torch.float32
    assert raw[0]["label"].dtype == torch.long
    # the disk path reads the cache file, it does not decode again: mark a cached tensor
    f = next(folder.glob("*.pt"))
    item = torch.load(f, weights_only=True)
    item["image"] = torch.full_like(item["image"], 7.0)
    torch.save(item, f)
    marked = [b for b in build_dataset(records, pair, tmp_path, "disk")]
    assert sum(bool((x["image"] == 7.0).all()) for x in marked) == 1


def test_cache_dir_follows_the_transform_config(demo_records, tmp_path):
    records, _ = demo_records
    a, b = _pair(_cfg()), _pair(_cfg(window="lung"))
    assert a.cache_key != b.cache_key and cache_folder(tmp_path, a) != cache_folder(tmp_path, b)
    prepare_records(records[:2], b, tmp_path, 0.0, progress=False)
    assert len(list(cache_folder(tmp_path, b).glob("*.pt"))) == 2
    assert not cache_folder(tmp_path, a).exists() or not any(cache_folder(tmp_path, a).iterdir())


def test_corrupt_file_is_quarantined(demo_records, tmp_path):
    records, _ = demo_records
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 20)
    missing = tmp_path / "missing.dcm"
    recs = [*records, {**records[0], "image": str(bad)}, {**records[1], "image": str(missing)}]
    prepared = prepare_records(recs, _pair(_cfg()), tmp_path / "cache", 0.2, progress=False)
    assert [r["image"] for r in prepared.records] == [r["image"] for r in records]
    assert [q.path for q in prepared.quarantine] == [str(bad), str(missing)]
    assert all(q.reason for q in prepared.quarantine)
    out = write_quarantine(prepared.quarantine, tmp_path / "quarantine.csv")
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["path"] == str(bad) and rows[0]["reason"] == prepared.quarantine[0].reason

    with pytest.raises(
        TooManyBadFilesError, match=r"2 of 14 .*data\.max_bad_fraction=0\.1.*broken"
    ):
        prepare_records(recs, _pair(_cfg()), tmp_path / "cache", 0.1, progress=False)


def test_random_part_is_seeded_and_applied(demo_records, tmp_path):
    from monai.data.utils import set_rnd

    records, _ = demo_records
    cfg = _cfg(augment="standard")
    ds = build_dataset(records[:4], _pair(cfg, train=True), tmp_path, "disk")
    plain = ds.deterministic_view()

    def draw(seed):
        set_rnd(ds, seed)
        return torch.stack([ds[i]["image"] for i in range(4)])

    assert torch.equal(draw(3), draw(3))
    clean = torch.stack([plain[i]["image"] for i in range(4)])
    assert not torch.equal(draw(3), clean)
    assert ds.records is plain.records


def test_loader_workers():
    assert auto_workers(1000, 16, cpu_count=2) == 0
    assert auto_workers(10, 16, cpu_count=16) == 0
    assert auto_workers(1000, 16, cpu_count=16) == 4
    assert auto_workers(1000, 16, cpu_count=4) == 3
