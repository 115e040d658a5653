"""VGG16/VGG19 registry entries: build, stages (conv blocks, pre_logits, head), freezing,
local torchvision-layout weights checked by sha256 (prefix for the published files) and the
classic-recipe pipeline."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medtl.config import ModelConfig, load_config
from medtl.errors import WeightsError
from medtl.models import create_model, get_backbone_spec, import_weights
from medtl.models import registry as registry_mod
from medtl.models.weights import sha256_file
from medtl.training.strategies import FineTune, get_strategy

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pipelines" / "cxr_2d_vgg16_recipe.yaml"


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """Empty weights dir and caches; any network connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    wdir = tmp_path / "weights"
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(wdir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return wdir


@pytest.fixture(scope="module")
def tv_vgg16(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint in torchvision's VGG16 layout (real keys and shapes, random values)."""
    import torchvision

    torch.manual_seed(0)
    sd = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("tv") / "vgg16_local.pth"
    torch.save(sd, path)
    return path, sd


def _random(name: str, **kw) -> ModelConfig:
    return ModelConfig(backbone=name, weights=None, allow_random_init=True, **kw)


@pytest.mark.parametrize(("name", "chans"), [("vgg16", 1), ("vgg16", 3), ("vgg19", 1)])
def test_vgg_builds_runs_and_stages_are_blocks_then_fc_then_head(name, chans):
    model = create_model(_random(name, in_channels=chans, head="mlp", head_hidden=8), 3).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.rand(2, chans, 64, 64))
    assert feats.shape == (2, 4096) == (2, model.num_features)
    assert model.forward_head(feats).shape == (2, 3)

    groups = model.stage_groups()
    assert [n for n, _ in groups] == ["stem", *(f"stage{i}" for i in range(1, 6)), "head"]
    ids = [id(p) for _, ps in groups for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    convs = [sorted({names[id(p)].split(".")[2] for p in ps}) for _, ps in groups[:5]]
    per_block = [2, 2, 3, 3, 3] if name == "vgg16" else [2, 2, 4, 4, 4]
    assert [len(c) for c in convs] == per_block  # the five conv blocks, split at the pools
    assert all(names[id(p)].startswith("backbone.pre_logits.") for p in groups[5][1])
    assert {id(p) for p in groups[6][1]} == {id(p) for p in model.head.parameters()}


def test_freeze_and_gradual_unfreeze_by_stage():
    model = create_model(_random("vgg16", head="mlp", head_hidden=8), 2)
    engine = SimpleNamespace(model=model)
    cfg = load_config(None, ["strategy.name=fine_tune", "strategy.freeze_stages=5"])
    FineTune(cfg).on_epoch_start(engine, 0)  # type: ignore[arg-type]
    groups = model.stage_groups()
    for i, (_, ps) in enumerate(groups):
        assert all(p.requires_grad == (i >= 5) for p in ps)

    recipe = get_strategy(load_config(RECIPE))
    seen = [sorted(recipe.trainable_stages(len(groups), e)) for e in range(8)]
    assert seen[0] == [6] and [4, 5, 6] in seen and all(min(s) >= 4 for s in seen)
    recipe.on_epoch_start(engine, 7)  # type: ignore[arg-type]
    block5 = {id(p) for p in groups[4][1]}
    for n, p in model.named_parameters():
        frozen_forever = n.startswith("backbone.features.") and id(p) not in block5
        assert p.requires_grad != frozen_forever, n


def test_missing_vgg_weights_name_the_file_and_folder(offline):
    for name, fname in (("vgg16", "vgg16-397923af.pth"), ("vgg19", "vgg19-dcbb9e9d.pth")):
        with pytest.raises(WeightsError) as err:
            create_model(ModelConfig(backbone=name), 2)
        msg = str(err.value)
        assert fname in msg and str(offline) in msg and "never downloads" in msg


def test_torchvision_layout_loads_strictly_with_registered_sha256(offline, tv_vgg16, monkeypatch):
    src, sd = tv_vgg16
    offline.mkdir(parents=True)
    placed = offline / "vgg16-397923af.pth"
    placed.symlink_to(src)
    sha = sha256_file(src)
    spec = get_backbone_spec("vgg16")

    # Published prefix: a locally made file is not the published one.
    with pytest.raises(WeightsError, match="fails its sha256 check: expected 397923af"):
        create_model(ModelConfig(backbone="vgg16"), 2)
    with pytest.raises(WeightsError, match="not the published vgg16:imagenet"):
        import_weights(src, "vgg16:imagenet")

    # The same entry with this file's hash registered (full, then as an 8-hex prefix).
    for registered in (sha, sha[:8]):
        ws = dataclasses.replace(spec.weights["imagenet"], sha256=registered)
        patched = dataclasses.replace(spec, weights={"imagenet": ws})
        monkeypatch.setitem(registry_mod._REGISTRY, "vgg16", patched)
        model = create_model(ModelConfig(backbone="vgg16", in_channels=3), 2)
        info = model.weights_info
        assert info["verified"] and info["sha256"] == sha and info["source"] == "weights_dir"
        assert info["load"]["dropped_classifier"] == ["classifier.6.bias", "classifier.6.weight"]
        assert info["load"]["loaded"] == len(sd) - 2
    bb = model.backbone
    torch.testing.assert_close(bb.features[28].weight, sd["features.28.weight"])
    torch.testing.assert_close(bb.pre_logits.fc1.weight.flatten(1), sd["classifier.0.weight"])
    torch.testing.assert_close(bb.pre_logits.fc2.weight.flatten(1), sd["classifier.3.weight"])


def test_vgg16_recipe_pipeline_loads_and_trains_only_the_top(tmp_path):
    """A smaller check than ``run_train`` on the demo data (that takes ~100 s on 2 CPU cores):
    the config loads, its model builds, and a step in the fine-tuning phase moves only block 5,
    the fc layers and the head."""
    cfg = load_config(RECIPE, ["model.allow_random_init=true", "transforms.spatial_size=[32,32]"])
    assert (cfg.model.backbone, cfg.model.head, cfg.strategy.freeze_stages) == ("vgg16", "mlp", 4)
    model = create_model(cfg.model, 2)
    strategy = get_strategy(cfg)
    strategy.on_epoch_start(SimpleNamespace(model=model), cfg.train.epochs - 1)  # type: ignore[arg-type]
    loss = model(torch.rand(2, cfg.model.in_channels, 32, 32)).logsumexp(1).sum()
    loss.backward()
    groups = model.stage_groups()
    for i, (_, ps) in enumerate(groups):
        assert all((p.grad is not None) == (i >= 4) for p in ps), groups[i][0]
