"""Domain-adaptation blocks: AdaBN touches only BN statistics, gradient reversal negates and
scales gradients, Deep CORAL matches its definition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medtl.errors import ConfigError
from medtl.training.adaptation import (
    GradientReversal,
    adabn,
    coral_loss,
    dann_lambda,
    grad_reverse,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
        nn.BatchNorm1d(3),
    )


def test_adabn_changes_only_batchnorm_running_statistics():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    target = [torch.randn(16, 1, 8, 8) * 3.0 + 5.0 for _ in range(3)]  # shifted domain
    bn_stats = {"1.running_mean", "1.running_var", "6.running_mean", "6.running_var"}
    counters = {"1.num_batches_tracked", "6.num_batches_tracked"}
    out = adabn(net, [{"image": x, "label": 0} for x in target])
    assert out is net and not net.training and not any(m.training for m in net.modules())
    after = net.state_dict()
    for k, v in before.items():
        if k in bn_stats | counters:
            continue
        assert torch.equal(v, after[k]), f"{k} changed"
    for k in bn_stats:
        assert not torch.equal(before[k], after[k]), f"{k} did not change"
    assert net[1].momentum == 0.1 and net[6].momentum == 0.1  # momenta restored

    # Cumulative average over the three batches: the first BN's mean is the per-channel mean
    # of the conv output (equal batch sizes, so the average of batch means).
    with torch.no_grad():
        conv = torch.cat([net[0](x) for x in target])
    torch.testing.assert_close(net[1].running_mean, conv.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert after["1.num_batches_tracked"].item() == 3


def test_adabn_without_batchnorm_says_so():
    with pytest.raises(ConfigError, match="AdaBN needs BatchNorm.*Linear"):
        adabn(nn.Linear(3, 2), [torch.randn(4, 3)])
    with pytest.raises(ConfigError, match="no target batches"):
        adabn(_net(), [])


def test_gradient_reversal_negates_and_scales():
    x = torch.randn(5, 3, requires_grad=True)
    layer = GradientReversal(0.5)
    y = layer(x)
    torch.testing.assert_close(y, x)
    w = torch.randn(5, 3)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * w)
    # Inside a chain: d/dx sum(sin(GRL(x))) = -0.5 * cos(x); without the layer it is cos(x).
    xd = torch.randn(4, 2, dtype=torch.double, requires_grad=True)
    (g,) = torch.autograd.grad(torch.sin(grad_reverse(xd, 0.5)).sum(), xd)
    torch.testing.assert_close(g, -0.5 * torch.cos(xd))
    assert "lambda_=0.5" in repr(layer)


def test_dann_lambda_ramp():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(0.5) == pytest.approx(0.98661429815)
    with pytest.raises(ValueError, match="progress"):
        dann_lambda(1.5)


def test_coral_loss_zero_positive_and_hand_value():
    torch.manual_seed(0)
    s = torch.randn(10, 4)
    assert coral_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert coral_loss(s, 2.0 * s + 1.0).item() > 0
    # d = 2, both columns [-1, 0, 1]: C_s = [[1, 1], [1, 1]] (n - 1 = 2); the target is twice
    # the source, so C_t = 4 C_s, ||C_s - C_t||_F^2 = 4 * 3**2 = 36 and 36 / (4 * 2**2) = 2.25.
    src = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])
    assert coral_loss(src, 2.0 * src).item() == pytest.approx(2.25)
    with pytest.raises(ValueError, match="same feature width"):
        coral_loss(src, torch.zeros(3, 3))
