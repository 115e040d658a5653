"""The training loop: a skeleton of named hooks (nnU-Net style) that strategies override.

Per epoch: ``seed_epoch`` -> ``strategy.on_epoch_start`` (freezing) -> ``strategy.train_mode``
-> ``train_epoch`` (``strategy.training_step`` per batch, gradient accumulation, AMP, scheduler
per optimizer step) -> ``validate`` -> ``on_epoch_end`` (best.pt, early stopping, last.pt).

Reproducibility: every random draw of an epoch (sampler order, MONAI augmentations, dropout)
is a function of ``seed + epoch``, and last.pt holds model, optimizer, scheduler, scaler,
history, best metric and the early-stop counter, so a killed run resumed from last.pt ends
with the same weights and metrics as an uninterrupted one (CPU; on GPU up to cuDNN
non-determinism). Checkpoints are plain tensors/containers loaded with ``weights_only=True``.

Input pipeline: with loader workers, one training loader serves every epoch (persistent
workers); its ``EpochSampler`` hands each item's (index, epoch seed) to the workers, so an
item's augmentation depends on (seed, epoch, index) only. On CUDA (``data.augment_device``) the
augmentation runs as batch tensor ops after a side-stream copy (``medtl.augment``,
``feed.py``). Each epoch logs ``data_stall``: host time waiting in ``next(loader)`` over the
epoch's step time (CUDA events on GPU, read once per epoch).
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from medtl.augment import BatchAugment, epoch_augment_seed, resolve_augment_device
from medtl.config import PipelineConfig
from medtl.data import MedtlDataset
from medtl.errors import ConfigError, MedtlError
from medtl.models.model import MedtlModel
from medtl.training.distributed import (
    DistContext,
    all_reduce_mean,
    gather_rows,
    resolve_device,
    shard_sampler,
    sync_buffers,
    unwrap,
    wrap_ddp,
)
from medtl.training.feed import BatchFeed, EpochClock, stall_fraction
from medtl.training.losses import build_loss
from medtl.training.outputs import auroc, probabilities
from medtl.training.protocol import Strategy
from medtl.training.sampling import EpochSampler, build_train_sampler, epoch_generator

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)
PREFETCH_FACTOR = 4  # batches each loader worker keeps ready (torch's default is 2)


# --------------------------------------------------------------------------- small helpers
def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for ``train.amp`` on ``device``.

    auto: bf16 on GPUs that support it, else fp16 + GradScaler; off on CPU.
    """
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None, False
    if mode == "auto":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                "train.amp=fp16 needs a CUDA device; use train.amp=bf16 or off on CPU"
            )
        return torch.float16, True
    return torch.bfloat16, False


def auto_num_workers(setting: int | str, world_size: int = 1) -> int:
    """DataLoader workers: ``auto`` = cores per process minus one for the main loop (max 8),
    0 on machines with 2 cores or fewer per process where worker start-up costs more than it saves."""
    if setting != "auto":
        return int(setting)
    per_proc = (os.cpu_count() or 1) // max(world_size, 1)
    return 0 if per_proc <= 2 else min(8, per_proc - 1)


def dataset_labels(dataset: Any) -> np.ndarray:
    """Labels of a dataset in index order, from its ``.records`` (the data-stage contract)."""
    recs = getattr(dataset, "records", None)
    if recs is None:
        raise TypeError("dataset has no .records; build it with medtl.data.build_dataset")
    return np.asarray([r["label"] for r in recs])


def resolve_task(cfg: PipelineConfig, labels: np.ndarray, num_classes: int) -> str:
    """``cfg.data.task`` unless ``auto``; then multilabel for multi-hot labels, else by #classes."""
    if cfg.data.task != "auto":
        return cfg.data.task
    if labels.ndim == 2 and labels.shape[1] > 1:
        return "multilabel"
    return "binary" if num_classes == 2 else "multiclass"


def model_num_classes(model: MedtlModel) -> int:
    """Output columns of the model's head."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    head_was_training = model.training
    model.eval()
    with torch.no_grad():
        dev = next(model.parameters()).device
        out = model.forward_head(torch.zeros(2, model.num_features, device=dev))
    model.train(head_was_training)
    return int(out.shape[1])


def seed_epoch(seed: int, epoch: int) -> int:
    """Seed Python, NumPy and torch for one epoch; returns the derived seed."""
    s = (int(seed) * 1_000_003 + int(epoch)) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write never leaves a half checkpoint behind


def _rng_state() -> dict[str, Any]:
    # legacy=True (the default) gives the tuple form; the stubs also allow the dict form.
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _schedule_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine to 0 (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "none":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- the engine
class Engine:
    """Trains ``model`` on ``train_ds`` (validating on ``val_ds``) with one strategy's hooks."""

    def __init__(
        self,
        cfg: PipelineConfig,
        model: MedtlModel,
        train_ds: Any,
        val_ds: Any | None,
        strategy: Strategy,
        *,
        workdir: Path,
        log_fn: Callable[[dict, int], None] | None = None,
        dist: DistContext | None = None,
        resume: bool = True,
    ):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.dist = dist or DistContext()
        self.strategy = strategy
        self.workdir = Path(workdir)
        self.log_fn = log_fn
        self.resume = resume
        self.train_ds, self.val_ds = train_ds, val_ds
        self.device = (
            self.dist.device if self.dist.distributed else resolve_device(self.tcfg.device)
        )
        self.model = model.to(self.device)
        self.channels_last = (
            self.tcfg.channels_last and cfg.spatial_dims == 2 and self.device.type == "cuda"
        )
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.amp_dtype, use_scaler = resolve_amp(self.tcfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.train_labels = dataset_labels(train_ds)
        self.val_labels = dataset_labels(val_ds) if val_ds is not None else None
        self.num_classes = model_num_classes(self.model)
        self.task = resolve_task(cfg, self.train_labels, self.num_classes)
        self.loss_fn = build_loss(self.tcfg, self.task, self.num_classes, self.train_labels).to(
            self.device
        )
        self.num_workers = auto_num_workers(cfg.data.num_workers, self.dist.world_size)
        self.batch_augment, self._train_source = self._augment_plan(train_ds)
        self._train_dl: Any = None  # built once when workers > 0 (persistent workers)
        self._train_sampler: EpochSampler | None = None
        self._val_dl: Any = None
        self.history: list[dict[str, Any]] = []
        self.extra_history: list[dict[str, Any]] = []  # e.g. LP-FT probe rows
        self.best_metric: float | None = None
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self.start_epoch = 0
        self.stopped = False
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.val_probs: np.ndarray | None = None
        self.val_probs_final = False  # set by paths that already computed them from best weights
        self.best_val_probs: np.ndarray | None = None  # validate()'s output at the best epoch
        self._current: nn.Module = self.model
        self._wrapped: nn.Module | None = None
        self._wrapped_key: frozenset[int] | None = None
        if self.dist.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def opt(self) -> torch.optim.Optimizer:
        """The optimizer (``build_optimizer`` made it)."""
        if self.optimizer is None:
            raise MedtlError("Engine.build_optimizer() must run before training or resuming")
        return self.optimizer

    @property
    def sched(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate scheduler (``build_optimizer`` made it)."""
        if self.scheduler is None:
            raise MedtlError("Engine.build_optimizer() must run before training or resuming")
        return self.scheduler

    # -- data ----------------------------------------------------------------------------
    def _augment_plan(self, train_ds: Any) -> tuple[BatchAugment | None, Any]:
        """(batch augmentation or None, the dataset the training loader reads).

        On the device (``data.augment_device``), the loader yields the deterministic images and
        ``augment_batch`` applies the preset's random transforms after the copy.
        """
        where = resolve_augment_device(self.cfg.data.augment_device, self.device)
        random = getattr(train_ds, "random", None)
        if where != "cuda" or not isinstance(train_ds, MedtlDataset) or random is None:
            return None, train_ds
        batch_augment = BatchAugment.from_monai(random)
        if not batch_augment.ops:  # no augmentation (transforms.augment=none)
            return None, train_ds
        return batch_augment, train_ds.deterministic_view()

    def _make_loader(
        self, dataset: Any, sampler=None, epoch: int = 0, drop_last: bool = False, persist=False
    ):
        from monai.data import DataLoader

        workers = self.num_workers
        more: dict[str, Any] = {}
        if workers > 0:
            more = {"persistent_workers": persist, "prefetch_factor": PREFETCH_FACTOR}
        return DataLoader(
            dataset,
            batch_size=self.tcfg.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            # The loader's own generator: iterators draw their worker seeds from it, never
            # from the global torch RNG (dropout's), so a resumed run replays the same masks.
            generator=epoch_generator(self.cfg.seed + 7919, epoch),
            **more,
        )

    def _eval_loader(self, dataset: Any, sampler=None):
        """Inference loader; the validation set's is built once (persistent workers).

        ``sampler`` (``shard_sampler``: a pure function of the dataset and ranks) is the same
        every epoch, so the first one built stays with the loader.
        """
        if dataset is not self.val_ds or self.num_workers == 0:
            return self._make_loader(dataset, sampler)
        if self._val_dl is None:
            self._val_dl = self._make_loader(dataset, sampler, persist=True)
        return self._val_dl

    def _epoch_sampler(self, epoch: int):
        return build_train_sampler(
            self._train_source,
            self.train_labels,
            self.task,
            mode=self.tcfg.sampler,
            weighting=self.tcfg.sampler_weighting,
            beta=self.tcfg.effective_beta,
            seed=self.cfg.seed,
            epoch=epoch,
            dist=self.dist,
        )

    def _drop_last(self, n: int) -> bool:
        # A last batch of one breaks BatchNorm in train mode; drop it when that happens.
        return n > 1 and n % self.tcfg.batch_size == 1

    def train_loader(self, epoch: int):
        """The epoch's training loader (class-balanced sampler seeded by seed + epoch).

        With workers, one loader serves every epoch (persistent workers): ``set_epoch`` picks
        the epoch's draws and its keys carry the augmentation seed, so each item's augmentation
        is a function of (seed, epoch, index). Without workers, a fresh loader per epoch with
        MONAI's sequential per-epoch seeding (the stream tests/golden pins).
        """
        if self.num_workers == 0:
            sampler = self._epoch_sampler(epoch)
            if self.batch_augment is None:
                from monai.data.utils import set_rnd

                set_rnd(self._train_source, seed=(self.cfg.seed * 7919 + epoch) % (2**31 - 1))
            return self._make_loader(
                self._train_source, sampler, epoch, self._drop_last(len(sampler))
            )
        if self._train_sampler is None:
            keyed = isinstance(self._train_source, MedtlDataset)
            self._train_sampler = EpochSampler(self._epoch_sampler, self.cfg.seed, keyed=keyed)
            drop = self._drop_last(len(self._train_sampler))  # the same N draws every epoch
            self._train_dl = self._make_loader(
                self._train_source, self._train_sampler, drop_last=drop, persist=True
            )
        self._train_sampler.set_epoch(epoch)
        return self._train_dl

    def release_loaders(self) -> None:
        """Let the persistent loaders' worker processes go (they end with their iterators)."""
        self._train_dl = self._train_sampler = self._val_dl = None

    def augment_batch(self, batch: dict[str, Any], aug_seed: int) -> dict[str, Any]:
        """The GPU path: the preset's random transforms as tensor ops on the device batch,
        keyed by (epoch seed, dataset index) like the CPU path."""
        if self.batch_augment is None:
            return batch
        x = batch["image"]
        x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(self.device, non_blocking=True)
        index = torch.as_tensor(batch["index"]).to(self.device, non_blocking=True)
        return {**batch, "image": self.batch_augment(x.float(), aug_seed, index)}

    def to_input(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"]
        if hasattr(x, "as_tensor"):  # MONAI MetaTensor -> plain tensor (no meta tracking cost)
            x = x.as_tensor()
        x = x.to(self.device, non_blocking=True).float()
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def to_target(self, batch: dict[str, Any]) -> torch.Tensor:
        y = batch["label"]
        if hasattr(y, "as_tensor"):
            y = y.as_tensor()
        y = torch.as_tensor(y).to(self.device, non_blocking=True)
        return y.float() if self.task == "multilabel" else y.long().view(-1)

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- model wrapping --------------------------------------------------------------------
    def train_module(self) -> nn.Module:
        """The model as trained this epoch: DDP-wrapped (re-wrapped when the trainable set
        changes, since DDP fixes its parameter list at construction) and optionally compiled."""
        key = frozenset(id(p) for p in self.model.parameters() if p.requires_grad)
        if self._wrapped is None or key != self._wrapped_key:
            m = wrap_ddp(self.model, self.dist)
            if self.tcfg.compile:
                m = cast(nn.Module, torch.compile(m))  # an OptimizedModule; stubs say Callable
            self._wrapped, self._wrapped_key = m, key
        return self._wrapped

    # -- hooks -----------------------------------------------------------------------------
    def default_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward + loss under autocast; returns ``{"loss", "output"}``."""
        x, y = self.to_input(batch), self.to_target(batch)
        with self.autocast():
            out = self._current(x)
        loss = self.loss_fn(out.float(), y)
        return {"loss": loss, "output": out}

    def build_optimizer(self) -> None:
        """Optimizer over the strategy's param groups, and the per-step LR schedule."""
        groups = self.strategy.configure_param_groups(self.model)
        wd = self.tcfg.weight_decay
        if self.tcfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=self.tcfg.lr, momentum=0.9, weight_decay=wd)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=self.tcfg.lr, weight_decay=wd)
        n = len(self.train_loader(0))
        self.steps_per_epoch = max(1, math.ceil(n / self.tcfg.grad_accum))
        total = self.steps_per_epoch * self.tcfg.epochs
        warmup = int(round(self.tcfg.warmup_epochs * self.steps_per_epoch))
        if self.tcfg.scheduler == "onecycle":
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer,
                max_lr=[g["lr"] for g in groups],
                total_steps=total,
                pct_start=min(0.5, warmup / total) if warmup else 0.3,
                anneal_strategy="cos",
                cycle_momentum=self.tcfg.optimizer == "sgd",
            )
        else:
            kind = self.tcfg.scheduler
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: _schedule_factor(kind, s, total, warmup)
            )

    def training_batches(self, epoch: int, feed: BatchFeed | None = None) -> Iterator[dict]:
        """The epoch's batches as the training step gets them (copied, augmented on the device
        when ``batch_augment`` is set)."""
        feed = feed if feed is not None else BatchFeed(self.train_loader(epoch), self.device)
        aug_seed = epoch_augment_seed(self.cfg.seed, epoch)
        for batch in feed:
            yield self.augment_batch(batch, aug_seed)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the epoch's sampler; returns mean loss, images/s, the top LR and
        ``data_stall`` (host time waiting for batches / step time)."""
        loader = self.train_loader(epoch)
        feed = BatchFeed(loader, self.device)
        module = self.train_module()
        self._current = module
        self.strategy.train_mode(self.model, epoch)
        opt, sched, accum = self.opt, self.sched, self.tcfg.grad_accum
        opt.zero_grad(set_to_none=True)
        loss_sum, n_seen, n_batches = torch.zeros((), device=self.device), 0, len(loader)
        t0 = time.perf_counter()
        clock = EpochClock(self.device)
        with self._progress(f"epoch {epoch + 1}/{self.tcfg.epochs}", n_batches) as bar:
            for i, batch in enumerate(self.training_batches(epoch, feed)):
                out = self.strategy.training_step(self, batch)
                loss = out["loss"]
                # Mean over the micro-batches of this accumulation group (the last may be short).
                scaled = loss / min(accum, n_batches - (i // accum) * accum)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                if (i + 1) % accum == 0 or i + 1 == n_batches:
                    if self.scaler:
                        self.scaler.step(opt)
                        self.scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                bs = int(out["output"].shape[0])
                # Summed on the device: a host sync every step would stall the GPU queue.
                loss_sum = loss_sum + loss.detach().float() * bs
                n_seen += bs
                if bar is not None and ((i + 1) % 10 == 0 or i + 1 == n_batches):
                    rate = n_seen / max(time.perf_counter() - t0, 1e-9)
                    bar(i + 1, f"loss {float(loss_sum) / n_seen:.4f}  {rate:.1f} img/s")
        step_s = clock.stop()  # the epoch's one host sync (CUDA events), as float() below
        total_loss = float(loss_sum)
        dt = time.perf_counter() - t0
        sync_buffers(self.model, self.dist)
        return {
            "train_loss": all_reduce_mean(total_loss / max(n_seen, 1), self.dist),
            "images_per_s": n_seen * self.dist.world_size / max(dt, 1e-9),
            "lr": float(opt.param_groups[-1]["lr"]),
            "data_stall": all_reduce_mean(stall_fraction(feed.wait_s, step_s), self.dist),
        }

    @torch.no_grad()
    def infer_logits(self, dataset: Any) -> np.ndarray:
        """(N, C) float32 logits in dataset order; under DDP each rank infers its shard."""
        return self.infer(lambda m, x: m(x), dataset)

    def infer(
        self,
        fn: Callable[[MedtlModel, torch.Tensor], torch.Tensor],
        dataset: Any,
        out: np.ndarray | None = None,
        rows_at: np.ndarray | None = None,
    ) -> np.ndarray:
        """``fn(model, x)`` rows for every sample of ``dataset`` in order (see ``infer_rows``)."""
        return infer_rows(
            fn,
            self.model,
            dataset,
            self._eval_loader,
            self.to_input,
            self.autocast,
            self.dist,
            out=out,
            rows_at=rows_at,
        )

    def validate(self) -> dict[str, float]:
        """Validation loss and AUROC on exactly the N unique validation samples."""
        labels = self.val_labels
        if labels is None:
            raise MedtlError("Engine.validate() needs a validation dataset (val_ds is None)")
        logits = self.infer_logits(self.val_ds)
        y = torch.as_tensor(labels)
        y = y.float() if self.task == "multilabel" else y.long().view(-1)
        with torch.no_grad():
            t = torch.from_numpy(logits).to(self.device)
            loss = float(self.loss_fn(t, y.to(self.device))) if len(y) else float("nan")
        probs = probabilities(logits, self.task)
        self.val_probs = probs
        return {"val_loss": loss, "val_auroc": auroc(labels, probs, self.task)}

    def improved(self, row: dict[str, Any]) -> bool:
        """Whether this epoch beats the best so far on ``train.monitor``."""
        value = row.get(self.tcfg.monitor, float("nan"))
        if self.best_metric is None:
            return True
        if value != value:  # NaN never improves
            return False
        if self.tcfg.monitor == "val_loss":
            return value < self.best_metric
        return value > self.best_metric

    def keep_best(self, epoch: int) -> None:
        """Remember the current weights as the best so far and write best.pt (rank 0, atomic)."""
        self.best_epoch = epoch
        self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.dist.is_main:
            _atomic_save(
                {"model": self.best_state, "epoch": epoch, "metric": self.best_metric},
                self.workdir / "best.pt",
            )

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        """Best checkpoint, early-stopping counter, last.pt every ``checkpoint_every`` epochs, log."""
        if self.val_ds is None or self.improved(row):
            self.best_metric = row.get(self.tcfg.monitor) if self.val_ds is not None else None
            self.bad_epochs = 0
            if self.val_ds is not None:
                self.best_val_probs = self.val_probs
            self.keep_best(epoch)
        else:
            self.bad_epochs += 1
        patience = self.tcfg.early_stopping_patience
        if self.val_ds is not None and patience is not None and self.bad_epochs >= patience:
            self.stopped = True
        last = epoch + 1 == self.tcfg.epochs or self.stopped
        if self.dist.is_main and ((epoch + 1) % self.tcfg.checkpoint_every == 0 or last):
            self.save_last(epoch)
        if self.log_fn is not None and self.dist.is_main:
            self.log_fn({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if self.tcfg.progress and self.dist.is_main:
            # One line per epoch: the record that stays in batch-job logs (bars are TTY-only).
            shown = ("train_loss", "val_loss", "val_auroc", "images_per_s", "data_stall")
            parts = [f"{k} {row[k]:.4g}" for k in shown if isinstance(row.get(k), float | int)]
            flag = "  *best" if self.best_epoch == epoch else ""
            print(f"  epoch {epoch + 1}/{self.tcfg.epochs}  " + "  ".join(parts) + flag, flush=True)

    # -- checkpoints -----------------------------------------------------------------------
    def save_last(self, epoch: int) -> None:
        """last.pt: everything needed to continue after ``epoch`` as if never interrupted."""
        _atomic_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "epoch": epoch,
                "best_metric": self.best_metric,
                "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs,
                "stopped": self.stopped,
                "history": self.history,
                "extra_history": self.extra_history,
                "rng": _rng_state(),
                "strategy": self.strategy.state_dict(),
                "config_identity": self.cfg.identity(),
            },
            self.workdir / "last.pt",
        )

    def try_resume(self) -> bool:
        """Load last.pt (and best.pt) when present and made by the same config."""
        path = self.workdir / "last.pt"
        if not (self.resume and path.is_file()):
            return False
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("config_identity") != self.cfg.identity():
            log.warning("%s was written by a different config; starting afresh", path)
            return False
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.scaler and ck["scaler"]:
            self.scaler.load_state_dict(ck["scaler"])
        self.start_epoch = int(ck["epoch"]) + 1
        self.best_metric, self.best_epoch = ck["best_metric"], int(ck["best_epoch"])
        self.bad_epochs, self.stopped = int(ck["bad_epochs"]), bool(ck["stopped"])
        self.history, self.extra_history = list(ck["history"]), list(ck["extra_history"])
        _set_rng_state(ck["rng"])
        self.strategy.load_state_dict(ck.get("strategy") or {})
        best = self.workdir / "best.pt"
        if best.is_file():
            self.best_state = torch.load(best, map_location="cpu", weights_only=True)["model"]
        log.info("resumed from %s after epoch %d", path, self.start_epoch)
        return True

    # -- the loop --------------------------------------------------------------------------
    def run_loop(self) -> None:
        """The epoch loop shared by every loop-based strategy."""
        self.build_optimizer()
        if not self.try_resume():
            self.strategy.on_train_start(self)
        for epoch in range(self.start_epoch, self.tcfg.epochs):
            if self.stopped:
                break
            seed_epoch(self.cfg.seed, epoch)
            self.strategy.on_epoch_start(self, epoch)
            row: dict[str, Any] = {"epoch": epoch, **self.train_epoch(epoch)}
            if self.val_ds is not None:
                row.update(self.validate())
            self.history.append(row)
            self.on_epoch_end(epoch, row)

    def finish(self) -> None:
        """Restore the best weights, compute the validation probabilities with them, and let
        the loader workers go."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        try:
            if self.val_probs_final:
                return
            if self.best_val_probs is not None:  # computed by validate() with these weights
                self.val_probs = self.best_val_probs
            elif self.val_ds is not None:  # resumed: the best epoch's outputs are not in memory
                self.val_probs = probabilities(self.infer_logits(self.val_ds), self.task)
            else:
                self.val_probs = np.zeros((0, self.num_classes), dtype=np.float32)
        finally:
            self.release_loaders()

    # -- progress ----------------------------------------------------------------------------
    def _progress(self, title: str, total: int):
        return progress_bar(title, total, self.tcfg.progress and self.dist.is_main)


class _NoBar:
    def __enter__(self):
        return None  # callers skip formatting (and its host sync) when there is no bar

    def __exit__(self, *exc):
        return False


class _RichBar:
    def __init__(self, title: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            transient=True,
        )
        self.task = self.p.add_task(title, total=total, info="")

    def __enter__(self):
        self.p.start()
        return lambda done, info: self.p.update(self.task, completed=done, info=info)

    def __exit__(self, *exc):
        self.p.stop()
        return False


def progress_bar(title: str, total: int, enabled: bool):
    """A rich progress bar context yielding ``update(done, info)``; a no-op when disabled."""
    # Live bars only on a terminal; in CI logs they would print blank lines.
    return _RichBar(title, total) if enabled and sys.stdout.isatty() else _NoBar()


@torch.no_grad()
def infer_rows(
    fn: Callable[[M, torch.Tensor], torch.Tensor],
    model: M,
    dataset: Any,
    make_loader: Callable,
    to_input: Callable,
    autocast: Callable,
    dist: DistContext,
    out: np.ndarray | None = None,
    rows_at: np.ndarray | None = None,
) -> np.ndarray:
    """Eval-mode ``fn(model, x)`` for every sample of ``dataset``, in dataset order.

    Under DDP each rank runs its shard of exactly the N samples and rows are gathered back.
    With ``out`` the row of sample k goes to ``out[rows_at[k]]`` (``out[k]`` without
    ``rows_at``) as each batch arrives, and ``out`` is returned: no second copy of all rows,
    which is what keeps feature extraction at one (N, F) matrix.
    """
    m = cast(M, unwrap(model))  # the module that was wrapped (DDP) is the caller's own
    was_training = m.training
    m.eval()
    sampler = shard_sampler(dataset, dist)
    n = len(dataset)
    # Dataset positions in loader order (the sampler's order; no shuffling at inference).
    idx = list(sampler) if sampler is not None else list(range(n))
    sink = out if not dist.distributed else None  # under DDP rows are gathered first
    at = np.asarray(rows_at if rows_at is not None else np.arange(n), dtype=np.int64)
    rows = []
    done = 0
    for batch in make_loader(dataset, sampler):
        x = to_input(batch)
        with autocast():
            y = fn(m, x).float().cpu().numpy()
        if sink is not None:
            sink[at[idx[done : done + len(y)]]] = y
        else:
            rows.append(y)
        done += len(y)
    m.train(was_training)
    if sink is not None:
        if done != n:
            raise RuntimeError(f"inferred {done} rows for {n} samples")
        return sink
    arr = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    gathered = gather_rows(idx, arr, n, dist)
    if out is None:
        return gathered
    out[at] = gathered
    return out
