"""New classification heads on pooled features: linear or a small MLP with dropout.

Multi-label tasks use the same head; the sigmoid is applied downstream (losses/probabilities).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

HEAD_KINDS = ("linear", "mlp")


class ClassifierHead(nn.Module):
    """``dropout -> fc`` (linear) or ``fc1 -> ReLU -> dropout -> fc`` (MLP); ``fc`` is always the
    output layer, so a linear probe's coefficients or a pretrained classifier go into ``fc``."""

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
            self.act = nn.Identity()
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
    into a linear head, in place. Raises ValueError for an MLP head or mismatched shapes."""
    if head.kind != "linear":
        raise ValueError("head_from_linear needs a linear head (model.head=linear)")
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
