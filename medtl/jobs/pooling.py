"""Pooling stage: the folds' predictions as one out-of-fold table, and operating thresholds
that are never tuned on the predictions they are reported on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from medtl.config import CVConfig
from medtl.jobs.folds import FoldResult


@dataclass
class PooledResult:
    """Out-of-fold predictions with each fold's threshold and the deployed model's."""

    oof: pd.DataFrame  # one row per validation image (the report derives ``pred`` itself)
    fold_thresholds: dict[int, Any]  # float, or one per class
    threshold: Any  # the deployed model's: chosen on all pooled out-of-fold predictions


def label_names(label: Any, classes: list[str], task: str) -> str:
    """A record's label as text: the class name, or ``a|b`` for multi-label."""
    if task == "multilabel":
        return "|".join(c for c, v in zip(classes, label, strict=True) if v)
    return classes[int(label)]


def oof_frame(
    records: list[dict],
    probs: np.ndarray,
    fold: int,
    classes: list[str],
    task: str,
    extra_cols: Sequence[str],
) -> pd.DataFrame:
    """Prediction rows in the report's layout: image, patient, fold, label, prob_<class>..."""
    rows: dict[str, Any] = {
        "image": [r["image_rel"] for r in records],
        "patient_id": [r["patient_id"] for r in records],
        "fold": fold,
        "label": [label_names(r["label"], classes, task) for r in records],
    }
    for i, c in enumerate(classes):
        rows[f"prob_{c}"] = probs[:, i]
    for col in extra_cols:
        rows[col] = [r.get(col) for r in records]
    return pd.DataFrame(rows)


def choose(y: np.ndarray, probs: np.ndarray, task: str, cv: CVConfig) -> Any:
    """Operating threshold(s) chosen on held-out predictions, as ``cv.threshold`` asks."""
    from medtl.cv import choose_thresholds

    return choose_thresholds(y, probs, task, cv.threshold, cv.target_sensitivity)


def fold_threshold(results: Sequence[FoldResult], k: int, task: str, cv: CVConfig) -> Any:
    """Fold ``k``'s threshold, chosen on the OTHER folds' predictions (its own when alone)."""
    own = next(r for r in results if r.fold == k)
    others = [r for r in results if r.fold != k]
    if not others:  # a single fold was run (cv.only_folds): nothing else to tune on
        return choose(own.labels, own.probs, task, cv)
    y = np.concatenate([r.labels for r in others])
    p = np.concatenate([r.probs for r in others])
    return choose(y, p, task, cv)


def pool_folds(
    results: Sequence[FoldResult],
    classes: list[str],
    task: str,
    subgroups: Sequence[str],
    cv: CVConfig,
) -> PooledResult:
    """One out-of-fold table in fold order, per-fold thresholds and the deployed threshold."""
    thresholds = {r.fold: fold_threshold(results, r.fold, task, cv) for r in results}
    parts = [oof_frame(r.val_records, r.probs, r.fold, classes, task, subgroups) for r in results]
    if results:
        y = np.concatenate([r.labels for r in results])
        p = np.concatenate([r.probs for r in results])
        threshold = choose(y, p, task, cv)
    else:
        threshold = 0.5
    oof = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return PooledResult(oof, thresholds, threshold)
