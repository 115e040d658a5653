"""The ``Strategy`` protocol: the hooks the engine calls, and all the engine knows of a strategy.

Strategies (``medtl.training.strategies``) implement it and use the engine; the engine never
imports them, so the dependency runs one way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from medtl.models.model import MedtlModel

if TYPE_CHECKING:
    from medtl.training.engine import Engine


class Strategy(Protocol):
    """What a transfer strategy decides inside the engine's loop."""

    name: str

    def configure_param_groups(self, model: MedtlModel) -> list[dict[str, Any]]:
        """Optimizer parameter groups (one per stage, each with its learning rate)."""
        ...

    def on_train_start(self, engine: Engine) -> None:
        """Once before the first epoch of a fresh (not resumed) run."""
        ...

    def on_epoch_start(self, engine: Engine, epoch: int) -> None:
        """Before each epoch: which stages train (``requires_grad``)."""
        ...

    def train_mode(self, model: MedtlModel, epoch: int) -> None:
        """``model.train()`` and the BatchNorm behaviour of this epoch."""
        ...

    def training_step(self, engine: Engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One forward + loss on a batch; returns ``{"loss", "output"}``."""
        ...

    def train(self, engine: Engine) -> None:
        """Run the whole training (the engine's loop, or a replacement for it)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Trainable state the strategy owns outside the model (saved in last.pt)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, on resume."""
        ...
