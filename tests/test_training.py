"""Engine behaviour on the real default backbone and real demo files: output formats,
gradient accumulation, early stopping, checkpoints, AMP/device choices and schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fit_job import demo_split, tiny_config

from medtl.errors import ConfigError
from medtl.training import fit, predict_proba
from medtl.training.engine import _schedule_factor, resolve_amp
from medtl.training.outputs import auroc, probabilities


@pytest.fixture(scope="module")
def split(demo_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = tiny_config(cache_dir=cache)
    train_ds, val_ds, classes = demo_split(demo_data.manifest_csv, cfg, cache)
    return cfg, train_ds, val_ds, classes


def _cfg(split, overrides):
    base = split[0]
    cfg = tiny_config(overrides, base.data.cache_dir)
    cfg.data.task, cfg.data.classes = base.data.task, base.data.classes
    return cfg


def _model(cfg, n):
    from medtl.models import create_model

    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, n, spatial_dims=2)


def _head_only(model_cfg_split):
    cfg, _, _, classes = model_cfg_split
    n_stages = len(_model(cfg, len(classes)).stage_groups())
    return ["strategy.name=fine_tune", f"strategy.freeze_stages={n_stages - 1}"]


def test_fit_and_predict_proba_formats(split, tmp_path):
    cfg = _cfg(split, ["strategy.name=fine_tune", "strategy.freeze_stages=3", "train.epochs=1"])
    _, train_ds, val_ds, classes = split
    res = fit(cfg, _model(cfg, 2), train_ds, val_ds, workdir=tmp_path)
    assert res.val_probs.shape == (len(val_ds), 2) and res.val_probs.dtype == np.float32
    # predict_proba on the same data reproduces the validation output row by row.
    p = predict_proba(res.model, val_ds, cfg)
    np.testing.assert_allclose(p, res.val_probs, atol=1e-6)
    row = res.history[0]
    assert {"epoch", "train_loss", "val_loss", "val_auroc", "images_per_s", "lr"} <= set(row)
    assert row["images_per_s"] > 0
    # Checkpoints hold only tensors and plain types: loadable with weights_only=True.
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "best_metric",
        "history",
        "rng",
        "bad_epochs",
    } <= set(last)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == res.best_epoch


def test_gradient_accumulation_matches_large_batch(split, tmp_path):
    """Head-only training (frozen BN): batch 8 x 2 accumulation == batch 16."""
    _, train_ds, _, _ = split
    common = _head_only(split) + ["train.epochs=1", "train.scheduler=none", "train.sampler=random"]
    a = _cfg(split, common + ["train.batch_size=16", "train.grad_accum=1"])
    b = _cfg(split, common + ["train.batch_size=8", "train.grad_accum=2"])
    ma = fit(a, _model(a, 2), train_ds, None, workdir=tmp_path / "a").model
    mb = fit(b, _model(b, 2), train_ds, None, workdir=tmp_path / "b").model
    init = _model(a, 2).state_dict()
    moved = False
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-4, msg=k)
        moved |= not torch.equal(va, init[k])
    assert moved


def test_early_stopping_stops_and_keeps_best(split, tmp_path):
    # A learning rate too small to change the ranking: AUROC never improves after epoch 0.
    cfg = _cfg(
        split,
        _head_only(split) + ["train.epochs=5", "train.lr=1e-12", "train.early_stopping_patience=1"],
    )
    _, train_ds, val_ds, _ = split
    res = fit(cfg, _model(cfg, 2), train_ds, val_ds, workdir=tmp_path)
    assert len(res.history) == 2  # epoch 0 best, epoch 1 no improvement -> stop
    assert res.best_epoch == 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["stopped"] is True


def test_no_validation_keeps_last_epoch(split, tmp_path):
    cfg = _cfg(split, _head_only(split) + ["train.epochs=2"])
    res = fit(cfg, _model(cfg, 2), split[1], None, workdir=tmp_path)
    assert res.best_epoch == 1 and res.val_probs.shape == (0, 2)


def test_multilabel_fit_uses_sigmoid(split, tmp_path):
    """Multi-hot labels: BCE training and (N, C) sigmoid probabilities that need not sum to 1."""
    from medtl.data import MedtlDataset

    cfg0, train_ds, val_ds, _ = split
    rng = np.random.default_rng(0)

    def relabel(ds):
        recs = [dict(r, label=[int(r["label"]), int(rng.random() < 0.4), 0]) for r in ds.records]
        return recs

    cfg = _cfg(split, _head_only(split) + ["train.epochs=1", "train.loss=weighted_ce"])
    cfg.data.task, cfg.data.classes = "multilabel", ["nodule", "other", "never"]
    # Same cached images, new labels (the dataset reads labels from its records).
    tr = MedtlDataset(relabel(train_ds), train_ds.inner, train_ds.random)
    va = MedtlDataset(relabel(val_ds), val_ds.inner, val_ds.random)
    res = fit(cfg, _model(cfg, 3), tr, va, workdir=tmp_path)
    assert res.val_probs.shape == (len(va), 3)
    assert np.all((res.val_probs > 0) & (res.val_probs < 1))
    assert not np.allclose(res.val_probs.sum(1), 1.0)


def test_probabilities_and_auroc():
    logits = np.array([[0.0, 1.0], [2.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(probabilities(logits, "binary").sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probabilities(logits, "multilabel"), 1 / (1 + np.exp(-logits)))
    assert auroc(np.array([0, 1]), probabilities(logits, "binary"), "binary") == 0.0
    y3 = np.array([0, 1, 2, 2])
    p3 = np.eye(3)[y3] * 0.8 + 0.2 / 3
    assert auroc(y3, p3, "multiclass") == 1.0
    assert np.isnan(auroc(np.array([1, 1]), probabilities(logits, "binary"), "binary"))


def test_amp_and_device_choices():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == (None, False)  # AMP off on CPU by default
    assert resolve_amp("off", cpu) == (None, False)
    assert resolve_amp("bf16", cpu) == (torch.bfloat16, False)
    with pytest.raises(ConfigError, match="fp16"):
        resolve_amp("fp16", cpu)
    from medtl.training.distributed import resolve_device

    assert resolve_device("cpu") == cpu
    with pytest.raises(ConfigError, match="train.device"):
        resolve_device("tpu:0")


def test_schedule_warmup_then_cosine():
    f = [_schedule_factor("cosine", s, total=10, warmup=2) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[2:], f[3:], strict=False))
    assert _schedule_factor("cosine", 10, total=10, warmup=2) == pytest.approx(0.0)
    assert _schedule_factor("none", 7, total=10, warmup=2) == 1.0
