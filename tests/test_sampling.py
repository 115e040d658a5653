"""Class-balanced sampling and class-weighted losses (pure functions and real torch/MONAI samplers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtl.config import TrainConfig
from medtl.training.distributed import DistContext
from medtl.training.losses import build_loss, class_frequency_weights
from medtl.training.sampling import build_train_sampler, sample_groups, sample_weights

LABELS_1_9 = np.array([1] * 20 + [0] * 180)  # 1:9


def _minority_fraction(sampler, labels) -> float:
    drawn = []
    for _ in range(5):  # 5 epochs x 200 draws
        drawn.extend(list(sampler))
    return float(np.mean(labels[np.asarray(drawn)] == 1))


# Expected share of the 1-in-10 class per weighting: inverse and effective number balance
# fully (effective: (1-b)/(1-b^n) with b=0.999 is close to 1/n for n << 1000); sqrt is the
# deliberately milder sqrt(20)/(sqrt(20)+sqrt(180)) = 0.25, still 2.5x the natural 0.10.
@pytest.mark.parametrize(
    "weighting,expected",
    [("inverse", 0.5), ("effective", 0.49), ("sqrt", 0.25)],
)
def test_balanced_sampler_on_1_to_9(weighting, expected):
    s = build_train_sampler(
        range(200), LABELS_1_9, "binary", mode="balanced", weighting=weighting, seed=0, epoch=0
    )
    assert isinstance(s, torch.utils.data.WeightedRandomSampler)
    assert len(s) == 200
    frac = _minority_fraction(s, LABELS_1_9)
    # 1000 draws: binomial sd <= 0.016, so 0.05 is > 3 sd.
    assert abs(frac - expected) < 0.05, frac
    # Batch level: a batch of 32 holds both classes in near-equal numbers (inverse weighting).
    if weighting == "inverse":
        idx = np.asarray(list(s))[: 32 * 6].reshape(6, 32)
        per_batch = (LABELS_1_9[idx] == 1).mean(1)
        assert np.all((per_batch > 0.2) & (per_batch < 0.8)), per_batch


def test_random_sampler_keeps_natural_frequency():
    s = build_train_sampler(range(200), LABELS_1_9, "binary", mode="random", seed=0, epoch=0)
    assert abs(_minority_fraction(s, LABELS_1_9) - 0.1) < 1e-9  # a permutation: exactly 10%


def test_sampler_is_a_function_of_seed_and_epoch():
    def draw(seed, epoch):
        return list(build_train_sampler(range(200), LABELS_1_9, "binary", seed=seed, epoch=epoch))

    assert draw(1, 3) == draw(1, 3)
    assert draw(1, 3) != draw(1, 4)
    assert draw(1, 3) != draw(2, 3)


def test_distributed_sampler_keeps_balance_and_splits_ranks():
    """MONAI DistributedWeightedRandomSampler per rank (explicit rank/world: no process group)."""
    draws = []
    for rank in range(2):
        ctx = DistContext(rank=rank, world_size=2, is_main=rank == 0)
        s = build_train_sampler(range(200), LABELS_1_9, "binary", seed=0, epoch=0, dist=ctx)
        assert type(s).__name__ == "DistributedWeightedRandomSampler"
        assert len(s) == 100  # N / world_size per rank
        draws.append(np.asarray(list(s)))
    both = np.concatenate(draws)
    assert abs(np.mean(LABELS_1_9[both] == 1) - 0.5) < 0.1
    # Each rank draws from its own shard of the dataset.
    assert not set(draws[0]) & set(draws[1])


def test_multilabel_weights_follow_rarest_positive_label():
    y = np.array([[1, 0, 0]] * 60 + [[1, 1, 0]] * 10 + [[0, 0, 1]] * 5 + [[0, 0, 0]] * 25)
    groups, n = sample_groups(y, "multilabel")
    assert n == 4
    # label counts: 70, 10, 5 -> [1,1,0] belongs to label 1 (rarer than label 0); none -> group 3
    assert set(groups[60:70]) == {1} and set(groups[70:75]) == {2} and set(groups[75:]) == {3}
    w = sample_weights(y, "multilabel", "inverse")
    mass = np.bincount(groups, weights=w)
    np.testing.assert_allclose(mass, mass[0])  # every group drawn equally often


def test_class_weighted_losses():
    y = np.array([0] * 9 + [1])
    w = class_frequency_weights(y, 2, "binary")
    assert w[1] / w[0] == pytest.approx(9.0)
    logits = torch.tensor([[2.0, -2.0], [2.0, -2.0]])
    target = torch.tensor([0, 1])
    plain = build_loss(TrainConfig(loss="ce"), "binary", 2, y)(logits, target)
    weighted = build_loss(TrainConfig(loss="weighted_ce"), "binary", 2, y)(logits, target)
    assert weighted > plain  # the misclassified minority sample counts 9x
    # Focal with gamma=0 is cross-entropy; gamma>0 down-weights the easy sample.
    f0 = build_loss(TrainConfig(loss="focal", focal_gamma=0), "binary", 2, y)(logits, target)
    f2 = build_loss(TrainConfig(loss="focal", focal_gamma=2), "binary", 2, y)(logits, target)
    assert f0 == pytest.approx(float(plain), rel=1e-5)
    assert f2 < f0
    # Multi-label: BCE with pos_weight = negatives / positives.
    ym = np.array([[1, 0], [0, 0], [0, 0], [0, 1]])
    np.testing.assert_allclose(class_frequency_weights(ym, 2, "multilabel"), [3.0, 3.0])
    ml = build_loss(TrainConfig(loss="weighted_ce"), "multilabel", 2, ym)
    assert ml(torch.zeros(4, 2), torch.tensor(ym)) > build_loss(
        TrainConfig(loss="ce"), "multilabel", 2, ym
    )(torch.zeros(4, 2), torch.tensor(ym))


def test_unknown_weighting_names_options():
    from medtl.errors import ConfigError

    with pytest.raises(ConfigError, match="inverse"):
        sample_weights(LABELS_1_9, "binary", "invrse")
