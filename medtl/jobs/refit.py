"""Refit stage: the model that is registered, trained on every non-test patient by the same
procedure the cross-validation estimated (``cv.selection``)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtl.config import PipelineConfig
from medtl.jobs.folds import FoldResult, seed_everything
from medtl.jobs.prepare import TrainData
from medtl.jobs.selection import OperatingPoint, fit_operating_point, labels_of, train_selected
from medtl.models.model import MedtlModel
from medtl.training.distributed import DistContext


@dataclass
class Refit:
    """The final model, how many epochs it trained, and its operating point when its own
    inner split chose one (inner/fixed; under outer the pooled folds choose it)."""

    model: MedtlModel
    epochs: int
    point: OperatingPoint | None = None


def refit_epochs(results: Sequence[FoldResult]) -> int:
    """The median number of epochs the folds took to reach their best epoch (at least 1)."""
    if not results:
        return 1
    return max(1, int(statistics.median(r.epochs_to_best for r in results)))


def refit_final(
    cfg: PipelineConfig,
    data: TrainData,
    folds: Sequence[FoldResult],
    run_dir: Path,
    dist: DistContext,
    *,
    workdir_name: str = "final",
    target_ds: Any | None = None,
) -> Refit:
    """Train a fresh model on the whole train pool by ``cv.selection``: inner/fixed as each
    fold did (its own inner split); outer for the folds' median epochs, no early stopping.
    ``target_ds``: target images for a joint domain-adaptation method."""
    from medtl.data import build_dataset
    from medtl.models import create_model
    from medtl.training import fit

    seed_everything(cfg.seed)
    model = create_model(cfg.model, len(data.classes), spatial_dims=cfg.spatial_dims)
    workdir = run_dir / workdir_name
    if cfg.cv.selection != "outer":
        sel = train_selected(
            cfg,
            model,
            data.train_pool,
            data.transforms,
            data.cache_dir,
            workdir,
            dist,
            cfg.seed,
            target_ds=target_ds,
        )
        point = fit_operating_point(labels_of(sel.inner_records), sel.inner_probs, data.task, cfg)
        return Refit(sel.model, sel.best_epoch + 1, point)
    epochs = refit_epochs(folds)
    final_cfg = cfg.model_copy(deep=True)
    final_cfg.train.epochs = epochs
    final_cfg.train.early_stopping_patience = None
    train_ds = build_dataset(data.train_pool, data.transforms.train, data.cache_dir, cfg.data.cache)
    final = fit(
        final_cfg,
        model,
        train_ds,
        None,
        workdir=workdir,
        log_fn=None,
        dist=dist,
        target_ds=target_ds,
    )
    return Refit(final.model, epochs)
