"""Tracking stage: the job's MLflow parent run, its fold runs and the logged/registered model.

``JobTracking`` is what the orchestrator holds: it is a no-op when tracking is off or on
ranks other than 0, so no other stage checks either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtl.config import PipelineConfig
from medtl.manifest import ValidationReport


def headline(block: Mapping[str, Any]) -> dict[str, float]:
    """Headline metrics of one evaluation block for MLflow: ``auroc``, ``auroc_ci_low``, ...

    Takes a ``metrics.json`` block (``pooled`` or a fold) whose ``summary`` maps a metric to
    ``{value, low, high}``; undefined values (one-class folds) are left out, not logged as NaN.
    """
    out: dict[str, float] = {}
    for name, entry in (block.get("summary") or {}).items():
        for suffix, key in (("", "value"), ("_ci_low", "low"), ("_ci_high", "high")):
            v = entry.get(key) if isinstance(entry, dict) else None
            if isinstance(v, int | float) and np.isfinite(v):
                out[f"{name}{suffix}"] = float(v)
    for key in ("n", "n_patients", "n_pos"):
        if isinstance(block.get(key), int | float):
            out[key] = float(block[key])
    return out


class JobTracking:
    """The MLflow side of one train job (``tracker`` None: nothing is logged)."""

    def __init__(self, tracker: Any = None):
        self.tracker = tracker
        self._folds: dict[int, Any] = {}

    @property
    def ids(self) -> dict[str, str | None]:
        """Where the runs are: ``tracking_uri`` and ``parent_run_id`` (None when off)."""
        t = self.tracker
        return {
            "tracking_uri": t.tracking_uri if t else None,
            "parent_run_id": t.parent_run_id if t else None,
        }

    def fold_logger(self, k: int) -> Callable[[dict, int], None] | None:
        """A nested run for fold ``k``; returns its per-epoch logger."""
        if self.tracker is None:
            return None
        self._folds[k] = self.tracker.fold_run(k)
        return self._folds[k].log_epoch

    def fold_run_id(self, k: int) -> str | None:
        """The MLflow run id of fold ``k``'s run in this job (None when off or not opened)."""
        fold_run = self._folds.get(k)
        return fold_run.run_id if fold_run is not None else None

    def reopen_folds(self, run_ids: Mapping[int, str]) -> None:
        """Take over fold runs that fold jobs opened (``--collect`` logs their metrics)."""
        if self.tracker is None:
            return
        from medtl.tracking.runs import FoldRun

        for k, run_id in run_ids.items():
            self._folds[k] = FoldRun(self.tracker.tracking_uri, run_id, k)

    def end_folds(self, status: str) -> None:
        """End this job's fold runs but not the parent (a fold job; ``--collect`` ends it)."""
        for fold_run in self._folds.values():
            fold_run.end(status)

    def close_folds(self, metrics: Mapping[str, Any]) -> None:
        """Each fold run gets the report's own per-fold metrics (no second evaluation)."""
        for k, fold_run in self._folds.items():
            fold_run.log_metrics(headline(metrics.get("folds", {}).get(str(k), {})))
            fold_run.end()

    def publish(
        self, run_dir: Path, bundle_dir: Path, oof: pd.DataFrame, metrics: Mapping[str, Any]
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Pooled metrics, artifacts and the model on the parent run; registers the model when
        ``tracking.register_name`` is set. Returns the model URI and the registration."""
        t = self.tracker
        if t is None:
            return None, None
        t.log_metrics(headline(metrics.get("pooled", {})))
        t.log_artifacts(run_dir)
        model_uri = t.log_model(bundle_dir, oof[["image"]].head(2) if len(oof) else None)
        if not t.tcfg.register_name:
            return model_uri, None
        from medtl.tracking.registry import register

        return model_uri, register(t.parent_run_id, t.tcfg.register_name, t.tcfg)

    def end(self, status: str) -> None:
        """Terminate the parent run (and any fold run left open)."""
        if self.tracker is not None:
            self.tracker.end(status)


def start_tracking(
    cfg: PipelineConfig,
    lineage: Mapping[str, str],
    validation: ValidationReport,
    manifest_hash: str,
    is_main: bool,
    say: Callable[..., None],
) -> JobTracking:
    """Start the parent run with the manifest as its dataset input (rank 0, tracking on)."""
    if not (is_main and cfg.tracking.enabled):
        return JobTracking()
    from medtl.tracking.runs import TrainTracker

    tracker = TrainTracker(cfg.tracking, cfg, lineage)
    tracker.start()
    tracker.log_dataset(manifest_hash, validation.summary)
    say(f"MLflow run {tracker.parent_run_id} at {tracker.tracking_uri}")
    return JobTracking(tracker)


def attach_tracking(
    cfg: PipelineConfig,
    lineage: Mapping[str, str],
    parent_run_id: str,
    say: Callable[..., None],
) -> JobTracking:
    """Join the parent run another job of the same run folder started (fold jobs, collect).

    Raises MedtlError when this tracking store does not hold that run."""
    from medtl.errors import MedtlError
    from medtl.tracking.runs import TrainTracker

    tracker = TrainTracker(cfg.tracking, cfg, lineage)
    try:
        tracker.attach(parent_run_id)
    except Exception as err:  # MLflow raises its own error types for an unknown run
        raise MedtlError(
            f"MLflow parent run {parent_run_id} (recorded in the run folder's job.json) is not "
            f"in {tracker.tracking_uri}: {err}. Point tracking.uri (or MLFLOW_TRACKING_URI) at "
            "the server the first job of this run used"
        ) from err
    say(f"MLflow run {parent_run_id} at {tracker.tracking_uri} (joined)")
    return JobTracking(tracker)
