"""Number, interval and threshold formatting shared by the report's sections and callers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

METRIC_LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC (average precision)",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "f1": "F1",
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
    "brier": "Brier score (lower is better)",
    "ece": "ECE (lower is better)",
}
FOLD_COLUMNS = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv")
SUBGROUP_COLUMNS = ("auroc", "sensitivity", "specificity", "ppv", "npv")


def fmt(v: Any, digits: int = 2) -> str:
    """A number as text: integers exactly, others to ``digits`` places, ``n/a`` if undefined."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def format_ci(entry: Mapping[str, Any] | None, digits: int = 2) -> str:
    """``0.91 (0.85–0.96)``; ``n/a`` when undefined; the value alone when there is no CI."""
    if not entry or entry.get("value") is None:
        return "n/a"
    text = fmt(entry["value"], digits)
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" ({fmt(entry['low'], digits)}\u2013{fmt(entry['high'], digits)})"
    return text


def headline_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(metric, "0.91 (0.85–0.96)")`` rows of the pooled summary, for terminals and cards."""
    pooled = metrics.get("pooled", metrics)
    return [(METRIC_LABELS.get(m, m), format_ci(e)) for m, e in pooled.get("summary", {}).items()]


def json_threshold(t: Any) -> float | list[float] | None:
    """A threshold (scalar or one per class) as plain JSON numbers."""
    if t is None:
        return None
    if isinstance(t, list | tuple | np.ndarray):
        return [float(x) for x in t]
    return float(t)


def fmt_threshold(t: Any) -> str:
    """A threshold to three places; per-class thresholds comma-separated."""
    if t is None:
        return "n/a"
    if isinstance(t, list | tuple):
        return ", ".join(fmt(x, 3) for x in t)
    return fmt(t, 3)
