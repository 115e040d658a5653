"""MLflow tracking for medtl: parent/fold runs, lineage, model logging, registry, review, audit.

Importing this package does not import mlflow (that costs seconds); each function imports it
when first called, after setting the offline environment (see ``medtl.tracking.store``).
"""

from medtl.tracking.lineage import collect_lineage
from medtl.tracking.model_card import build_model_card
from medtl.tracking.phi_search import StoreHit, find_in_store
from medtl.tracking.registry import audit, register, render_audit, review
from medtl.tracking.runs import FoldRun, TrainTracker
from medtl.tracking.store import offline_environment, resolve_tracking_uri

__all__ = [
    "FoldRun",
    "StoreHit",
    "TrainTracker",
    "audit",
    "build_model_card",
    "collect_lineage",
    "find_in_store",
    "offline_environment",
    "register",
    "render_audit",
    "resolve_tracking_uri",
    "review",
]
