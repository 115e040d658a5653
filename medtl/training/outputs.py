"""Model outputs during training: logits to probabilities, and the validation AUROC that
early stopping monitors (pure functions, shared by the engine and feature extraction)."""

from __future__ import annotations

import numpy as np
import torch


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    """Softmax (single-label, binary as 2 columns) or sigmoid (multi-label) of (N, C) logits."""
    t = torch.as_tensor(logits, dtype=torch.float32)
    p = torch.sigmoid(t) if task == "multilabel" else torch.softmax(t, dim=1)
    return p.numpy()


def auroc(labels: np.ndarray, probs: np.ndarray, task: str) -> float:
    """Validation AUROC: binary on the positive column, macro one-vs-rest otherwise; NaN if undefined."""
    from sklearn.metrics import roc_auc_score

    if len(labels) == 0:
        return float("nan")
    try:
        if task == "binary":
            if len(np.unique(labels)) < 2:
                return float("nan")
            return float(roc_auc_score(labels.astype(int), probs[:, 1]))
        if task == "multiclass":
            present = np.unique(labels.astype(int))
            if len(present) < 2:
                return float("nan")
            if len(present) == probs.shape[1]:
                return float(roc_auc_score(labels.astype(int), probs, multi_class="ovr"))
            scores = [roc_auc_score(labels == c, probs[:, c]) for c in present]
            return float(np.mean(scores))
        y = labels.reshape(len(labels), -1)
        scores = [
            roc_auc_score(y[:, c], probs[:, c])
            for c in range(y.shape[1])
            if 0 < y[:, c].sum() < len(y)
        ]
        return float(np.mean(scores)) if scores else float("nan")
    except ValueError:
        return float("nan")
