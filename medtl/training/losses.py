"""Losses for single-label (binary, multiclass) and multi-label tasks, with class weighting.

Defaults: ``train.loss=ce`` (cross-entropy; BCE-with-logits for multi-label). ``weighted_ce``
weights classes by inverse frequency (normalised to mean 1; multi-label: BCE ``pos_weight`` =
negatives/positives per label). ``focal`` is MONAI's focal loss (softmax for single-label,
sigmoid for multi-label), unweighted: its gamma already down-weights the easy majority.
Binary tasks use two softmax columns.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medtl.config import TrainConfig
from medtl.errors import look_up_option

TASKS = ("binary", "multiclass", "multilabel")


def class_frequency_weights(labels: np.ndarray, num_classes: int, task: str) -> np.ndarray:
    """Inverse-frequency class weights (mean 1); multi-label: negatives/positives per label."""
    labels = np.asarray(labels)
    if task == "multilabel":
        pos = labels.reshape(len(labels), num_classes).sum(0).astype(float)
        neg = len(labels) - pos
        return neg / np.maximum(pos, 1.0)
    counts = np.bincount(labels.astype(int), minlength=num_classes).astype(float)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1.0), 0.0)
    return w * (num_classes / max(w.sum(), 1e-12))


class _SingleLabelFocal(nn.Module):
    """Softmax focal loss on (B, C) logits and integer targets, via MONAI's FocalLoss."""

    def __init__(self, gamma: float, weight: torch.Tensor | None):
        super().__init__()
        from monai.losses import FocalLoss

        self.inner = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma, weight=weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # MONAI averages over classes as well as samples; scale back to a per-sample sum.
        return self.inner(logits, target.long().view(-1, 1)) * logits.shape[1]


class _MultiLabelFocal(nn.Module):
    """Sigmoid focal loss on (B, C) logits and multi-hot targets, via MONAI's FocalLoss."""

    def __init__(self, gamma: float, weight: torch.Tensor | None):
        super().__init__()
        from monai.losses import FocalLoss

        self.inner = FocalLoss(use_softmax=False, gamma=gamma, weight=weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(logits, target.float())


class _CE(nn.Module):
    """Cross-entropy on integer targets (accepts (B,) or (B, 1) label tensors)."""

    def __init__(self, weight: torch.Tensor | None, smoothing: float):
        super().__init__()
        self.inner = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(logits, target.long().view(-1))


class _BCE(nn.Module):
    """BCE-with-logits on multi-hot targets, optional per-label ``pos_weight``."""

    def __init__(self, pos_weight: torch.Tensor | None):
        super().__init__()
        self.inner = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(logits, target.float().view_as(logits))


def build_loss(
    tcfg: TrainConfig, task: str, num_classes: int, labels: np.ndarray | None = None
) -> nn.Module:
    """The loss named by ``train.loss`` for ``task``; ``labels`` (training set) give class weights.

    Args:
        tcfg: training config (``loss``, ``focal_gamma``, ``label_smoothing``).
        task: binary | multiclass | multilabel.
        num_classes: number of output columns.
        labels: training labels, (N,) ints or (N, C) multi-hot; needed for ``weighted_ce``.
    Returns:
        a module ``loss(logits (B, C), target) -> scalar``.
    """
    look_up_option(task, TASKS, "task")
    name = look_up_option(tcfg.loss, ("ce", "weighted_ce", "focal"), "train.loss")
    weight = None
    if name == "weighted_ce" and labels is not None and len(labels):
        weight = torch.as_tensor(
            class_frequency_weights(labels, num_classes, task), dtype=torch.float32
        )
    if task == "multilabel":
        if name == "focal":
            return _MultiLabelFocal(tcfg.focal_gamma, weight)
        return _BCE(weight if name == "weighted_ce" else None)
    if name == "focal":
        return _SingleLabelFocal(tcfg.focal_gamma, weight)
    return _CE(weight if name == "weighted_ce" else None, tcfg.label_smoothing)
