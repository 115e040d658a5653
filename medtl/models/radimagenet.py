"""RadImageNet backbones: Keras-faithful PyTorch networks and Keras ``.h5`` conversion.

RadImageNet (Mei et al., "RadImageNet: An Open Radiologic Deep Learning Research Dataset
for Effective Transfer Learning", Radiology: AI 2022) publishes ImageNet-style backbones
trained on 1.35M CT/MRI/US images as Keras ``.h5`` "notop" files. Terms: research use only;
the files are obtained by request from https://www.radimagenet.com (they are not
redistributed with medtl; check your institution may use them before clinical work).

Where the files go (medtl never downloads): put them in ``$MEDTL_WEIGHTS_DIR``
(``~/.cache/medtl/weights``) or run ``medtl weights import FILE --as radimagenet_resnet50``.
Accepted files per entry (see ``WeightsSpec.aliases``):

* ``RadImageNet-ResNet50_notop.h5`` (official Keras) or ``RadImageNet-ResNet50_notop.pth``
  (the PyTorch conversion by Warvito/radimagenet-models that MONAI's RadImageNet perceptual
  loss loads; also found in the torch-hub cache where that hub entry put it);
* ``RadImageNet-DenseNet121_notop.h5``, ``RadImageNet-InceptionV3_notop.h5``;
* any of them converted once with ``medtl weights convert`` (``.safetensors``, medtl names).

The networks reproduce Keras exactly where it differs from torchvision: ResNet50 has a bias
on every conv, BatchNorm eps 1.001e-5, the stride on the FIRST 1x1 conv of each downsampling
block, and no avgpool/fc (``notop``). DenseNet121 is timm's with Keras' BatchNorm eps;
InceptionV3 is timm's (Keras BN has no scale: gamma = 1) with Keras' average pooling that
excludes padding. Inception-ResNet-v2 is not provided (its Keras block layout was not mapped).

Preprocessing (as MONAI's RadImageNet perceptual loss feeds the network): intensities in
[0, 1], grey repeated to 3 channels, BGR order, mean (0.406, 0.456, 0.485) subtracted, std 1.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtl.errors import ConfigError, WeightsError
from medtl.models.registry import BackboneSpec, PreprocessSpec, WeightsSpec, register

KERAS_BN_EPS = 1.001e-5
RADIMAGENET_PREPROCESS = PreprocessSpec(
    input_size=(224, 224),
    mean=(0.406, 0.456, 0.485),
    std=(1.0, 1.0, 1.0),
    channel_order="BGR",
    in_chans=3,
    interpolation="bilinear",
)
_LICENSE = "RadImageNet research use only"  # see the module docstring for the terms


# --------------------------------------------------------------------------- networks
class KerasBottleneck(nn.Module):
    """Keras ResNet50 bottleneck (``conv{s}_block{b}``): stride on the first 1x1 conv."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: bool = False):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=True)
        self.bn1 = nn.BatchNorm2d(planes, eps=KERAS_BN_EPS)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(planes, eps=KERAS_BN_EPS)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(out, eps=KERAS_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=True),
                nn.BatchNorm2d(out, eps=KERAS_BN_EPS),
            )
            if downsample
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


class KerasResNet50(nn.Module):
    """Keras ``ResNet50(include_top=False)`` in PyTorch, module names as Warvito's port
    (``conv1``, ``bn1``, ``layer{1-4}.{j}.conv{1-3}/bn{1-3}/downsample.{0,1}``).

    ``forward`` returns globally average-pooled features ``(B, 2048)`` (no parameters added).
    """

    num_features = 2048

    def __init__(self, in_chans: int = 3, spatial_dims: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64, eps=KERAS_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        # Keras zero-pads before max-pooling; after ReLU that equals PyTorch's -inf padding.
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, layers = 64, []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            seq = [KerasBottleneck(inplanes, planes, stride, downsample=True)]
            seq += [KerasBottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*seq))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def group_matcher(self, coarse: bool = True) -> dict:
        """timm-style stage matcher: stem, then layer1..4."""
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial feature map (what Warvito's/MONAI's model returns)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        return f.mean(dim=tuple(range(2, f.ndim)))


def _densenet121(in_chans: int = 3, spatial_dims: int = 2) -> nn.Module:
    import timm

    net = timm.create_model("densenet121", pretrained=False, num_classes=0, in_chans=in_chans)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = KERAS_BN_EPS
    return net


def _keras_avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # Keras AveragePooling2D(3, 1, padding="same") averages only the valid pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _inception_v3(in_chans: int = 3, spatial_dims: int = 2) -> nn.Module:
    import timm
    from timm.models.inception_v3 import InceptionA, InceptionC, InceptionE

    net = timm.create_model("inception_v3", pretrained=False, num_classes=0, in_chans=in_chans)
    for m in net.modules():
        if isinstance(m, InceptionA | InceptionC | InceptionE):
            # timm pools with count_include_pad=True inside _forward: swap in Keras pooling
            # via the branch_pool conv's forward pre-hook (input replaced by Keras-pooled x).
            m.branch_pool.register_forward_pre_hook(_KerasPoolFix(m))
    return net


class _KerasPoolFix:
    """Recomputes a timm Inception block's branch-pool input with Keras' padding rule."""

    def __init__(self, block: nn.Module):
        self.block_input: torch.Tensor | None = None
        block.register_forward_pre_hook(self._remember)

    def _remember(self, module: nn.Module, args: tuple) -> None:
        self.block_input = args[0]

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, self.block_input = self.block_input, None
        return (_keras_avg_pool_3x3(x),) if x is not None else args


# --------------------------------------------------------------------------- Keras .h5
def read_keras_h5(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{keras_layer_name: {"kernel"|"bias"|"gamma"|...: array}}`` from a Keras .h5 file.

    Follows Keras' own HDF5 index: ``layer_names`` on the (``model_weights``) root, then each
    layer group's ``weight_names`` such as ``conv1/conv/kernel:0``; the layer name is the
    weight name minus its last part, which also flattens nested models and names containing
    "/" (Keras DenseNet's ``conv1/conv``).
    """
    import h5py

    def text(v) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    layers: dict[str, dict[str, np.ndarray]] = {}
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise WeightsError(f"{path} is not a readable HDF5 file ({err})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise WeightsError(f"{path} has no Keras 'layer_names' index: not a Keras .h5 file")
        for lname in map(text, root.attrs["layer_names"]):
            group = root[lname]
            for wname in map(text, group.attrs.get("weight_names", [])):
                layer, _, weight = wname.rpartition("/")
                layers.setdefault(layer, {})[weight.split(":")[0]] = np.asarray(group[wname][()])
    if not layers:
        raise WeightsError(f"{path} holds no Keras layer weights")
    return layers


def _conv(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(arr, (3, 2, 0, 1)))).float()


def _put_conv(sd: dict, prefix: str, layer: dict[str, np.ndarray]) -> None:
    sd[prefix + ".weight"] = _conv(layer["kernel"])
    if "bias" in layer:
        sd[prefix + ".bias"] = torch.from_numpy(layer["bias"]).float()


def _put_bn(sd: dict, prefix: str, layer: dict[str, np.ndarray]) -> None:
    mean = torch.from_numpy(layer["moving_mean"]).float()
    # Keras BatchNormalization(scale=False) (InceptionV3) has no gamma: it is 1.
    sd[prefix + ".weight"] = (
        torch.from_numpy(layer["gamma"]).float() if "gamma" in layer else torch.ones_like(mean)
    )
    sd[prefix + ".bias"] = (
        torch.from_numpy(layer["beta"]).float() if "beta" in layer else torch.zeros_like(mean)
    )
    sd[prefix + ".running_mean"] = mean
    sd[prefix + ".running_var"] = torch.from_numpy(layer["moving_variance"]).float()
    sd[prefix + ".num_batches_tracked"] = torch.tensor(0)


def _apply(sd: dict, torch_prefix: str, layer: dict[str, np.ndarray]) -> None:
    if "kernel" in layer:
        _put_conv(sd, torch_prefix, layer)
    elif "moving_mean" in layer:
        _put_bn(sd, torch_prefix, layer)
    else:
        raise WeightsError(f"Keras layer for '{torch_prefix}' has weights {sorted(layer)}")


def _resnet50_names(name: str) -> str | None:
    """Keras ResNet50 layer name -> module path of ``KerasResNet50`` (None: not a weight layer)."""
    if name in ("conv1_conv", "conv1_bn"):
        return "conv1" if name.endswith("conv") else "bn1"
    m = re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", name)
    if not m:
        return None
    stage, block, idx, kind = int(m[1]) - 1, int(m[2]) - 1, int(m[3]), m[4]
    if idx == 0:
        return f"layer{stage}.{block}.downsample.{0 if kind == 'conv' else 1}"
    return f"layer{stage}.{block}.{kind}{idx}"


def _densenet121_names(name: str) -> str | None:
    """Keras DenseNet121 layer name (``conv1/conv``, ``conv2_block1_1_conv``, ``pool2_bn``,
    ``bn``) -> timm ``densenet121`` module path."""
    fixed = {"conv1/conv": "features.conv0", "conv1/bn": "features.norm0", "bn": "features.norm5"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"conv(\d)_block(\d+)_([012])_(conv|bn)", name)
    if m:
        blk, layer, idx = int(m[1]) - 1, int(m[2]), int(m[3])
        # Keras block: 0_bn (=norm1), 1_conv (=conv1), 1_bn (=norm2), 2_conv (=conv2)
        part = {(0, "bn"): "norm1", (1, "conv"): "conv1", (1, "bn"): "norm2", (2, "conv"): "conv2"}
        return f"features.denseblock{blk}.denselayer{layer}.{part[(idx, m[4])]}"
    m = re.fullmatch(r"pool(\d)_(conv|bn)", name)
    if m:
        return f"features.transition{int(m[1]) - 1}.{'conv' if m[2] == 'conv' else 'norm'}"
    return None


def _by_name(mapper: Callable[[str], str | None]):
    def convert(layers: dict[str, dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for name, weights in layers.items():
            path = mapper(name)
            if path is not None:
                _apply(sd, path, weights)
        return sd

    return convert


def _creation_index(name: str) -> int:
    m = re.search(r"_(\d+)$", name)
    return int(m[1]) if m else 0


def _inception_v3_by_order(layers: dict[str, dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Keras InceptionV3 names are ``conv2d_N`` / ``batch_normalization_N`` (N = creation
    order, which is the branch order of torchvision/timm): pair them with the network's
    conv/BN modules in module order, checking each shape."""
    convs = sorted((n for n, w in layers.items() if "kernel" in w), key=_creation_index)
    bns = sorted((n for n, w in layers.items() if "moving_mean" in w), key=_creation_index)
    net = _inception_v3()
    t_convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    t_bns = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if len(convs) != len(t_convs) or len(bns) != len(t_bns):
        raise WeightsError(
            f"Keras file has {len(convs)} conv / {len(bns)} BN layers, InceptionV3 needs "
            f"{len(t_convs)} / {len(t_bns)}: not an InceptionV3 notop file"
        )
    sd: dict[str, torch.Tensor] = {}
    for k, t in [*zip(convs, t_convs, strict=True), *zip(bns, t_bns, strict=True)]:
        _apply(sd, t, layers[k])
    return sd


_H5_CONVERTERS: dict[str, Callable[[dict], dict[str, torch.Tensor]]] = {
    "radimagenet_resnet50": _by_name(_resnet50_names),
    "radimagenet_densenet121": _by_name(_densenet121_names),
    "radimagenet_inceptionv3": _inception_v3_by_order,
}


def keras_h5_to_state_dict(h5_path: str | Path, backbone: str) -> dict[str, torch.Tensor]:
    """Convert a Keras .h5 file to a state dict of the backbone's PyTorch network
    (shapes are checked by the strict load that follows)."""
    if backbone not in _H5_CONVERTERS:
        raise ConfigError(
            f"no Keras .h5 conversion for backbone '{backbone}'; supported: "
            + ", ".join(sorted(_H5_CONVERTERS))
        )
    sd = _H5_CONVERTERS[backbone](read_keras_h5(h5_path))
    if not sd:
        raise WeightsError(f"{h5_path}: no layer names matched the {backbone} Keras layout")
    return sd


# --------------------------------------------------------------------------- registry
def _weights(
    arch: str, pth_layout: str, preprocess: PreprocessSpec = RADIMAGENET_PREPROCESS
) -> dict[str, WeightsSpec]:
    stem = f"RadImageNet-{arch}_notop"
    ws = WeightsSpec(
        tag="radimagenet",
        filename=f"{stem}.h5",
        sha256=None,
        source=f"RadImageNet {arch} notop (Mei et al. 2022)",
        license=_LICENSE,
        layout=pth_layout,  # for non-.h5 files; .h5 files are converted by layer name/order
        url_hint="request from https://www.radimagenet.com (research use)",
        aliases=(
            f"{stem}.pth",
            f"{stem}.safetensors",
            f"RadImageNet_{arch}_notop.h5",
            f"RadImageNet-{arch}.h5",
            f"{arch}.pt",
        ),
        preprocess=preprocess,
    )
    return {ws.tag: ws}


def backbone_specs() -> list[BackboneSpec]:
    """The RadImageNet registry entries."""
    pre299 = dataclasses.replace(RADIMAGENET_PREPROCESS, input_size=(299, 299))
    return [
        BackboneSpec(
            name="radimagenet_resnet50",
            family="resnet",
            spatial_dims=(2, 3),
            builder=KerasResNet50,
            weights=_weights("ResNet50", "warvito_radimagenet"),
            preprocess=RADIMAGENET_PREPROCESS,
            first_conv="conv1.weight",
            inflatable=True,
            default_tag="radimagenet",
            notes="Keras-faithful ResNet50; also reads Warvito's RadImageNet-ResNet50_notop.pth",
        ),
        BackboneSpec(
            name="radimagenet_densenet121",
            family="densenet",
            spatial_dims=(2,),
            builder=_densenet121,
            weights=_weights("DenseNet121", "native"),
            preprocess=RADIMAGENET_PREPROCESS,
            first_conv="features.conv0.weight",
            default_tag="radimagenet",
        ),
        BackboneSpec(
            name="radimagenet_inceptionv3",
            family="inception",
            spatial_dims=(2,),
            builder=_inception_v3,
            weights=_weights("InceptionV3", "native", pre299),
            preprocess=pre299,
            first_conv="Conv2d_1a_3x3.conv.weight",
            default_tag="radimagenet",
        ),
    ]


def register_all() -> None:
    """Add the RadImageNet entries to the backbone registry (called by ``medtl.models``)."""
    for spec in backbone_specs():
        register(spec)
