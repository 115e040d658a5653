"""Public training API: ``fit`` (one strategy on one train/val split) and ``predict_proba``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl.config import PipelineConfig
from medtl.models.model import MedtlModel
from medtl.training.distributed import DistContext, infer_device_for
from medtl.training.engine import (
    Engine,
    auto_num_workers,
    dataset_labels,
    infer_rows,
    model_num_classes,
    probabilities,
    resolve_amp,
    resolve_task,
)
from medtl.training.strategies import get_strategy


@dataclass
class FitResult:
    """A trained model (best epoch's weights), its per-epoch history and validation output."""

    model: MedtlModel
    history: list[dict[str, Any]] = field(default_factory=list)
    val_probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    best_epoch: int = 0


def fit(
    cfg: PipelineConfig,
    model: MedtlModel,
    train_ds: Any,
    val_ds: Any | None,
    *,
    workdir: Path,
    log_fn: Callable[[dict, int], None] | None = None,
    resume: bool = True,
    dist: DistContext | None = None,
    target_ds: Any | None = None,
) -> FitResult:
    """Train ``model`` with the strategy ``cfg.strategy.name`` and return the best epoch's model.

    Args:
        cfg: the pipeline config (``data.task`` resolved by the caller, else inferred from labels).
        model: a ``MedtlModel`` (``forward_features``, ``forward_head``, ``stage_groups``).
        train_ds, val_ds: datasets of ``{"image", "label", "index"}`` with ``.records``; ``val_ds``
            may be None (final refit: no early stopping, the last epoch is kept).
        workdir: checkpoints (best.pt, last.pt) go here; a last.pt from the same config resumes.
        log_fn: called as ``log_fn(metrics, epoch)`` on rank 0 after each epoch (e.g. MLflow).
        resume: continue from ``workdir/last.pt`` when present.
        dist: torchrun context (``init_distributed()``); None = single process.
        target_ds: unlabelled target-site images for a joint ``domain_adaptation.method``
            (coral, dann); ignored otherwise.
    Returns:
        FitResult with ``val_probs`` (N_val, C) in ``val_ds`` order (identical on every rank).
    """
    engine = Engine(
        cfg,
        model,
        train_ds,
        val_ds,
        get_strategy(cfg, target_ds),
        workdir=Path(workdir),
        log_fn=log_fn,
        dist=dist,
        resume=resume,
    )
    engine.strategy.train(engine)
    engine.finish()
    if engine.val_probs is None:  # finish() always sets them
        raise RuntimeError("training finished without validation probabilities")
    return FitResult(
        model=engine.model,
        history=engine.extra_history + engine.history,
        val_probs=engine.val_probs,
        best_epoch=max(engine.best_epoch, 0),
    )


def predict_proba(
    model: MedtlModel, dataset: Any, cfg: PipelineConfig, dist: DistContext | None = None
) -> np.ndarray:
    """(N, C) probabilities in dataset order: softmax for single-label (binary: 2 columns),
    sigmoid for multi-label. No augmentation is applied here; pass an evaluation dataset."""
    from monai.data import DataLoader

    dist = dist or DistContext()
    device = infer_device_for(model, cfg, dist)
    model.to(device)
    amp_dtype, _ = resolve_amp(cfg.train.amp, device)
    channels_last = cfg.train.channels_last and cfg.spatial_dims == 2 and device.type == "cuda"
    workers = auto_num_workers(cfg.data.num_workers, dist.world_size)

    def make_loader(ds, sampler):
        return DataLoader(
            ds,
            batch_size=cfg.train.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )

    def to_input(batch):
        x = batch["image"]
        x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device).float()
        return (
            x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x
        )

    def autocast():
        if amp_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=amp_dtype)

    logits = infer_rows(lambda m, x: m(x), model, dataset, make_loader, to_input, autocast, dist)
    labels = dataset_labels(dataset) if getattr(dataset, "records", None) is not None else None
    task: str = cfg.data.task
    if task == "auto":
        n = model_num_classes(model)
        task = resolve_task(cfg, labels if labels is not None else np.zeros(0), n)
    return probabilities(logits, task)
