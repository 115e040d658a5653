"""Refit stage: the model that is registered, trained on every non-test patient by the same
procedure the cross-validation estimated."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from medtl.config import PipelineConfig
from medtl.jobs.folds import FoldResult, seed_everything
from medtl.jobs.prepare import TrainData
from medtl.training.distributed import DistContext


def refit_epochs(results: Sequence[FoldResult]) -> int:
    """The median number of epochs the folds took to reach their best epoch (at least 1)."""
    if not results:
        return 1
    return max(1, int(statistics.median(r.epochs_to_best for r in results)))


def refit_final(
    cfg: PipelineConfig, data: TrainData, epochs: int, run_dir: Path, dist: DistContext
) -> nn.Module:
    """Train a fresh model on the whole train pool for ``epochs`` epochs, no early stopping."""
    from medtl.data import build_dataset
    from medtl.models import create_model
    from medtl.training import fit

    final_cfg = cfg.model_copy(deep=True)
    final_cfg.train.epochs = epochs
    final_cfg.train.early_stopping_patience = None
    seed_everything(cfg.seed)
    model = create_model(cfg.model, len(data.classes), spatial_dims=cfg.spatial_dims)
    train_ds = build_dataset(data.train_pool, data.transforms.train, data.cache_dir, cfg.data.cache)
    final = fit(final_cfg, model, train_ds, None, workdir=run_dir / "final", log_fn=None, dist=dist)
    return final.model
