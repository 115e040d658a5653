"""Calibration: reliability-diagram data (scikit-learn) and the expected calibration error.

Bins are equal-width on [0, 1] and assign a probability exactly on an edge to the lower bin,
the same rule as ``sklearn.calibration.calibration_curve(strategy="uniform")``, so the ECE
and the diagram always describe the same bins.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
from sklearn.calibration import calibration_curve

__all__ = ["ReliabilityCurve", "bin_ids", "expected_calibration_error", "reliability_curve"]


class ReliabilityCurve(TypedDict):
    """What :func:`reliability_curve` returns (a plain dict at run time)."""

    prob_true: list[float]
    prob_pred: list[float]
    count: list[int]
    ece: float
    n_bins: int


def bin_ids(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index 0..n_bins-1 of each probability (scikit-learn's uniform binning rule)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], np.asarray(p, dtype=float))


def expected_calibration_error(
    y: np.ndarray, p: np.ndarray, n_bins: int = 10, sample_weight: np.ndarray | None = None
) -> float:
    """ECE = sum over bins of (bin share) x |observed rate - mean probability|.

    Hand-written: scikit-learn has the reliability curve but no ECE.
    """
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    w = np.ones_like(p) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    ids = bin_ids(p, n_bins)
    total = np.bincount(ids, weights=w, minlength=n_bins)
    gap = np.bincount(ids, weights=w * (y - p), minlength=n_bins)
    return float(np.abs(gap).sum() / total.sum())


def reliability_curve(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> ReliabilityCurve:
    """Observed positive rate vs mean predicted probability per non-empty bin, with counts."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform", pos_label=1)
    counts = np.bincount(bin_ids(p, n_bins), minlength=n_bins)
    return {
        "prob_true": [float(v) for v in prob_true],
        "prob_pred": [float(v) for v in prob_pred],
        "count": [int(c) for c in counts[counts > 0]],
        "ece": expected_calibration_error(y, p, n_bins),
        "n_bins": n_bins,
    }
