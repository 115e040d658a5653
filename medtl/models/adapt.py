"""Input adaptation: fit pretrained stems to the channels medical images have.

Three routes (``model.channel_adapt``):

* ``fold_sum`` / ``fold_mean``: a grey (or k-slice 2.5D) input goes straight into the network;
  the 3-channel stem kernel is folded into k channels. For k = 1, ``fold_sum`` is timm's
  ``adapt_input_conv`` (sum over RGB: a grey image repeated three times gives the same
  response), ``fold_mean`` divides by the pretrained channel count (keeps activation scale when
  inputs are not normalised per channel). For k > 1 both repeat the RGB kernel and scale by 3/k
  (timm's rule).
* ``repeat``: the network keeps its pretrained channel count; transforms repeat the grey
  channel (exactly what the network saw in pretraining, at 3x the first-conv cost).

3D inputs use MONAI 3D networks or I3D inflation (``medtl.models.inflate``).
"""

from __future__ import annotations

import math

import torch

CHANNEL_ADAPT_MODES = ("fold_sum", "fold_mean", "repeat")


def network_in_chans(in_channels: int, channel_adapt: str, pretrained_chans: int) -> int:
    """Number of input channels the network is built with for this configuration."""
    if channel_adapt == "repeat":
        if in_channels not in (1, pretrained_chans):
            raise ValueError(
                f"channel_adapt=repeat needs 1 or {pretrained_chans} input channels, got "
                f"{in_channels}; use channel_adapt=fold_sum for {in_channels}-channel inputs"
            )
        return pretrained_chans
    return in_channels


def adapt_first_conv(weight: torch.Tensor, in_chans: int, mode: str = "fold_sum") -> torch.Tensor:
    """Fold/repeat a pretrained first-conv kernel ``(O, I, *k)`` to ``in_chans`` input channels."""
    base = weight.shape[1]
    if in_chans == base:
        return weight
    # timm's `adapt_input_conv` rule (sum for 1 channel; repeat and rescale for k), written
    # here for any kernel rank: timm's is 2D-only and its signature differs across releases.
    w = weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        reps = [1, math.ceil(in_chans / base)] + [1] * (w.ndim - 2)
        out = w.repeat(*reps)[:, :in_chans] * (base / float(in_chans))
    out = out.to(weight.dtype)
    if mode == "fold_mean" and in_chans == 1:
        out = out / base
    return out


def input_normalization(
    mean: tuple[float, ...], std: tuple[float, ...], in_chans: int, channel_adapt: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) for the network input after channel adaptation.

    ``repeat`` keeps the pretrained per-channel values (the grey channel is copied first).
    Folding feeds k channels: each gets the average pretrained mean/std (exact when the
    pretrained values are equal across channels, as for EfficientNet-Lite's 0.5/0.5; the usual
    approximation otherwise, as in timm).
    """
    if channel_adapt == "repeat" or in_chans == len(mean):
        return tuple(mean), tuple(std)
    m = sum(mean) / len(mean)
    s = sum(std) / len(std)
    return (m,) * in_chans, (s,) * in_chans
