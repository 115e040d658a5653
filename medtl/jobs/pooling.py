"""Pooling stage: the folds' predictions as one out-of-fold table, each fold calibrated and
thresholded by an operating point chosen without that fold (see ``selection.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from medtl.config import PipelineConfig
from medtl.evaluation.calibrators import apply_calibration, resolve_method
from medtl.evaluation.report.write import UNCALIBRATED_PREFIX
from medtl.jobs.folds import FoldResult
from medtl.jobs.selection import OperatingPoint, fit_operating_point, labels_of


@dataclass
class PooledResult:
    """Out-of-fold predictions (calibrated) with each fold's operating point."""

    oof: pd.DataFrame  # one row per validation image (the report derives ``pred`` itself)
    fold_points: dict[int, OperatingPoint]

    @property
    def fold_thresholds(self) -> dict[int, Any]:
        """Each fold's threshold (float, or one per class)."""
        return {k: p.threshold for k, p in self.fold_points.items()}


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
    uncalibrated: np.ndarray | None = None,
) -> pd.DataFrame:
    """Prediction rows in the report's layout: image, patient, fold, label, prob_<class>...
    (and ``uncal_prob_<class>`` when ``probs`` were recalibrated from ``uncalibrated``)."""
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
    if uncalibrated is not None:
        for i, c in enumerate(classes):
            rows[f"{UNCALIBRATED_PREFIX}{c}"] = uncalibrated[:, i]
    return pd.DataFrame(rows)


def fold_operating_point(
    results: Sequence[FoldResult], k: int, task: str, cfg: PipelineConfig
) -> OperatingPoint:
    """Fold ``k``'s calibrator and threshold: on its own model's inner split (inner/fixed), or
    on the OTHER folds' predictions (outer; its own when it ran alone)."""
    own = next(r for r in results if r.fold == k)
    if own.inner_records is not None and own.inner_probs is not None:
        return fit_operating_point(labels_of(own.inner_records), own.inner_probs, task, cfg)
    others = [r for r in results if r.fold != k] or [own]  # one fold run: nothing else
    y = np.concatenate([r.labels for r in others])
    p = np.concatenate([r.probs for r in others])
    return fit_operating_point(y, p, task, cfg)


def pooled_operating_point(
    results: Sequence[FoldResult], task: str, cfg: PipelineConfig
) -> OperatingPoint:
    """The deployed model's operating point under ``cv.selection=outer``: fitted on all pooled
    out-of-fold predictions (0.5 and no calibration when no fold ran)."""
    from medtl.evaluation.calibrators import IDENTITY

    if not results:
        return OperatingPoint(IDENTITY, 0.5, 0)
    y = np.concatenate([r.labels for r in results])
    p = np.concatenate([r.probs for r in results])
    return fit_operating_point(y, p, task, cfg)


def pool_folds(
    results: Sequence[FoldResult],
    classes: list[str],
    task: str,
    subgroups: Sequence[str],
    cfg: PipelineConfig,
) -> PooledResult:
    """One out-of-fold table in fold order, each fold calibrated by its own operating point."""
    points = {r.fold: fold_operating_point(results, r.fold, task, cfg) for r in results}
    recalibrated = resolve_method(cfg.evaluation.calibration, task) != "none"
    parts = []
    for r in results:
        cal = points[r.fold].calibration
        probs = apply_calibration(cal, r.probs, task) if recalibrated else r.probs
        raw = r.probs if recalibrated else None
        parts.append(oof_frame(r.val_records, probs, r.fold, classes, task, subgroups, raw))
    oof = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return PooledResult(oof, points)
