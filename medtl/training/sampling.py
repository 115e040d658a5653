"""Class-balanced sampling: per-sample weights and the sampler for one epoch.

Defaults: ``train.sampler=balanced`` with ``train.sampler_weighting=inverse``. Weightings:
``inverse`` (1/n_c), ``sqrt`` (1/sqrt(n_c), milder), ``effective`` ((1-beta)/(1-beta**n_c),
Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples").

Multi-label: a sample's weight is the weight of its *rarest* positive label (the label with the
fewest positives in the training set); samples with no positive label form their own group
("no finding") and get that group's weight. Rare findings are then drawn as often as common ones.

Each epoch's sampler is seeded by ``seed + epoch`` so an interrupted run replays exactly.
``EpochSampler`` lets one persistent DataLoader serve every epoch: ``set_epoch`` picks the
epoch's draws, and its keys carry the epoch's augmentation seed to the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler

from medtl.augment import epoch_augment_seed
from medtl.errors import look_up_option
from medtl.training.distributed import DistContext

if TYPE_CHECKING:
    from monai.data import DistributedSampler

WEIGHTINGS = ("inverse", "sqrt", "effective")


def class_sampling_weights(
    counts: np.ndarray, weighting: str = "inverse", beta: float = 0.999
) -> np.ndarray:
    """Per-group sampling weight from group counts (empty groups get weight 0)."""
    look_up_option(weighting, WEIGHTINGS, "train.sampler_weighting")
    n = np.asarray(counts, dtype=float)
    safe = np.maximum(n, 1.0)
    if weighting == "inverse":
        w = 1.0 / safe
    elif weighting == "sqrt":
        w = 1.0 / np.sqrt(safe)
    else:
        w = (1.0 - beta) / (1.0 - np.power(beta, safe))
    return np.where(n > 0, w, 0.0)


def sample_groups(labels: np.ndarray, task: str) -> tuple[np.ndarray, int]:
    """Group id per sample (its class, or for multi-label its rarest positive label) and #groups."""
    labels = np.asarray(labels)
    if task != "multilabel":
        y = labels.astype(int).reshape(-1)
        return y, int(y.max()) + 1 if len(y) else 0
    positive = labels.reshape(len(labels), -1).astype(bool)
    n_labels = positive.shape[1]
    pos = positive.sum(0)
    # Rarest positive label per sample; "no finding" is group n_labels.
    rank_of = np.where(positive, pos[None, :], np.iinfo(np.int64).max)
    groups = np.where(positive.any(1), rank_of.argmin(1), n_labels)
    return groups, n_labels + 1


def sample_weights(
    labels: np.ndarray, task: str, weighting: str = "inverse", beta: float = 0.999
) -> np.ndarray:
    """Per-sample weights that make each class (or rarest label) equally likely to be drawn."""
    groups, n_groups = sample_groups(labels, task)
    counts = np.bincount(groups, minlength=n_groups)
    return class_sampling_weights(counts, weighting, beta)[groups]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator that depends only on (seed, epoch): resumed runs draw the same batches."""
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + int(epoch))
    return g


def build_train_sampler(
    dataset,
    labels: np.ndarray,
    task: str,
    *,
    mode: str = "balanced",
    weighting: str = "inverse",
    beta: float = 0.999,
    seed: int = 0,
    epoch: int = 0,
    dist: DistContext | None = None,
) -> WeightedRandomSampler | RandomSampler | DistributedSampler:
    """The training sampler for one epoch.

    Single process: torch ``WeightedRandomSampler`` (balanced) or ``RandomSampler`` (random),
    N draws per epoch. Under DDP: MONAI ``DistributedWeightedRandomSampler`` (keeps the class
    balance on every rank) or MONAI ``DistributedSampler``; each draws ~N/world_size per rank.
    """
    look_up_option(mode, ("balanced", "random"), "train.sampler")
    n = len(labels)
    gen = epoch_generator(seed, epoch)
    if dist is not None and dist.distributed:
        from monai.data import DistributedSampler, DistributedWeightedRandomSampler

        s: DistributedSampler
        if mode == "balanced":
            w = sample_weights(labels, task, weighting, beta)
            s = DistributedWeightedRandomSampler(
                dataset,
                weights=w.tolist(),
                generator=gen,
                num_replicas=dist.world_size,
                rank=dist.rank,
                seed=seed,
            )
        else:
            s = DistributedSampler(
                dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed
            )
        s.set_epoch(epoch)
        return s
    if mode == "balanced":
        # A list of Python floats: torch converts it to the same float64 tensor.
        weights = sample_weights(labels, task, weighting, beta).tolist()
        return WeightedRandomSampler(weights, num_samples=n, replacement=True, generator=gen)
    return RandomSampler(range(n), generator=gen)


class EpochSampler(Sampler):
    """The sampler of whichever epoch ``set_epoch`` chose, for a loader built once.

    Each pass draws exactly what ``build(epoch)`` (a fresh sampler for that epoch) draws. With
    ``keyed`` it yields ``(index, epoch_augment_seed(seed, epoch))``: the epoch reaches
    persistent workers inside the keys (no loader rebuild), and ``MedtlDataset`` seeds each
    item's augmentation from that key and its index, whichever worker loads it.
    """

    def __init__(self, build: Callable[[int], Sampler], seed: int, keyed: bool = True):
        self.build = build
        self.seed = int(seed)
        self.keyed = keyed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw ``epoch``'s samples from the next pass on."""
        self.epoch = int(epoch)
        self._len = len(self.build(self.epoch))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        # Built afresh per pass: two passes over one epoch draw the same samples.
        inner = self.build(self.epoch)
        if not self.keyed:
            return (int(i) for i in inner)
        key = epoch_augment_seed(self.seed, self.epoch)
        return ((int(i), key) for i in inner)
