"""Joint domain adaptation in the training loop: Deep CORAL and DANN around any fine-tune strategy.

``JointAdaptation`` wraps the configured strategy (composition: its freezing, learning rates and
BatchNorm rules stay as they are) and replaces only its training step. Each step draws one batch
of target images beside the source batch and runs both through the network in one forward pass
(one pass keeps DDP's one-forward-per-backward contract; source and target share BatchNorm
batches, as in Ganin et al.'s DANN set-up). The pooled features are read by a pre-hook on the
head, so DDP- and compile-wrapped modules need no second entry point.

Written here, not taken from skada: its deep methods are skorch modules (a second training
framework in the hot path); the losses themselves are a few lines (``adaptation.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medtl.config import PipelineConfig
from medtl.models.model import MedtlModel
from medtl.training.adaptation import coral_loss, dann_lambda, grad_reverse
from medtl.training.protocol import Strategy

if TYPE_CHECKING:
    from medtl.training.engine import Engine


class JointAdaptation:
    """A strategy whose training step adds a CORAL or DANN loss on target batches."""

    def __init__(self, base: Strategy, cfg: PipelineConfig, target_ds: Any):
        self.base = base
        self.cfg = cfg
        self.da = cfg.domain_adaptation
        self.method = self.da.method
        self.name = f"{base.name}+{self.method}"
        self.target_ds = target_ds
        self.domain_head: nn.Module | None = None
        self._target_iter: Iterator[Any] | None = None
        self._epoch = 0
        self._step = 0
        self._steps_per_epoch = 1
        self._features: list[torch.Tensor] = []
        self._hook: Any = None

    # -- delegated hooks ---------------------------------------------------------------------
    def configure_param_groups(self, model: MedtlModel) -> list[dict[str, Any]]:
        """The base strategy's groups, plus DANN's domain classifier at ``train.lr``."""
        groups = self.base.configure_param_groups(model)
        self._hook = model.head.register_forward_pre_hook(self._keep_features)
        if self.method == "dann":
            self.domain_head = self._build_domain_head(model)
            params = list(self.domain_head.parameters())
            groups.append({"params": params, "lr": self.cfg.train.lr, "name": "domain_head"})
        return groups

    def on_train_start(self, engine: Engine) -> None:
        self.base.on_train_start(engine)

    def on_epoch_start(self, engine: Engine, epoch: int) -> None:
        """The base strategy's stages, and this epoch's target batches (seeded by epoch)."""
        self.base.on_epoch_start(engine, epoch)
        self._epoch, self._step = epoch, 0
        self._steps_per_epoch = max(1, len(engine.train_loader(epoch)))
        self._target_iter = iter(self._target_loader(engine, epoch))

    def train_mode(self, model: MedtlModel, epoch: int) -> None:
        self.base.train_mode(model, epoch)
        if self.domain_head is not None:
            self.domain_head.train()

    def train(self, engine: Engine) -> None:
        try:
            engine.run_loop()
        finally:
            if self._hook is not None:
                self._hook.remove()

    # -- the joint step ----------------------------------------------------------------------
    def training_step(self, engine: Engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Task loss on the source half, plus the adaptation loss on both halves' features."""
        xs, ys = engine.to_input(batch), engine.to_target(batch)
        xt = engine.to_input(self._next_target(engine))
        ns = xs.shape[0]
        self._features.clear()
        with engine.autocast():
            out = engine._current(torch.cat([xs, xt]))
        feats = self._features[-1].float()
        out_s = out[:ns]
        loss = engine.loss_fn(out_s.float(), ys)
        if self.method == "coral":
            extra = self.da.weight * coral_loss(feats[:ns], feats[ns:])
        else:
            extra = self._domain_loss(feats, ns)
        self._step += 1
        return {"loss": loss + extra, "output": out_s, "adaptation_loss": extra.detach()}

    def _domain_loss(self, feats: torch.Tensor, ns: int) -> torch.Tensor:
        """DANN: domain logits behind the reversal layer; its weight ramps up over training."""
        if self.domain_head is None:
            raise RuntimeError("configure_param_groups must run before the first DANN step")
        epochs = self.cfg.train.epochs
        progress = min(1.0, (self._epoch + self._step / self._steps_per_epoch) / epochs)
        lam = self.da.weight * dann_lambda(progress)
        logits = self.domain_head(grad_reverse(feats, lam)).view(-1)
        domain = torch.zeros_like(logits)
        domain[ns:] = 1.0
        return nn.functional.binary_cross_entropy_with_logits(logits, domain)

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """DANN's domain classifier, so a resumed run continues with it."""
        return {"domain_head": self.domain_head.state_dict()} if self.domain_head else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.domain_head is not None and state.get("domain_head"):
            self.domain_head.load_state_dict(state["domain_head"])

    # -- helpers -------------------------------------------------------------------------------
    def _keep_features(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():  # training steps only, not validation passes
            self._features[:] = [args[0]]

    def _build_domain_head(self, model: MedtlModel) -> nn.Module:
        device = next(model.parameters()).device
        width = self.da.dann_hidden
        head = nn.Sequential(
            nn.Linear(model.num_features, width), nn.ReLU(inplace=True), nn.Linear(width, 1)
        ).to(device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in head.parameters():  # outside DDP: average its gradients by hand
                p.register_hook(lambda g, w=world: _all_reduce_mean(g, w))
        return head

    def _target_loader(self, engine: Engine, epoch: int) -> Any:
        from torch.utils.data import DataLoader, RandomSampler

        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + 104729 + epoch)
        n = self._steps_per_epoch * self.cfg.train.batch_size
        sampler = RandomSampler(self.target_ds, replacement=True, num_samples=n, generator=gen)
        return DataLoader(
            self.target_ds,
            batch_size=self.cfg.train.batch_size,
            sampler=sampler,
            num_workers=engine.num_workers,
            pin_memory=engine.device.type == "cuda",
            drop_last=False,
        )

    def _next_target(self, engine: Engine) -> dict[str, Any]:
        if self._target_iter is None:
            self._target_iter = iter(self._target_loader(engine, self._epoch))
        try:
            return next(self._target_iter)
        except StopIteration:  # more source steps than planned (uneven last batch)
            self._target_iter = iter(self._target_loader(engine, self._epoch + 10_000))
            return next(self._target_iter)


def _all_reduce_mean(grad: torch.Tensor, world: int) -> torch.Tensor:
    out = grad.clone()
    torch.distributed.all_reduce(out)
    return out / world
