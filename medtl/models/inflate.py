"""I3D inflation: turn a pretrained 2D CNN into a 3D one by repeating its kernels over depth.

Carreira & Zisserman (2017): a ``k x k`` kernel becomes ``k x k x k``; with ``init="mean"``
the 2D kernel is repeated over depth and divided by ``k`` (a volume of identical slices then
gives the 2D response away from the depth borders), with ``init="center"`` it sits in the
middle slice only (exactly the 2D response on such a volume). Depth gets the same stride and
padding as height. Written by hand: neither timm nor MONAI inflates 2D networks.

Supported layers: Conv2d, BatchNorm2d (and timm's BatchNormAct2d), Max/AvgPool2d, adaptive
pools and timm's global pool: the plain-layer families (ResNet, DenseNet, RadImageNet
ResNet50). Layers that compute in 2D internally (TF "same" padding, squeeze-excite with
explicit H/W means) are refused with the layer's name.
"""

from __future__ import annotations

import torch
from torch import nn

from medtl.errors import ConfigError

INFLATE_INITS = ("mean", "center")


class BatchNormAct3d(nn.BatchNorm3d):
    """BatchNorm3d followed by the ``drop`` and ``act`` of the timm BatchNormAct2d it replaces
    (same parameter names, so stage grouping and checkpoints are unchanged)."""

    def __init__(self, num_features: int, eps: float, momentum: float | None, affine: bool):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class GlobalPool3d(nn.Module):
    """Global average pool over (D, H, W), flattened to ``(B, C)``."""

    def __init__(self, flatten: bool = True):
        super().__init__()
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=(2, 3, 4), keepdim=not self.flatten)
        return x


def _triple(v: int | tuple[int, ...]) -> tuple[int, int, int]:
    v = (v, v) if isinstance(v, int) else tuple(v)
    return (v[0], v[0], v[1])


@torch.no_grad()
def inflate_conv(conv: nn.Conv2d, init: str = "mean") -> nn.Conv3d:
    """A Conv3d whose depth kernel/stride/padding copy the height ones, weights inflated."""
    if isinstance(conv.padding, str):
        raise ConfigError(f"cannot inflate conv with padding='{conv.padding}'")
    k = _triple(conv.kernel_size)
    out = nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        k,
        stride=_triple(conv.stride),
        padding=_triple(conv.padding),
        dilation=_triple(conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    w = conv.weight.unsqueeze(2)  # (O, I, 1, kh, kw)
    if init == "mean":
        w3 = w.repeat(1, 1, k[0], 1, 1) / k[0]
    else:
        w3 = torch.zeros_like(out.weight)
        w3[:, :, k[0] // 2] = conv.weight
    out.weight.copy_(w3)
    if conv.bias is not None:
        assert out.bias is not None  # built with bias=True just above
        out.bias.copy_(conv.bias)
    return out


@torch.no_grad()
def _inflate_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    out = BatchNormAct3d(bn.num_features, bn.eps, bn.momentum, bn.affine)
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if isinstance(act, nn.Module) and isinstance(drop, nn.Module):  # timm's BatchNormAct2d
        out.act = act
        out.drop = drop
    out.load_state_dict(bn.state_dict())
    return out


def _inflate_module(m: nn.Module, init: str) -> nn.Module | None:
    """The 3D replacement of one layer, ``None`` if it is dimension-free."""
    from timm.layers import SelectAdaptivePool2d

    name = type(m).__name__
    if type(m) is nn.Conv2d:
        return inflate_conv(m, init)
    if isinstance(m, nn.BatchNorm2d):
        return _inflate_bn(m)
    if type(m) is nn.MaxPool2d:
        return nn.MaxPool3d(
            _triple(m.kernel_size), _triple(m.stride), _triple(m.padding), ceil_mode=m.ceil_mode
        )
    if type(m) is nn.AvgPool2d:
        return nn.AvgPool3d(
            _triple(m.kernel_size),
            _triple(m.stride),
            _triple(m.padding),
            ceil_mode=m.ceil_mode,
            count_include_pad=m.count_include_pad,
        )
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool3d(1)
    if isinstance(m, SelectAdaptivePool2d):
        if m.pool_type not in ("avg", "fast", "fastavg"):
            raise ConfigError(f"cannot inflate global pool type '{m.pool_type}'")
        return GlobalPool3d(flatten=m(torch.zeros(1, 1, 2, 2)).ndim == 2)
    if "2d" in name.lower() or "squeeze" in name.lower() or "same" in name.lower():
        raise ConfigError(
            f"cannot inflate layer {name}: it computes in 2D internally; use an inflatable "
            "backbone (resnet18/34/50, densenet121, radimagenet_resnet50) or a MONAI 3D one"
        )
    return None


def inflate_to_3d(net: nn.Module, init: str = "mean") -> nn.Module:
    """Replace every 2D layer of ``net`` (in place) by its inflated 3D counterpart; returns it."""
    if init not in INFLATE_INITS:
        raise ConfigError(f"unknown inflation init '{init}'; valid: {', '.join(INFLATE_INITS)}")
    for name, child in list(net.named_children()):
        new = _inflate_module(child, init)
        if new is not None:
            setattr(net, name, new)
        else:
            inflate_to_3d(child, init)
    # torch annotates Module.__setattr__ for Tensor/Module values only; plain ones are fine.
    net.spatial_dims = 3  # type: ignore[assignment]
    return net
