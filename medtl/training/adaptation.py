"""Domain-adaptation building blocks (pure torch): AdaBN, TENT, gradient reversal (DANN), Deep
CORAL, and the registry of methods (``ADAPTATION_METHODS``: one typed record per method).

Written here rather than taken from ``skada`` (scikit-adaptation): ``skada.deep`` imports
skorch at package import (``skada/deep/__init__.py``), so even its losses would pull skorch
into the training path for a few lines of torch. The joint training step (target batches next
to source batches) is ``medtl.training.domain``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from medtl.errors import ConfigError

_BN = nn.modules.batchnorm._BatchNorm
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class AdaptationMethod:
    """One domain-adaptation method: when it acts and what it needs."""

    name: str
    kind: Literal["none", "post_hoc", "joint"]  # post_hoc: on a trained model; joint: in training
    needs_batchnorm: bool
    summary: str


ADAPTATION_METHODS: dict[str, AdaptationMethod] = {
    m.name: m
    for m in (
        AdaptationMethod("none", "none", False, "no adaptation"),
        AdaptationMethod(
            "adabn", "post_hoc", True, "BatchNorm statistics re-estimated on target images"
        ),
        AdaptationMethod(
            "tent",
            "post_hoc",
            True,
            "BatchNorm affine parameters fitted by entropy minimisation on target images",
        ),
        AdaptationMethod(
            "coral", "joint", False, "Deep CORAL loss between source and target feature batches"
        ),
        AdaptationMethod(
            "dann", "joint", False, "domain classifier behind a gradient-reversal layer"
        ),
    )
}


def _images(batch: Any) -> torch.Tensor:
    """The image tensor of a loader batch (``{"image": ...}``, ``(x, y)`` or a bare tensor)."""
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch


def _bn_layers(model: nn.Module, method: str) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers; ConfigError naming the backbone when it has none."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        spec = getattr(model, "spec", None)
        name = f"backbone '{spec.name}'" if spec is not None else type(model).__name__
        raise ConfigError(
            f"{method} needs BatchNorm layers, but {name} has none (e.g. VGG or a LayerNorm "
            "network); use a backbone with BatchNorm or domain_adaptation.method coral/dann"
        )
    return bns


@torch.no_grad()
def adabn(model: M, target_batches: Iterable[Any], device: str | torch.device = "cpu") -> M:
    """AdaBN (Li et al. 2016): re-estimate every BatchNorm's running statistics on target images.

    Statistics are reset and accumulated as a plain average over all target batches
    (``momentum=None``); only BN layers are in train mode, nothing else (weights, other
    buffers, dropout) changes. The model is returned in eval mode with momenta restored.

    Raises:
        ConfigError: the model has no BatchNorm layer (or no target batch was given).
    """
    bns = _bn_layers(model, "AdaBN")
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
        m.train()
    seen = 0
    try:
        for batch in target_batches:
            model(_images(batch).to(device))
            seen += 1
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.eval()
    if seen == 0:
        raise ConfigError("AdaBN got no target batches; pass a non-empty loader of target images")
    return model


def _entropy(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean prediction entropy: softmax over classes, or per-class Bernoulli for multi-label."""
    logits = logits.float()
    if multilabel:
        p = torch.sigmoid(logits)
        ent = -(p * nn.functional.logsigmoid(logits) + (1 - p) * nn.functional.logsigmoid(-logits))
        return ent.sum(dim=1).mean()
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


def tent(
    model: M,
    target_batches: Iterable[Any],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    multilabel: bool = False,
    device: str | torch.device = "cpu",
) -> M:
    """TENT (Wang et al. 2021): fit only BatchNorm's affine parameters by minimising the
    prediction entropy on target batches (BN normalising with each batch's statistics).

    Afterwards the running statistics are re-estimated on the same target images (AdaBN), so
    the adapted model predicts one image at a time in eval mode as a deployed model must.
    ``target_batches`` is re-iterated once per epoch, plus once for the statistics.
    """
    bns = _bn_layers(model, "TENT")
    params: list[torch.Tensor] = [p for m in bns for p in (m.weight, m.bias) if p is not None]
    if not params:
        raise ConfigError("TENT needs affine BatchNorm layers (affine=False everywhere here)")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for q in model.parameters():
        q.requires_grad_(False)
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    model.eval()
    for m in bns:
        m.train()  # normalise with the target batch's own statistics, as TENT does
    try:
        for _ in range(epochs):
            for batch in target_batches:
                loss = _entropy(model(_images(batch).to(device)), multilabel)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for q in model.parameters():
            q.requires_grad_(flags[id(q)])
        model.eval()
    return adabn(model, target_batches, device)


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``-lambda_`` backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lambda_ * grads[0], None


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """``x`` unchanged, with its gradient negated and scaled by ``lambda_``."""
    return _ReverseGrad.apply(x, lambda_)


class GradientReversal(nn.Module):
    """Gradient reversal layer for DANN; set ``lambda_`` per step (see ``dann_lambda``)."""

    def __init__(self, lambda_: float = 1.0):
        super().__init__()
        self.lambda_ = float(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}"


def dann_lambda(progress: float) -> float:
    """DANN's reversal-weight ramp ``2 / (1 + exp(-10 p)) - 1`` for training progress p in [0, 1]."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (fraction of training done), got {progress}")
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def coral_loss(source_feats: torch.Tensor, target_feats: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko 2016): ``||C_s - C_t||_F^2 / (4 d^2)`` of feature covariances.

    Covariances are the unbiased ones (``n - 1``) of ``(n, d)`` batches, as in the paper;
    each batch needs at least two rows.
    """
    if source_feats.ndim != 2 or target_feats.ndim != 2:
        raise ValueError(
            f"coral_loss wants (n, d) feature batches, got {tuple(source_feats.shape)} and "
            f"{tuple(target_feats.shape)}; flatten/pool the features first"
        )
    d = source_feats.shape[1]
    if target_feats.shape[1] != d or min(len(source_feats), len(target_feats)) < 2:
        raise ValueError(
            f"coral_loss needs the same feature width and >= 2 rows per batch, got "
            f"{tuple(source_feats.shape)} and {tuple(target_feats.shape)}"
        )
    cs = torch.cov(source_feats.T)
    ct = torch.cov(target_feats.T)
    return ((cs - ct) ** 2).sum() / (4.0 * d * d)
