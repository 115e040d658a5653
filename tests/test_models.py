"""Every registry entry builds and runs (2D/3D, 1/3 channels) with stages covering every
parameter once; input adaptation, inflation, heads and config errors behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtl.config import ModelConfig
from medtl.errors import ConfigError, WeightsError
from medtl.models import (
    MedtlModel,
    PreprocessSpec,
    create_model,
    get_backbone_spec,
    head_from_linear,
    list_backbones,
)
from medtl.models.adapt import adapt_first_conv, input_normalization
from medtl.models.inflate import inflate_to_3d


def _cases() -> list[tuple[str, int, int]]:
    out = []
    for name in list_backbones():
        spec = get_backbone_spec(name)
        for dims in spec.spatial_dims:
            for chans in (1, 3) if dims == 2 else (1,):
                out.append((name, dims, chans))
    return out


def _random_cfg(name: str, **kw) -> ModelConfig:
    return ModelConfig(backbone=name, weights=None, allow_random_init=True, **kw)


@pytest.mark.parametrize(("name", "dims", "chans"), _cases(), ids=lambda v: str(v))
def test_backbone_builds_runs_and_stages_cover_every_parameter(name, dims, chans):
    spec = get_backbone_spec(name)
    inflate = dims == 3 and spec.spatial_dims != (3,)
    cfg = _random_cfg(name, in_channels=chans, inflate_3d=inflate, head="mlp", head_hidden=8)
    model = create_model(cfg, 3, spatial_dims=dims).eval()
    size = 80 if "incep" in name else 64  # InceptionV3 needs >= 75 px
    x = torch.rand(2, chans, *([32] * 3 if dims == 3 else [size] * 2))
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    assert feats.shape == (2, model.num_features)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert model.weights_info["source"] == "random_init"
    assert model.preprocess == spec.preprocess

    groups = model.stage_groups()
    names = [n for n, _ in groups]
    assert names[0] == "stem" and names[-1] == "head"
    assert names[1:-1] == [f"stage{i}" for i in range(1, len(names) - 1)]
    assert all(params for _, params in groups), "empty stage"
    ids = [id(p) for _, params in groups for p in params]
    assert len(ids) == len(set(ids)), "a parameter is in two stages"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no stage"
    assert {id(p) for p in groups[-1][1]} == {id(p) for p in model.head.parameters()}


def test_registry_entries_are_typed_and_unknown_names_suggest():
    spec = get_backbone_spec("tf_efficientnet_lite0")
    assert spec.preprocess == PreprocessSpec((224, 224), (0.5,) * 3, (0.5,) * 3)
    assert spec.weights["imagenet"].sha256 is not None
    with pytest.raises(ConfigError, match="Did you mean 'resnet50'"):
        get_backbone_spec("resnet5")
    assert "medicalnet_resnet18" in list_backbones(
        3
    ) and "medicalnet_resnet18" not in list_backbones(2)


def test_default_model_has_imagenet_weights_and_grey_fold_is_exact():
    """fold_sum on a grey image equals the 3-channel network on that image repeated."""
    grey = create_model(ModelConfig(), 2).eval()  # defaults: lite0, 1 channel, fold_sum
    rgb = create_model(ModelConfig(in_channels=3), 2).eval()
    assert grey.weights_info["verified"] is True
    assert grey.weights_info["load"]["dropped_classifier"] == ["_fc.bias", "_fc.weight"]
    assert len(grey.stage_groups()) > 4
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = grey.forward_features(x)
        b = rgb.forward_features(x.repeat(1, 3, 1, 1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    rep = create_model(ModelConfig(channel_adapt="repeat"), 2)
    assert rep.in_chans == 3


def test_channel_adaptation_rules():
    w = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(adapt_first_conv(w, 1, "fold_sum"), w.sum(1, keepdim=True))
    torch.testing.assert_close(adapt_first_conv(w, 1, "fold_mean"), w.mean(1, keepdim=True))
    five = adapt_first_conv(w, 5)  # 2.5D: 5 slices as channels, repeated RGB scaled by 3/5
    assert five.shape == (8, 5, 3, 3)
    torch.testing.assert_close(five[:, 3], w[:, 0] * 3 / 5)
    w3 = torch.randn(8, 1, 3, 3, 3)  # 3D kernels (MedicalNet) to 2 channels
    assert adapt_first_conv(w3, 2).shape == (8, 2, 3, 3, 3)
    assert input_normalization((0.4, 0.5, 0.6), (0.2, 0.2, 0.2), 1, "fold_sum") == (
        (pytest.approx(0.5),),
        (pytest.approx(0.2),),
    )
    assert input_normalization((0.4, 0.5, 0.6), (0.2,) * 3, 1, "repeat")[0] == (0.4, 0.5, 0.6)
    m = create_model(ModelConfig(in_channels=5), 2)
    assert m.backbone.conv_stem.weight.shape[1] == 5
    with pytest.raises(ConfigError, match="repeat"):
        create_model(ModelConfig(in_channels=5, channel_adapt="repeat"), 2)


def test_i3d_center_inflation_reproduces_2d_on_identical_slices():
    import timm

    torch.manual_seed(0)
    net2d = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    net3d = timm.create_model("resnet18", pretrained=False, num_classes=0)
    net3d.load_state_dict(net2d.state_dict())
    inflate_to_3d(net3d, init="center").eval()
    img = torch.rand(1, 3, 32, 32)
    vol = img.unsqueeze(2).repeat(1, 1, 32, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net3d(vol), net2d(img), rtol=1e-4, atol=1e-5)
    conv = net3d.conv1
    assert conv.weight.shape == (64, 3, 7, 7, 7) and conv.stride == (2, 2, 2)


def test_inflation_and_dims_errors():
    with pytest.raises(ConfigError, match="inflate_3d"):
        create_model(_random_cfg("resnet18"), 2, spatial_dims=3)
    with pytest.raises(ConfigError, match="does not support 3D"):
        create_model(_random_cfg("tf_efficientnet_lite0", inflate_3d=True), 2, spatial_dims=3)
    with pytest.raises(ConfigError, match="does not support 2D"):
        create_model(_random_cfg("medicalnet_resnet18"), 2, spatial_dims=2)
    import timm

    with pytest.raises(ConfigError, match="cannot inflate"):
        inflate_to_3d(timm.create_model("tf_efficientnet_lite0", num_classes=0))


def test_missing_weights_choice_is_explicit():
    with pytest.raises(WeightsError, match="allow_random_init"):
        create_model(ModelConfig(weights=None), 2)
    with pytest.raises(ConfigError, match="weights tag"):
        create_model(ModelConfig(weights="imagenet21k"), 2)
    with pytest.raises(ConfigError, match="no published pretrained weights"):
        create_model(ModelConfig(backbone="densenet121_3d"), 2, spatial_dims=3)


def test_head_from_logistic_regression_reproduces_its_decision_function():
    from sklearn.linear_model import LogisticRegression

    model = create_model(_random_cfg("resnet18"), 3)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, model.num_features)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    lr = LogisticRegression(max_iter=200).fit(feats, y)
    head_from_linear(model.head, lr.coef_, lr.intercept_)
    with torch.no_grad():
        logits = model.forward_head(torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(logits, lr.decision_function(feats), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        head_from_linear(model.head, lr.coef_[:2], lr.intercept_[:2])
    mlp = create_model(_random_cfg("resnet18", head="mlp"), 3)
    with pytest.raises(ValueError, match="linear head"):
        head_from_linear(mlp.head, lr.coef_, lr.intercept_)


def test_reset_head_and_model_interface():
    model = create_model(_random_cfg("resnet18", head="mlp", head_hidden=16, dropout=0.2), 4)
    assert isinstance(model, MedtlModel) and model.num_classes == 4 and model.head_kind == "mlp"
    model.reset_head(2)
    assert model.num_classes == 2 and model.head.fc1.out_features == 16
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 64, 64)).shape == (1, 2)
