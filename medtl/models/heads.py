"""New classification heads on pooled features: linear, a small MLP with dropout, or cosine.

``cosine`` L2-normalises the features before the linear layer: with unit-norm class rows
scaled by ``s`` and no bias it gives ``s * cosine similarity`` to each class prototype, which
is how the few-shot classifiers (``medtl.fewshot.classifiers``) are stored as ordinary models.
Multi-label tasks use the same head; the sigmoid is applied downstream (losses/probabilities).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

HEAD_KINDS = ("linear", "mlp", "cosine")
# Heads whose output layer is the only layer with weights (a linear model fits into ``fc``).
LINEAR_HEAD_KINDS = ("linear", "cosine")


class L2Normalize(nn.Module):
    """Rows scaled to unit L2 norm (no parameters, so a cosine head's state dict is a linear one's)."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(f, p=2.0, dim=1, eps=1e-12)


class ClassifierHead(nn.Module):
    """``dropout -> fc`` (linear), ``fc1 -> ReLU -> dropout -> fc`` (MLP) or
    ``L2-normalise -> dropout -> fc`` (cosine); ``fc`` is always the output layer, so a linear
    probe's coefficients or a pretrained classifier go into ``fc``."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        kind: str = "linear",
        hidden: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head '{kind}'; valid: {', '.join(HEAD_KINDS)}")
        self.kind = kind
        if kind == "mlp":
            self.fc1: nn.Module = nn.Linear(in_features, hidden)
            self.act: nn.Module = nn.ReLU(inplace=True)
            fc_in = hidden
        else:
            self.fc1 = nn.Identity()
            # cosine: the normalisation takes the activation's slot, so forward() serves all kinds
            self.act = L2Normalize() if kind == "cosine" else nn.Identity()
            fc_in = in_features
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(fc_in, num_classes)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.act(self.fc1(f))))


def build_head(
    in_features: int,
    num_classes: int,
    kind: str = "linear",
    hidden: int = 256,
    dropout: float = 0.0,
) -> ClassifierHead:
    """A freshly initialised head for ``num_classes`` outputs."""
    return ClassifierHead(in_features, num_classes, kind, hidden, dropout)


@torch.no_grad()
def head_from_linear(
    head: ClassifierHead, coef: np.ndarray | torch.Tensor, intercept: np.ndarray | torch.Tensor
) -> ClassifierHead:
    """Copy a fitted linear model (e.g. scikit-learn ``coef_`` (C, F), ``intercept_`` (C,))
    into a linear (or cosine) head, in place. Raises ValueError for an MLP head or mismatched
    shapes."""
    if head.kind not in LINEAR_HEAD_KINDS:
        raise ValueError(
            f"head_from_linear needs a linear head (model.head=linear or cosine), got {head.kind}"
        )
    w = torch.as_tensor(np.asarray(coef), dtype=head.fc.weight.dtype)
    b = torch.as_tensor(np.asarray(intercept), dtype=head.fc.bias.dtype).reshape(-1)
    if w.shape != head.fc.weight.shape or b.shape != head.fc.bias.shape:
        raise ValueError(
            f"linear model of shape coef {tuple(w.shape)}, intercept {tuple(b.shape)} does not fit "
            f"the head (weight {tuple(head.fc.weight.shape)}, bias {tuple(head.fc.bias.shape)})"
        )
    head.fc.weight.copy_(w.to(head.fc.weight.device))
    head.fc.bias.copy_(b.to(head.fc.bias.device))
    return head
