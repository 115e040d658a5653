"""Bundle format round trip, no-pickle loading, integrity checks, and batch prediction."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pandas as pd
import pytest
import torch
from tracking_helpers import tiny_cfg, tiny_factory, tiny_transform, trained_tiny, write_pngs

from medtl.bundle import META_FILE, WEIGHTS_FILE, load_bundle, save_bundle
from medtl.errors import ConfigError, MedtlError, WeightsError
from medtl.inference import collect_inputs, labels_from_probs, predict, probabilities


@pytest.fixture
def bundle_dir(tmp_path):
    cfg = tiny_cfg(data={"manifest": "/hospital/PATIENT_SMITH_export/manifest.csv"})
    net = trained_tiny()
    out = save_bundle(
        tmp_path / "model",
        net,
        cfg,
        ["neg", "pos"],
        "binary",
        0.37,
        {"medtl.seed": "42"},
        {"auroc": 0.9},
    )
    return out, net


def test_round_trip_predictions_equal_in_memory_model(bundle_dir, tmp_path):
    path, net = bundle_dir
    bundle = load_bundle(path, model_factory=tiny_factory)
    assert bundle.classes == ["neg", "pos"] and bundle.task == "binary"
    assert bundle.threshold == pytest.approx(0.37)
    assert not bundle.model.training
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), net(x), rtol=0, atol=0)

    pngs = write_pngs(tmp_path / "imgs", n=3)
    tf = tiny_transform()
    df = predict(bundle, tmp_path / "imgs", transform=tf)
    with torch.no_grad():
        ref = torch.stack([tf({"image": str(p)})["image"] for p in pngs])
        ref_p = torch.softmax(net(ref), 1).numpy()
    assert list(df["image"]) == [p.name for p in pngs]
    np.testing.assert_allclose(df[["prob_neg", "prob_pos"]].to_numpy(), ref_p, rtol=1e-6)
    expected = np.where(ref_p[:, 1] >= 0.37, "pos", "neg")
    assert list(df["pred"]) == list(expected)
    assert df["error"].isna().all()


def test_load_uses_no_pickle(bundle_dir, monkeypatch):
    path, _ = bundle_dir
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, WEIGHTS_FILE]
    raw = (path / WEIGHTS_FILE).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: JSON header + raw tensor bytes
    assert "conv.weight" in header and "bn.running_mean" in header

    def refuse(*a, **k):
        raise AssertionError("load_bundle must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    bundle = load_bundle(path, model_factory=tiny_factory)
    assert bundle.meta["weights_sha256"]


def test_bundle_metadata_holds_no_paths(bundle_dir):
    path, _ = bundle_dir
    text = (path / META_FILE).read_text()
    meta = json.loads(text)
    assert "PATIENT_SMITH" not in text and "/hospital" not in text and "/somewhere" not in text
    assert meta["config"]["data"]["manifest"] == "manifest.csv"
    assert meta["weights_info"]["path"] == "tiny.safetensors"
    assert meta["lineage"] == {"medtl.seed": "42"} and meta["metrics"] == {"auroc": 0.9}
    assert meta["transforms"]["spatial_size"] == [32, 32]


def test_tampered_weights_are_refused(bundle_dir):
    path, _ = bundle_dir
    raw = bytearray((path / WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="sha256"):
        load_bundle(path, model_factory=tiny_factory)


def test_weights_that_do_not_fit_are_refused(bundle_dir):
    path, _ = bundle_dir

    def three_class_factory(mcfg, n, spatial_dims=2, pretrained=False):
        return tiny_factory(mcfg, 3)

    with pytest.raises(WeightsError, match="does not fit"):
        load_bundle(path, model_factory=three_class_factory)


def test_not_a_bundle(tmp_path):
    with pytest.raises(MedtlError, match="medtl_model.json"):
        load_bundle(tmp_path, model_factory=tiny_factory)


@pytest.mark.parametrize(
    ("task", "classes", "threshold"),
    [
        ("binary", ["a", "b", "c"], 0.5),
        ("multiclass", ["a", "b"], [0.5]),
        ("segmentation", ["a", "b"], 0.5),
    ],
)
def test_save_rejects_inconsistent_task(tmp_path, task, classes, threshold):
    with pytest.raises(MedtlError):
        save_bundle(
            tmp_path / "m", trained_tiny(len(classes)), tiny_cfg(), classes, task, threshold
        )


def test_unreadable_inputs_are_listed_not_dropped(bundle_dir, tmp_path):
    path, _ = bundle_dir
    bundle = load_bundle(path, model_factory=tiny_factory)
    imgs = tmp_path / "in"
    write_pngs(imgs, n=2)
    (imgs / "broken.png").write_bytes(b"\x89PNG not really")
    (imgs / "notes.txt").write_text("sidecar, not an input")
    (imgs / ".DS_Store").write_bytes(b"\0")
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image": ["in/img_00.png", "in/missing.png", "in/broken.png"]}).to_csv(
        manifest, index=False
    )

    df = predict(bundle, imgs, transform=tiny_transform())
    assert list(df["image"]) == ["broken.png", "img_00.png", "img_01.png"]
    bad = df.set_index("image").loc["broken.png"]
    assert isinstance(bad["error"], str) and np.isnan(bad["prob_pos"]) and pd.isna(bad["pred"])
    assert df["error"].notna().sum() == 1

    df = predict(bundle, manifest, transform=tiny_transform())
    assert list(df["image"]) == ["in/img_00.png", "in/missing.png", "in/broken.png"]
    assert df["error"].isna().tolist() == [True, False, False]
    assert "FileNotFoundError" in df.loc[1, "error"]

    with pytest.raises(ConfigError, match="image"):
        pd.DataFrame({"path": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
        predict(bundle, tmp_path / "bad.csv", transform=tiny_transform())


def test_collect_inputs_groups_dicom_series_for_volumes(tmp_path):
    for i in range(3):
        (tmp_path / "series1").mkdir(exist_ok=True)
        (tmp_path / "series1" / f"{i}.dcm").write_bytes(b"\0" * 128 + b"DICM")
        (tmp_path / "noext").mkdir(exist_ok=True)
    (tmp_path / "noext" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    (tmp_path / "vol.nii.gz").write_bytes(b"x")
    flat = [d for d, _ in collect_inputs(tmp_path, volumes=False)]
    assert flat == ["noext/IM0001", "series1/0.dcm", "series1/1.dcm", "series1/2.dcm", "vol.nii.gz"]
    vols = [d for d, _ in collect_inputs(tmp_path, volumes=True)]
    assert vols == ["noext/IM0001", "series1", "vol.nii.gz"]


@pytest.mark.parametrize(
    ("task", "probs", "threshold", "expected"),
    [
        ("binary", [[0.7, 0.3], [0.2, 0.8]], 0.3, ["b", "b"]),
        ("binary", [[0.7, 0.3], [0.2, 0.8]], 0.5, ["a", "b"]),
        ("multiclass", [[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], 0.5, ["b", "a"]),
        ("multilabel", [[0.9, 0.1, 0.6], [0.1, 0.2, 0.3]], [0.5, 0.5, 0.7], ["a", ""]),
    ],
)
def test_labels_from_probs(task, probs, threshold, expected):
    classes = ["a", "b", "c"][: len(probs[0])]
    assert labels_from_probs(np.array(probs), task, threshold, classes) == expected


def test_probabilities_softmax_and_sigmoid():
    logits = np.array([[0.0, np.log(3.0)], [1000.0, 0.0]])
    np.testing.assert_allclose(probabilities(logits, "binary"), [[0.25, 0.75], [1.0, 0.0]])
    np.testing.assert_allclose(probabilities(np.zeros((1, 3)), "multilabel"), [[0.5] * 3])
