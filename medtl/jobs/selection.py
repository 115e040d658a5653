"""Model selection that never looks at the reported fold (``cv.selection``).

A model — each fold's, and the refit — picks its epoch (``inner``), its calibrator and its
operating threshold on an inner validation split of its own training patients, so a fold's
reported predictions carry no information chosen on that fold. ``outer`` (the reported fold
chooses the epoch; other folds' predictions choose calibration and thresholds) is kept for
comparison and flagged as optimistic in the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtl.config import CVConfig, PipelineConfig
from medtl.errors import ConfigError
from medtl.evaluation.calibrators import (
    Calibration,
    apply_calibration,
    fit_calibration,
    resolve_method,
)
from medtl.jobs.prepare import Preprocessing
from medtl.models.model import MedtlModel
from medtl.training.distributed import DistContext

RULES = {
    "inner": (
        "epoch and early stopping on an inner validation split of each model's own training "
        "patients ({pct:.0%}, patient-grouped, stratified); calibration and threshold on the "
        "same inner split. The reported fold is never used to choose anything"
    ),
    "fixed": (
        "a fixed {epochs} epoch(s), no epoch choice; calibration and threshold on an inner "
        "validation split of each model's own training patients ({pct:.0%}). The reported "
        "fold is never used to choose anything"
    ),
    "outer": (
        "epoch and early stopping on the reported fold itself; calibration and thresholds on "
        "the other folds' predictions. OPTIMISTIC: the reported fold chose the epoch"
    ),
}


def rule_text(cv: CVConfig, epochs: int) -> str:
    """One sentence stating how models were selected (for the report and the model card)."""
    return RULES[cv.selection].format(pct=cv.inner_fraction, epochs=epochs)


@dataclass(frozen=True)
class OperatingPoint:
    """A model's calibrator and the threshold chosen on calibrated held-out predictions."""

    calibration: Calibration
    threshold: Any  # float, or one per class
    n_images: int  # how many held-out images chose them
    note: str | None = None  # set when the held-out images could not choose (one class)


def labels_of(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Record labels as the threshold search and the calibrators take them."""
    return np.asarray([r["label"] for r in records])


def choose_threshold_for(y: np.ndarray, probs: np.ndarray, task: str, cv: CVConfig) -> Any:
    """Operating threshold(s) on held-out predictions, as ``cv.threshold`` asks."""
    from medtl.cv import choose_thresholds

    return choose_thresholds(y, probs, task, cv.threshold, cv.target_sensitivity)


def fit_operating_point(
    y: np.ndarray, probs: np.ndarray, task: str, cfg: PipelineConfig
) -> OperatingPoint:
    """Fit ``evaluation.calibration`` on held-out predictions, then the threshold on the
    calibrated ones."""
    method = resolve_method(cfg.evaluation.calibration, task)
    cal = fit_calibration(method, y, probs, task)
    if task == "binary" and len(np.unique(np.asarray(y).astype(int))) < 2:
        # Tiny data: the held-out images hold one class, so no ROC curve exists.
        note = f"{len(y)} held-out image(s) of one class: threshold 0.5, no calibration"
        return OperatingPoint(cal, 0.5, len(y), note)
    threshold = choose_threshold_for(y, apply_calibration(cal, probs, task), task, cfg.cv)
    return OperatingPoint(cal, threshold, len(y))


def inner_split(
    records: Sequence[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(fit, inner validation) records: patient-grouped and label-stratified, about
    ``fraction`` of the patients in the inner validation part."""
    from sklearn.model_selection import StratifiedGroupKFold

    keys = np.asarray([str(r["label"]) for r in records])
    groups = np.asarray([str(r["patient_id"]) for r in records])
    n_splits = max(2, round(1 / fraction))
    if len(set(groups)) < n_splits:
        raise ConfigError(
            f"cv.inner_fraction={fraction} needs at least {n_splits} training patients per "
            f"model, found {len(set(groups))}; use more patients, a larger cv.inner_fraction "
            "or cv.selection=outer"
        )
    x = np.zeros(len(keys))
    try:
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        fit_idx, val_idx = next(iter(sgkf.split(x, keys, groups)))
    except ValueError:  # a class with fewer patients than splits: group by patient only
        from sklearn.model_selection import GroupShuffleSplit

        gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        fit_idx, val_idx = next(iter(gss.split(x, keys, groups)))
    return [records[i] for i in fit_idx], [records[i] for i in val_idx]


@dataclass
class SelectedModel:
    """A model trained by the selection rule, with what its inner split saw."""

    model: MedtlModel
    history: list[dict[str, Any]]
    best_epoch: int  # 0-based; the last epoch under "fixed"
    inner_records: list[dict[str, Any]]
    inner_probs: np.ndarray


def train_selected(
    cfg: PipelineConfig,
    model: MedtlModel,
    records: Sequence[dict[str, Any]],
    transforms: Preprocessing,
    cache_dir: Path,
    workdir: Path,
    dist: DistContext,
    seed: int,
    log_fn: Callable[[dict, int], None] | None = None,
    target_ds: Any | None = None,
) -> SelectedModel:
    """Train on ``records`` by ``cv.selection`` = inner or fixed: the inner split chooses
    the epoch (inner only); the returned inner predictions fit calibration and threshold."""
    from medtl.data import build_dataset
    from medtl.training import fit, predict_proba

    fit_recs, inner = inner_split(records, cfg.cv.inner_fraction, seed)
    cache = cfg.data.cache
    train_ds = build_dataset(fit_recs, transforms.train, cache_dir, cache)
    inner_ds = build_dataset(inner, transforms.eval, cache_dir, cache)
    if cfg.cv.selection == "inner":
        result = fit(
            cfg,
            model,
            train_ds,
            inner_ds,
            workdir=workdir,
            log_fn=log_fn,
            dist=dist,
            target_ds=target_ds,
        )
        inner_probs = result.val_probs
    else:
        fixed = cfg.model_copy(deep=True)
        fixed.train.early_stopping_patience = None
        result = fit(
            fixed,
            model,
            train_ds,
            None,
            workdir=workdir,
            log_fn=log_fn,
            dist=dist,
            target_ds=target_ds,
        )
        inner_probs = predict_proba(result.model, inner_ds, cfg, dist)
    return SelectedModel(result.model, result.history, result.best_epoch, inner, inner_probs)
