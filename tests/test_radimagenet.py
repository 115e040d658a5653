"""RadImageNet: the Keras-faithful networks load checkpoints in every supported layout
strictly (Warvito's PyTorch .pth, official Keras .h5 via conversion), and the Keras details
(conv bias, BN eps, stride placement, padding-excluding average pooling) are reproduced."""

from __future__ import annotations

import random

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medtl.config import ModelConfig
from medtl.errors import WeightsError
from medtl.models import convert_keras_h5, create_model, get_backbone_spec
from medtl.models.radimagenet import KERAS_BN_EPS, read_keras_h5


@pytest.fixture()
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def warvito_resnet50_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Keys and shapes of Warvito's RadImageNet-ResNet50_notop.pth, written out independently
    of medtl's network: torchvision names, a bias on every conv, downsample on block 0."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, o, i, k):
        sd[f"{name}.weight"] = torch.randn(o, i, k, k, generator=g) * 0.05
        sd[f"{name}.bias"] = torch.randn(o, generator=g) * 0.05

    def bn(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 1 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inp = 64
    for li, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            conv(f"{p}.conv1", planes, inp, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", planes * 4, inp, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inp = planes * 4
    return sd


def _keras_layers_from_torch(sd, name_of) -> dict[str, dict[str, np.ndarray]]:
    """Inverse mapping for tests: torch tensors -> Keras layer weights (HWIO kernels)."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    prefixes = sorted({k.rsplit(".", 1)[0] for k in sd})
    for p in prefixes:
        keras = name_of(p)
        if p + ".running_mean" in sd:
            layers[keras] = {
                "gamma": sd[p + ".weight"].numpy(),
                "beta": sd[p + ".bias"].numpy(),
                "moving_mean": sd[p + ".running_mean"].numpy(),
                "moving_variance": sd[p + ".running_var"].numpy(),
            }
        else:
            layers[keras] = {"kernel": sd[p + ".weight"].permute(2, 3, 1, 0).numpy()}
            if p + ".bias" in sd:
                layers[keras]["bias"] = sd[p + ".bias"].numpy()
    return layers


def _write_keras_h5(path, layers, model_file: bool = True) -> None:
    """Keras 2 HDF5 layout: [model_weights/]<layer>/<layer>/<weight>:0 plus name attributes."""
    names = list(layers)
    random.Random(0).shuffle(names)  # the converter must not rely on file order
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if model_file else f
        root.attrs["layer_names"] = [n.encode() for n in names]
        for n in names:
            g = root.create_group(n)
            g.attrs["weight_names"] = [f"{n}/{w}:0".encode() for w in layers[n]]
            for w, arr in layers[n].items():
                g.create_dataset(f"{n}/{w}:0", data=arr.astype(np.float32))


def _resnet_keras_name(torch_prefix: str) -> str:
    if torch_prefix in ("conv1", "bn1"):
        return f"conv1_{'conv' if torch_prefix == 'conv1' else 'bn'}"
    parts = torch_prefix.split(".")
    stage, block = int(parts[0][5:]) + 1, int(parts[1]) + 1
    if parts[2] == "downsample":
        idx, kind = 0, "conv" if parts[3] == "0" else "bn"
    else:
        idx, kind = int(parts[2][-1]), parts[2][:-1]
    return f"conv{stage}_block{block}_{idx}_{kind}"


def test_warvito_pth_in_the_torch_hub_cache_loads_strictly(dirs):
    sd = warvito_resnet50_state_dict()
    hub = dirs / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(sd, hub / "RadImageNet-ResNet50_notop.pth")
    cfg = ModelConfig(backbone="radimagenet_resnet50", weights="radimagenet", in_channels=3)
    model = create_model(cfg, 2)
    assert model.weights_info["source"] == "torch_hub_cache"
    assert model.weights_info["load"]["loaded"] == len(sd)
    assert model.preprocess.channel_order == "BGR"
    assert model.preprocess.mean == (0.406, 0.456, 0.485) and model.preprocess.std == (1.0,) * 3
    torch.testing.assert_close(model.backbone.layer3[5].conv2.bias, sd["layer3.5.conv2.bias"])
    # grey input folds the 3-channel stem
    grey = create_model(cfg.model_copy(update={"in_channels": 1}), 2)
    torch.testing.assert_close(grey.backbone.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))

    bad = dict(sd)
    bad["layer2.0.downsample.0.weight"] = torch.zeros(512, 256, 3, 3)
    torch.save(bad, hub / "RadImageNet-ResNet50_notop.pth")
    with pytest.raises(WeightsError, match=r"wrong shape: layer2\.0\.downsample\.0\.weight"):
        create_model(cfg, 2)
    bad = {k: v for k, v in sd.items() if not k.startswith("layer4.2.bn3")}
    torch.save(bad, hub / "RadImageNet-ResNet50_notop.pth")
    with pytest.raises(WeightsError, match=r"4 missing: layer4\.2\.bn3\.bias"):
        create_model(cfg, 2)


def test_keras_resnet50_architecture_is_keras_faithful():
    net = get_backbone_spec("radimagenet_resnet50").builder(in_chans=3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    assert all(m.eps == KERAS_BN_EPS for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    assert not hasattr(net, "fc") and not hasattr(net, "avgpool")
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 2048)


def test_keras_h5_resnet50_conversion_round_trip(dirs):
    sd = warvito_resnet50_state_dict(seed=1)
    layers = _keras_layers_from_torch(sd, _resnet_keras_name)
    layers["conv1_relu"] = {}  # weightless layers are ignored
    h5 = dirs / "RadImageNet-ResNet50_notop.h5"
    _write_keras_h5(h5, layers)
    out = convert_keras_h5(h5, "radimagenet_resnet50", dirs / "rin50.safetensors")
    assert out["tensors"] == len(sd)
    cfg = ModelConfig(backbone="radimagenet_resnet50", weights_path=out["path"], in_channels=3)
    model = create_model(cfg, 2)
    for k in ("conv1.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.running_var"):
        torch.testing.assert_close(dict(model.backbone.state_dict())[k], sd[k])
    # the .h5 itself is also accepted directly from the weights directory
    (dirs / "weights").mkdir()
    h5.rename(dirs / "weights" / h5.name)
    direct = create_model(
        cfg.model_copy(update={"weights_path": None, "weights": "radimagenet"}), 2
    )
    assert direct.weights_info["layout"] == "keras_h5"
    torch.testing.assert_close(direct.backbone.layer2[1].conv2.weight, sd["layer2.1.conv2.weight"])


def test_keras_kernel_layout_matches_pytorch_convolution(dirs):
    """HWIO Keras kernels: the converted PyTorch conv computes Keras' correlation."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)  # (kh, kw, in, out)
    img = rng.normal(size=(5, 5, 2)).astype(np.float32)  # HWC
    _write_keras_h5(dirs / "one.h5", {"conv1_conv": {"kernel": kernel}}, model_file=False)
    layer = read_keras_h5(dirs / "one.h5")["conv1_conv"]
    from medtl.models.radimagenet import _conv

    torch_out = F.conv2d(torch.from_numpy(img).permute(2, 0, 1)[None], _conv(layer["kernel"]))
    keras_out = np.zeros((3, 3, 4), np.float32)
    for y in range(3):
        for x in range(3):
            keras_out[y, x] = np.einsum("ijc,ijco->o", img[y : y + 3, x : x + 3], kernel)
    np.testing.assert_allclose(torch_out[0].permute(1, 2, 0).numpy(), keras_out, atol=1e-5)


def test_keras_h5_densenet121_by_name(dirs):
    import re

    spec = get_backbone_spec("radimagenet_densenet121")
    sd = {k: torch.randn_like(v.float()) for k, v in spec.builder().state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}

    def keras_name(p: str) -> str:
        fixed = {
            "features.conv0": "conv1/conv",
            "features.norm0": "conv1/bn",
            "features.norm5": "bn",
        }
        if p in fixed:
            return fixed[p]
        m = re.fullmatch(r"features\.denseblock(\d)\.denselayer(\d+)\.(\w+)", p)
        if m:
            idx = {"norm1": "0_bn", "conv1": "1_conv", "norm2": "1_bn", "conv2": "2_conv"}[m[3]]
            return f"conv{int(m[1]) + 1}_block{m[2]}_{idx}"
        m = re.fullmatch(r"features\.transition(\d)\.(\w+)", p)
        return f"pool{int(m[1]) + 1}_{'conv' if m[2] == 'conv' else 'bn'}"

    h5 = dirs / "RadImageNet-DenseNet121_notop.h5"
    _write_keras_h5(h5, _keras_layers_from_torch(sd, keras_name))
    out = convert_keras_h5(h5, "radimagenet_densenet121", dirs / "d121.pth")
    loaded = torch.load(out["path"], weights_only=True)
    for k, v in sd.items():
        torch.testing.assert_close(loaded[k], v)


def test_keras_h5_inceptionv3_by_creation_order(dirs):
    """Keras names conv2d_N / batch_normalization_N (scale=False: no gamma) map by N."""
    spec = get_backbone_spec("radimagenet_inceptionv3")
    net = spec.builder()
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i, n in enumerate(convs):
        w = net.get_submodule(n).weight
        layers["conv2d" + (f"_{i}" if i else "")] = {
            "kernel": torch.randn(w.shape, generator=g).permute(2, 3, 1, 0).numpy()
        }
    for i, n in enumerate(bns):
        c = net.get_submodule(n).num_features
        layers["batch_normalization" + (f"_{i}" if i else "")] = {
            "beta": torch.randn(c, generator=g).numpy(),
            "moving_mean": torch.randn(c, generator=g).numpy(),
            "moving_variance": torch.rand(c, generator=g).numpy() + 0.5,
        }
    h5 = dirs / "RadImageNet-InceptionV3_notop.h5"
    _write_keras_h5(h5, layers)
    out = convert_keras_h5(h5, "radimagenet_inceptionv3", dirs / "iv3.safetensors")
    model = create_model(
        ModelConfig(backbone="radimagenet_inceptionv3", weights_path=out["path"], in_channels=3), 2
    )
    b = model.backbone
    k94 = torch.from_numpy(layers[f"conv2d_{len(convs) - 1}"]["kernel"]).permute(3, 2, 0, 1)
    torch.testing.assert_close(b.get_submodule(convs[-1]).weight, k94)
    torch.testing.assert_close(
        b.get_submodule(bns[3]).weight, torch.ones_like(b.get_submodule(bns[3]).weight)
    )
    torch.testing.assert_close(
        b.get_submodule(bns[5]).running_mean,
        torch.from_numpy(layers["batch_normalization_5"]["moving_mean"]),
    )
    layers.pop("conv2d_7")
    _write_keras_h5(h5, layers)
    with pytest.raises(WeightsError, match="not an InceptionV3"):
        convert_keras_h5(h5, "radimagenet_inceptionv3", dirs / "iv3b.safetensors")


def test_inception_branch_pool_excludes_padding_like_keras():
    net = get_backbone_spec("radimagenet_inceptionv3").builder().eval()
    block = net.Mixed_5b
    seen = []
    block.branch_pool.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.rand(1, 192, 9, 9) + 1
    with torch.no_grad():
        block(x)
    torch.testing.assert_close(seen[0], F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    assert not torch.allclose(seen[0], F.avg_pool2d(x, 3, 1, 1))
