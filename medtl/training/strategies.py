"""Transfer strategies: each is one registry entry that overrides named engine hooks.

The engine (``medtl.training.engine.Engine``) owns the loop; a strategy decides which stages
train in which epoch (``trainable_stages``), their learning rates (``configure_param_groups``),
BatchNorm behaviour (``train_mode``), what happens before the loop (``on_train_start``) and,
for the feature-extraction fast path only, replaces the epoch loop (``train``). Adding a
strategy = subclass of ``BaseStrategy`` + one ``STRATEGIES`` entry (+ its name in
``StrategyConfig.name``). The engine sees only the ``Strategy`` protocol (``protocol.py``).

Stages come from ``model.stage_groups()`` (stem .. head, every parameter once); "depth from
top" counts the head as 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medtl.config import PipelineConfig
from medtl.errors import ConfigError, look_up_option
from medtl.models.model import MedtlModel
from medtl.training.protocol import Strategy

if TYPE_CHECKING:
    from medtl.training.engine import Engine


def bn_modules_by_stage(model: MedtlModel) -> list[list[nn.Module]]:
    """BatchNorm modules of each stage group (a BN belongs to the stage owning its weight)."""
    groups = model.stage_groups()
    owner = {id(p): i for i, (_, params) in enumerate(groups) for p in params}
    out: list[list[nn.Module]] = [[] for _ in groups]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.weight is not None:
            i = owner.get(id(m.weight))
            if i is not None:
                out[i].append(m)
    return out


class BaseStrategy:
    """Default hooks: train every stage at ``train.lr``; BN follows ``strategy.bn``."""

    name = "base"

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.scfg = cfg.strategy

    # -- which parameters train, at which learning rate -------------------------------------
    def trainable_stages(self, n_stages: int, epoch: int) -> set[int]:
        """Indices of stage groups that receive gradients in ``epoch`` (0-based)."""
        return set(range(n_stages))

    def base_lr(self) -> float:
        """Learning rate of the top (head) group."""
        return self.cfg.train.lr

    def configure_param_groups(self, model: MedtlModel) -> list[dict[str, Any]]:
        """One optimizer group per stage (all stages, frozen ones simply get no gradient)."""
        lr = self.base_lr()
        return [
            {"params": list(params), "lr": lr, "name": name}
            for name, params in model.stage_groups()
            if params
        ]

    # -- hooks the engine calls ------------------------------------------------------------
    def on_train_start(self, engine: Engine) -> None:
        """Once before the first epoch of a fresh (not resumed) run."""

    def on_epoch_start(self, engine: Engine, epoch: int) -> None:
        """Set ``requires_grad`` for this epoch's trainable stages."""
        groups = engine.model.stage_groups()
        train = self.trainable_stages(len(groups), epoch)
        for i, (_, params) in enumerate(groups):
            for p in params:
                p.requires_grad_(i in train)

    def train_mode(self, model: MedtlModel, epoch: int) -> None:
        """``model.train()``, then BN of frozen stages back to eval per ``strategy.bn``.

        freeze_frozen (default): BN in frozen stages keeps its running statistics;
        train_all: every BN updates statistics; freeze_all: no BN updates statistics.
        """
        model.train()
        mode = self.scfg.bn
        if mode == "train_all":
            return
        bns = bn_modules_by_stage(model)
        train = self.trainable_stages(len(bns), epoch)
        for i, mods in enumerate(bns):
            if mode == "freeze_all" or i not in train:
                for m in mods:
                    m.eval()

    def training_step(self, engine: Engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One forward + loss on a batch; returns ``{"loss", "output"}``."""
        return engine.default_step(batch)

    def train(self, engine: Engine) -> None:
        """Run the training; every strategy but feature extraction uses the engine's loop."""
        engine.run_loop()

    def state_dict(self) -> dict[str, Any]:
        """Nothing outside the model: plain strategies keep no trainable state of their own."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see ``state_dict``)."""


class FineTune(BaseStrategy):
    """Freeze the first ``strategy.freeze_stages`` stage groups, train the rest."""

    name = "fine_tune"

    def trainable_stages(self, n_stages: int, epoch: int) -> set[int]:
        k = self.scfg.freeze_stages
        if k >= n_stages:
            raise ConfigError(
                f"strategy.freeze_stages={k} freezes every stage including the head; this "
                f"backbone has {n_stages} stage groups, so use 0..{n_stages - 1} "
                f"({n_stages - 1} = frozen backbone, new head only)"
            )
        return set(range(k, n_stages))


class GradualUnfreeze(BaseStrategy):
    """Head only for ``head_only_epochs``, then one more stage from the top every
    ``unfreeze_every`` epochs; stage lr = lr * layer_lr_decay**depth_from_top (ULMFiT-style).
    The first ``freeze_stages`` groups are never unfrozen."""

    name = "gradual_unfreeze"

    def trainable_stages(self, n_stages: int, epoch: int) -> set[int]:
        extra = 0
        if epoch >= self.scfg.head_only_epochs:
            extra = 1 + (epoch - self.scfg.head_only_epochs) // self.scfg.unfreeze_every
        top = {n_stages - 1 - d for d in range(min(1 + extra, n_stages))}
        return {i for i in top if i >= self.scfg.freeze_stages} | {n_stages - 1}

    def configure_param_groups(self, model: MedtlModel) -> list[dict[str, Any]]:
        groups = model.stage_groups()
        n = len(groups)
        decay = self.scfg.layer_lr_decay
        return [
            {"params": list(params), "lr": self.base_lr() * decay ** (n - 1 - i), "name": name}
            for i, (name, params) in enumerate(groups)
            if params
        ]


class LinearProbeFineTune(BaseStrategy):
    """LP-FT (Kumar et al., 2022): fit the head on frozen features first, then fine-tune
    everything from that head at ``lr * ft_lr_scale`` so the features are not distorted.
    BatchNorm statistics stay frozen by default (see ``train_mode``)."""

    name = "lp_ft"

    def base_lr(self) -> float:
        return self.cfg.train.lr * self.scfg.ft_lr_scale

    def train_mode(self, model: MedtlModel, epoch: int) -> None:
        """BN statistics stay those the probe was fit on (``bn=freeze_frozen`` means all
        here, since nothing is frozen); ``strategy.bn=train_all`` lets them adapt."""
        model.train()
        if self.scfg.bn == "train_all":
            return
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.eval()

    def on_train_start(self, engine: Engine) -> None:
        if self.scfg.probe_epochs <= 0:
            return
        from medtl.training.features import probe_head

        probe = probe_head(engine, epochs=self.scfg.probe_epochs)
        engine.extra_history.extend(probe)


class FeatureExtraction(BaseStrategy):
    """Frozen backbone + new head trained on cached embeddings (see ``features.py``):
    scikit-learn logistic regression copied into the linear head (``head_trainer=logistic``)
    or a torch linear/MLP head trained on the features (``head_trainer=torch``)."""

    name = "feature_extraction"

    def trainable_stages(self, n_stages: int, epoch: int) -> set[int]:
        return {n_stages - 1}

    def train(self, engine: Engine) -> None:
        from medtl.training.features import run_feature_extraction

        run_feature_extraction(engine)


class FewShot(BaseStrategy):
    """Few-shot: a classifier fitted on embeddings of a handful of patients by `medtl fewshot`
    (``medtl.fewshot``), never by the engine's loop or cross-validation."""

    name = "few_shot"

    def train(self, engine: Engine) -> None:
        raise ConfigError(
            "strategy.name=few_shot is fitted by `medtl fewshot` (patient-level episodes and a "
            "support set), not by the training loop; use `medtl fewshot --support S --query Q`"
        )


STRATEGIES: dict[str, type[BaseStrategy]] = {
    "feature_extraction": FeatureExtraction,
    "fine_tune": FineTune,
    "gradual_unfreeze": GradualUnfreeze,
    "lp_ft": LinearProbeFineTune,
    "few_shot": FewShot,
}


def get_strategy(cfg: PipelineConfig, target_ds: Any = None) -> Strategy:
    """The strategy object named by ``cfg.strategy.name``; with a joint domain-adaptation
    method (coral, dann) and target images, wrapped so each step also sees a target batch."""
    from medtl.training.adaptation import ADAPTATION_METHODS

    base = STRATEGIES[look_up_option(cfg.strategy.name, STRATEGIES, "strategy.name")](cfg)
    method = ADAPTATION_METHODS[cfg.domain_adaptation.method]
    if method.kind != "joint" or target_ds is None:
        return base
    from medtl.training.domain import JointAdaptation

    return JointAdaptation(base, cfg, target_ds)
