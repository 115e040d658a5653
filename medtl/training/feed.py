"""Feeding the training step: timed batches, a side-stream host->device copy, the epoch clock.

``BatchFeed`` iterates a loader and adds up the host seconds spent waiting in ``next(loader)``;
on CUDA it copies each batch to the GPU on a side stream (pinned memory, non_blocking) while the
previous step computes. ``EpochClock`` times the epoch's steps with CUDA events on GPU (read once
at the epoch end, so there is no per-step host sync) and the host clock elsewhere. Their ratio
is the epoch's ``data_stall`` (``stall_fraction``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def stall_fraction(wait_s: float, step_s: float) -> float:
    """Host seconds waiting for data over the epoch's step time, clipped to [0, 1]."""
    if step_s <= 0:
        return 0.0
    return min(1.0, max(0.0, wait_s / step_s))


class BatchFeed:
    """The loader's batches in order; ``wait_s`` sums the host time spent in ``next(loader)``.

    On CUDA, batch i+1 is fetched and its copy queued on a side stream right after step i was
    queued, so the copy overlaps step i; the compute stream waits on that copy before using it.
    """

    def __init__(self, loader: Iterable[dict[str, Any]], device: torch.device):
        self.loader = loader
        self.device = device
        self.cuda = device.type == "cuda"
        self.wait_s = 0.0
        self.batches = 0
        self._stream: Any = None

    def _next(self, it: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        batch = next(it, None)
        self.wait_s += time.perf_counter() - t0
        if batch is None or not self.cuda:
            return batch
        with torch.cuda.stream(self._stream):
            return {
                k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()
            }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.cuda:
            self._stream = torch.cuda.Stream(self.device)
        it = iter(self.loader)
        nxt = self._next(it)
        while nxt is not None:
            if self.cuda:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(self._stream)
                for v in nxt.values():
                    if isinstance(v, torch.Tensor):
                        v.record_stream(compute)  # memory made on the side stream, used here
            self.batches += 1
            yield nxt
            nxt = self._next(it)  # after step i was queued: the wait overlaps its compute


class EpochClock:
    """Seconds of an epoch's steps: CUDA events on GPU (one sync, at ``stop``), else the host
    clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._t0 = time.perf_counter()
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def stop(self) -> float:
        """The elapsed seconds since construction (GPU timeline on CUDA)."""
        if not self.cuda:
            return time.perf_counter() - self._t0
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1000.0
