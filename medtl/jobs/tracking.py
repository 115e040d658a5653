"""Tracking stage: the job's MLflow parent run, its fold runs and the logged/registered model.

``JobTracking`` is what the orchestrator holds: it is a no-op when tracking is off or on
ranks other than 0, so no other stage checks either.

Interrupted runs: given the run folder, :func:`start_tracking` and :func:`attach_tracking`
end FAILED the runs a killed job of that folder left RUNNING (``medtl.tracking.interrupted``)
unless another tracked job of the folder is alive, and hold the folder's "active" lock until
the job ends, so that a later job can tell this one from a killed one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medtl.config import PipelineConfig
from medtl.manifest import ValidationReport

if TYPE_CHECKING:
    from medtl.jobs.run_store import ActiveJob

log = logging.getLogger("medtl")


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

    def __init__(self, tracker: Any = None, active: ActiveJob | None = None):
        self.tracker = tracker
        self._folds: dict[int, Any] = {}
        self._active = active  # the run folder's "a tracked job runs here" lock

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
        self._release()

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
        try:
            if self.tracker is not None:
                self.tracker.end(status)
        finally:
            self._release()

    def _release(self) -> None:
        if self._active is not None:
            self._active.release()
            self._active = None


def start_tracking(
    cfg: PipelineConfig,
    lineage: Mapping[str, str],
    validation: ValidationReport,
    manifest_hash: str,
    is_main: bool,
    say: Callable[..., None],
    run_dir: Path | None = None,
) -> JobTracking:
    """Start the parent run with the manifest as its dataset input (rank 0, tracking on).

    ``run_dir`` (the train job's folder; call under its ``run_lock``): the runs a killed job of
    the folder left RUNNING, ``job.json``'s parent among them, end FAILED, superseded by the
    new parent run, unless another tracked job of the folder is alive."""
    if not (is_main and cfg.tracking.enabled):
        return JobTracking()
    from medtl.tracking.runs import TrainTracker

    tracker = TrainTracker(cfg.tracking, cfg, lineage, _folder_id(run_dir))
    alive, active = _claim_activity(run_dir)
    try:
        tracker.start()
        tracker.log_dataset(manifest_hash, validation.summary)
        say(f"MLflow run {tracker.parent_run_id} at {tracker.tracking_uri}")
        if run_dir is not None:
            recorded = _recorded_parent(run_dir, tracker.tracking_uri)
            _end_interrupted(tracker, run_dir, alive, recorded, tracker.parent_run_id, say)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            JobTracking(tracker, active).end("FAILED")  # not left RUNNING for the next job
        raise
    return JobTracking(tracker, active)


def attach_tracking(
    cfg: PipelineConfig,
    lineage: Mapping[str, str],
    parent_run_id: str,
    say: Callable[..., None],
    run_dir: Path | None = None,
) -> JobTracking:
    """Join the parent run another job of the same run folder started (fold jobs, collect).

    ``run_dir`` (call under its ``run_lock``): fold runs a killed fold job left RUNNING end
    FAILED when no other tracked job of the folder is alive; the joined parent stays open.
    Raises MedtlError when this tracking store does not hold that run."""
    from medtl.errors import MedtlError
    from medtl.tracking.runs import TrainTracker

    tracker = TrainTracker(cfg.tracking, cfg, lineage, _folder_id(run_dir))
    try:
        tracker.attach(parent_run_id)
    except Exception as err:  # MLflow raises its own error types for an unknown run
        raise MedtlError(
            f"MLflow parent run {parent_run_id} (recorded in the run folder's job.json) is not "
            f"in {tracker.tracking_uri}: {err}. Point tracking.uri (or MLFLOW_TRACKING_URI) at "
            "the server the first job of this run used"
        ) from err
    alive, active = _claim_activity(run_dir)
    try:
        say(f"MLflow run {parent_run_id} at {tracker.tracking_uri} (joined)")
        if run_dir is not None:
            _end_interrupted(tracker, run_dir, alive, None, None, say)
    except BaseException:
        if active is not None:
            active.release()
        raise
    return JobTracking(tracker, active)


def _folder_id(run_dir: Path | None) -> str | None:
    from medtl.tracking.interrupted import run_folder_id

    return run_folder_id(run_dir) if run_dir is not None else None


def _claim_activity(run_dir: Path | None) -> tuple[bool, ActiveJob | None]:
    """Whether another tracked job of ``run_dir`` is alive, then this job's own hold on it
    (checked first: this process's own lock would count as a sibling)."""
    if run_dir is None:
        return False, None
    from medtl.jobs.run_store import mark_job_active, tracked_job_alive

    alive = tracked_job_alive(run_dir)
    return alive, mark_job_active(run_dir)


def _recorded_parent(run_dir: Path, tracking_uri: str) -> str | None:
    """``job.json``'s parent run when it lives in this store (else it is not ours to end)."""
    from medtl.jobs.run_store import read_job_record

    record = read_job_record(run_dir)
    if record is None or not record.parent_run_id or record.tracking_uri != tracking_uri:
        return None
    return record.parent_run_id


def _end_interrupted(
    tracker: Any,
    run_dir: Path,
    alive: bool,
    recorded: str | None,
    superseded_by: str | None,
    say: Callable[..., None],
) -> None:
    """End FAILED what a killed job of ``run_dir`` left RUNNING, unless a sibling is alive.

    Fold jobs (`--folds`) of one run share one parent run across processes: while any of them
    holds the folder's active lock, RUNNING runs of the folder may be theirs, so none is
    touched (a later job, once they are gone, ends what a killed one left)."""
    if alive:
        log.warning(
            "%s: another tracked job is running there; its MLflow runs are left open", run_dir
        )
        return
    ended = tracker.end_interrupted(recorded, superseded_by)
    if ended:
        say(
            f"[yellow]{len(ended)} MLflow run(s) of an interrupted job in {run_dir} marked "
            f"FAILED[/yellow] ({', '.join(ended)})"
        )
