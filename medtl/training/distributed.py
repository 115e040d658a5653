"""torchrun/DDP helpers: the process context, device choice, sharded samplers and gathers.

One `DistContext` describes the process (single-process runs get world_size 1), so the
engine has one code path: it shards and gathers through these helpers and only rank 0
writes files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from medtl.errors import ConfigError


@dataclass
class DistContext:
    """Where this process sits in a (possibly 1-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_main: bool = True

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            tdist.barrier()


def resolve_device(
    spec: str = "auto", local_rank: int = 0, key: str = "train.device"
) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a device; ``auto`` picks this rank's GPU when present.
    Errors name ``key``, the setting or flag the value came from."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"{key} '{spec}' is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{key} '{spec}' asks for CUDA but no GPU is visible; set {key}=cpu or auto"
        )
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group.

    Backend: nccl when the process uses a GPU, gloo on CPU. Without torchrun variables this
    returns a single-process context and touches nothing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(backend=backend)
    return DistContext(rank, world_size, local_rank, dev, rank == 0)


def wrap_ddp(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """Wrap ``model`` in DDP under torchrun (only parameters trainable now are synchronised)."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def sync_buffers(model: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so all ranks hold
    the same model after an epoch (DDP syncs buffers before a forward, not after the last)."""
    if not ctx.distributed:
        return
    for buf in unwrap(model).buffers():
        tdist.broadcast(buf.data, src=0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)  # DistributedDataParallel
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def shard_sampler(dataset: Any, ctx: DistContext) -> torch.utils.data.Sampler | None:
    """Each rank sees a disjoint, ordered slice of *exactly* the N samples (no padding repeats)."""
    if not ctx.distributed:
        return None
    from monai.data import DistributedSampler

    return DistributedSampler(
        dataset, even_divisible=False, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False
    )


def gather_rows(indices: Sequence[int], rows: np.ndarray, n: int, ctx: DistContext) -> np.ndarray:
    """Put per-rank ``rows`` (one per dataset index) back into dataset order on every rank.

    Raises RuntimeError when an index is missing or duplicated, so padding never leaks in.
    """
    idx = np.asarray(indices, dtype=np.int64)
    rows = np.asarray(rows)
    if ctx.distributed:
        parts: list[Any] = [None] * ctx.world_size
        tdist.all_gather_object(parts, (idx, rows))
        idx = np.concatenate([p[0] for p in parts])
        rows = np.concatenate([p[1] for p in parts]) if n else rows[:0]
    if len(idx) != n or len(np.unique(idx)) != n:
        raise RuntimeError(
            f"gathered {len(idx)} rows for {n} samples ({len(np.unique(idx))} unique)"
        )
    out = np.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    out[idx] = rows
    return out


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Mean of a Python float over ranks (e.g. a training loss for the log)."""
    if not ctx.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if ctx.device.type == "cuda":
        t = t.to(ctx.device)
    tdist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def infer_device_for(model: torch.nn.Module, cfg: Any, ctx: DistContext) -> torch.device:
    """The device to run on: this rank's device under torchrun, else ``train.device``."""
    return ctx.device if ctx.distributed else resolve_device(cfg.train.device)
