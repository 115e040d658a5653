"""Training stage: transfer strategies over one engine, losses, samplers, features, DDP."""

from medtl.training.api import FitResult, fit, predict_proba
from medtl.training.distributed import DistContext, init_distributed
from medtl.training.protocol import Strategy
from medtl.training.strategies import STRATEGIES, BaseStrategy, get_strategy

__all__ = [
    "STRATEGIES",
    "BaseStrategy",
    "DistContext",
    "FitResult",
    "Strategy",
    "fit",
    "get_strategy",
    "init_distributed",
    "predict_proba",
]
