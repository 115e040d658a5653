"""The fold runner: one cross-validation fold in, one fold result out.

It is the unit a fold job runs on its own: it reads only the prepared data, the config and
the fold number, and writes only under ``run_dir/folds/fold_<k>/``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtl.config import CVConfig, PipelineConfig
from medtl.jobs.prepare import TrainData
from medtl.training.distributed import DistContext


@dataclass
class FoldResult:
    """One fold's validation predictions and how it trained."""

    fold: int
    val_records: list[dict[str, Any]]
    probs: np.ndarray  # (n_val, n_classes), in val_records order
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # 0-based
    # cv.selection inner/fixed: the model's own inner validation split of its training
    # patients and its predictions there (they fit the fold's calibrator and threshold).
    inner_records: list[dict[str, Any]] | None = None
    inner_probs: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        """The validation labels, as the threshold search takes them."""
        return np.asarray([r["label"] for r in self.val_records])

    @property
    def epochs_to_best(self) -> int:
        """Epochs trained up to and including the best one."""
        return self.best_epoch + 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU runs are reproducible."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fold_ids(data: TrainData, cv: CVConfig) -> list[int]:
    """The folds this job runs: every CV fold, or those in ``cv.only_folds``."""
    folds = sorted({r["fold"] for r in data.train_pool if r["fold"] >= 0})
    if cv.only_folds is not None:
        folds = [k for k in folds if k in cv.only_folds]
    return folds


def fold_split(data: TrainData, k: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fold ``k``'s training records (every other fold) and validation records."""
    pool = data.train_pool
    return [r for r in pool if r["fold"] != k], [r for r in pool if r["fold"] == k]


def fold_dir(run_dir: Path, k: int) -> Path:
    """Where fold ``k`` keeps its checkpoints and history."""
    return run_dir / "folds" / f"fold_{k}"


def run_fold(
    cfg: PipelineConfig,
    data: TrainData,
    k: int,
    run_dir: Path,
    dist: DistContext,
    log_fn: Callable[[dict, int], None] | None = None,
    target_ds: Any | None = None,
) -> FoldResult:
    """Train on every other fold's patients by ``cv.selection``, predict fold ``k``; resumes
    from its last.pt. Every rank returns the same result; only rank 0 writes ``history.csv``.
    """
    from medtl.data import build_dataset
    from medtl.jobs.selection import train_selected
    from medtl.models import create_model
    from medtl.training import fit, predict_proba

    tr, va = fold_split(data, k)
    seed_everything(cfg.seed + k)
    model = create_model(cfg.model, len(data.classes), spatial_dims=cfg.spatial_dims)
    tfm, cache, workdir = data.transforms, cfg.data.cache, fold_dir(run_dir, k)
    val_ds = build_dataset(va, tfm.eval, data.cache_dir, cache)
    if cfg.cv.selection == "outer":  # the reported fold picks the epoch (optimistic)
        train_ds = build_dataset(tr, tfm.train, data.cache_dir, cache)
        result = fit(
            cfg,
            model,
            train_ds,
            val_ds,
            workdir=workdir,
            log_fn=log_fn,
            dist=dist,
            target_ds=target_ds,
        )
        out = FoldResult(k, va, result.val_probs, result.history, int(result.best_epoch))
    else:
        sel = train_selected(
            cfg, model, tr, tfm, data.cache_dir, workdir, dist, cfg.seed + k, log_fn, target_ds
        )
        probs = predict_proba(sel.model, val_ds, cfg, dist)
        out = FoldResult(
            k, va, probs, sel.history, sel.best_epoch, sel.inner_records, sel.inner_probs
        )
    if dist.is_main:
        pd.DataFrame(out.history).to_csv(workdir / "history.csv", index=False)
    return out
