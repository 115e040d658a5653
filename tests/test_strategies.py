"""Every transfer strategy trains the real default backbone (ImageNet weights) on the real demo
files and beats chance; frozen stages really stay frozen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fit_job import demo_split, tiny_config
from sklearn.metrics import roc_auc_score

from medtl.training import STRATEGIES, fit
from medtl.training.strategies import bn_modules_by_stage, get_strategy


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """100 demo patients (the shared 40-patient set is too small to tell strategies from
    chance); validation = every other patient: ~144 images, ~35 with a nodule."""
    from medtl.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("demo100")
    demo = make_demo_data(root / "demo", n_patients=100, image_size=96, seed=0)
    cache = root / "cache"
    cfg = tiny_config(["transforms.spatial_size=[64,64]"], cache_dir=cache)
    train_ds, val_ds, classes = demo_split(demo.manifest_csv, cfg, cache)
    return cfg, train_ds, val_ds, classes


def _model(cfg, classes):
    from medtl.models import create_model

    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, len(classes), spatial_dims=2)


# Chance margins. Validation holds ~144 images (~35 positive); under the null an AUROC has
# sd ~ sqrt((n1+n0+1)/(12 n1 n0)) ~ 0.056. Loop strategies train 2 epochs of a full network
# on ~130 tiny images, so they must clear 0.62 (> 2 sd above 0.5, one-sided p < 0.02); the
# feature-extraction heads see the frozen ImageNet features directly and must clear 0.75
# (> 4.5 sd). Observed on this data: 0.86 (logistic), 0.87 (torch head), ~0.70 (loops).
STRONG, WEAK = 0.75, 0.62


@pytest.mark.parametrize(
    "overrides,min_auroc",
    [
        (["strategy.name=feature_extraction", "strategy.head_trainer=logistic"], STRONG),
        (
            [
                "strategy.name=feature_extraction",
                "strategy.head_trainer=torch",
                "train.epochs=30",
                "train.lr=0.01",
            ],
            STRONG,
        ),
        (["strategy.name=fine_tune", "strategy.freeze_stages=5"], WEAK),
        (["strategy.name=gradual_unfreeze", "strategy.head_only_epochs=1"], WEAK),
        # LP-FT fine-tunes at lr * ft_lr_scale = 1e-5 from the probe: the probe's quality stays.
        (["strategy.name=lp_ft", "strategy.probe_epochs=1", "train.lr=1e-4"], STRONG),
    ],
    ids=["fe_logistic", "fe_torch", "fine_tune", "gradual_unfreeze", "lp_ft"],
)
def test_strategy_beats_chance(split, tmp_path, overrides, min_auroc):
    base, train_ds, val_ds, classes = split
    cfg = tiny_config(["transforms.spatial_size=[64,64]", *overrides], base.data.cache_dir)
    cfg.data.task, cfg.data.classes = base.data.task, base.data.classes
    res = fit(cfg, _model(cfg, classes), train_ds, val_ds, workdir=tmp_path)
    y = np.array([r["label"] for r in val_ds.records])
    assert res.val_probs.shape == (len(val_ds), 2)
    np.testing.assert_allclose(res.val_probs.sum(1), 1.0, atol=1e-5)
    auc = roc_auc_score(y, res.val_probs[:, 1])
    assert auc > min_auroc, (cfg.strategy.name, auc, res.history)
    assert res.history and 0 <= res.best_epoch < cfg.train.epochs
    assert (tmp_path / "best.pt").is_file()


def test_registry_is_the_config_literal():
    from typing import get_args

    from medtl.config import StrategyConfig

    assert set(STRATEGIES) == set(get_args(StrategyConfig.model_fields["name"].annotation))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_frozen_stages_stay_frozen(split, tmp_path):
    base, train_ds, val_ds, classes = split
    cfg = tiny_config(
        ["strategy.name=fine_tune", "strategy.freeze_stages=3", "train.epochs=1"],
        base.data.cache_dir,
    )
    cfg.data.task = base.data.task
    model = _model(cfg, classes)
    groups = model.stage_groups()
    assert len(groups) > 4
    names = {id(p): n for n, p in model.named_parameters()}
    frozen_ids = {id(p) for _, ps in groups[:3] for p in ps}
    frozen_bn = [m for mods in bn_modules_by_stage(model)[:3] for m in mods]
    assert frozen_bn, "frozen stages should hold BatchNorm layers"
    before = _snapshot(model)
    bn_before = [
        (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
        for m in frozen_bn
    ]

    grads_seen: dict[str, bool] = {}
    for p in model.parameters():
        p.register_hook(lambda g, n=names[id(p)]: grads_seen.__setitem__(n, True))
    fit(cfg, model, train_ds, None, workdir=tmp_path)

    after = _snapshot(model)
    for n, p in model.named_parameters():
        if id(p) in frozen_ids:
            assert torch.equal(before[n], after[n]), f"frozen {n} changed"
            assert n not in grads_seen, f"frozen {n} received a gradient"
    for m, (mean, var, nbt) in zip(frozen_bn, bn_before, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert int(m.num_batches_tracked) == nbt
    # Every unfrozen stage (including the head) changed.
    for name, params in groups[3:]:
        assert any(not torch.equal(before[names[id(p)]], after[names[id(p)]]) for p in params), name


def test_bn_train_all_updates_frozen_statistics(split, tmp_path):
    base, train_ds, _, classes = split
    cfg = tiny_config(
        [
            "strategy.name=fine_tune",
            "strategy.freeze_stages=3",
            "train.epochs=1",
            "strategy.bn=train_all",
        ],
        base.data.cache_dir,
    )
    cfg.data.task = base.data.task
    model = _model(cfg, classes)
    bn = bn_modules_by_stage(model)[1][0]
    mean = bn.running_mean.clone()
    w = _snapshot(model)
    fit(cfg, model, train_ds, None, workdir=tmp_path)
    assert not torch.equal(bn.running_mean, mean)  # statistics adapt ...
    first = model.stage_groups()[1][1][0]
    name = next(n for n, p in model.named_parameters() if p is first)
    assert torch.equal(w[name], first.detach())  # ... but the weights stay frozen


def test_gradual_unfreeze_schedule_and_discriminative_lrs(split):
    base, _, _, classes = split
    cfg = tiny_config(
        [
            "strategy.name=gradual_unfreeze",
            "strategy.head_only_epochs=2",
            "strategy.unfreeze_every=2",
            "strategy.layer_lr_decay=0.5",
            "strategy.freeze_stages=1",
        ]
    )
    s = get_strategy(cfg)
    n = 6
    assert s.trainable_stages(n, 0) == {5}
    assert s.trainable_stages(n, 1) == {5}
    assert s.trainable_stages(n, 2) == {4, 5}
    assert s.trainable_stages(n, 4) == {3, 4, 5}
    assert s.trainable_stages(n, 100) == {1, 2, 3, 4, 5}  # stage 0 never (freeze_stages=1)
    model = _model(cfg, classes)
    groups = s.configure_param_groups(model)
    lrs = [g["lr"] for g in groups]
    assert lrs[-1] == pytest.approx(cfg.train.lr)
    assert lrs[-2] == pytest.approx(cfg.train.lr * 0.5)
    assert lrs[0] == pytest.approx(cfg.train.lr * 0.5 ** (len(groups) - 1))


def test_freezing_every_stage_is_refused(split, tmp_path):
    from medtl.errors import ConfigError

    base, train_ds, val_ds, classes = split
    cfg = tiny_config(["strategy.name=fine_tune", "strategy.freeze_stages=99"])
    cfg.data.task = base.data.task
    with pytest.raises(ConfigError, match="freeze_stages=99"):
        fit(cfg, _model(cfg, classes), train_ds, val_ds, workdir=tmp_path)
