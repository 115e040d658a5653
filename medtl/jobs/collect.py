"""The stages of `medtl train` after the folds: pool their predictions, refit, adapt to a
target site, report, save and publish the model.

A single-process job runs them straight after its folds; ``medtl train --collect`` runs them
on the fold results that separate fold jobs (``--folds``) left in the run folder, after
:func:`load_folds` has checked that every fold is there and was trained under this config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtl.config import PipelineConfig
from medtl.errors import MedtlError
from medtl.jobs.folds import FoldResult, fold_dir
from medtl.jobs.outputs import build_run_info, held_out_report, save_model, write_cv_report
from medtl.jobs.pooling import pool_folds, pooled_operating_point
from medtl.jobs.prepare import TrainData
from medtl.jobs.refit import refit_final
from medtl.jobs.run_store import RESULT_JSON, JobIdentity, load_fold_result
from medtl.jobs.target import TargetData, run_target_stage
from medtl.jobs.tracking import JobTracking
from medtl.training.distributed import DistContext


@dataclass
class TrainOutcome:
    """What a finished `medtl train` job produced (paths and identifiers, no data)."""

    run_dir: Path
    report_html: Path | None = None
    report_md: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    bundle_dir: Path | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    model_uri: str | None = None
    registered: dict[str, Any] | None = None
    n_quarantined: int = 0
    folds_run: list[int] = field(default_factory=list)  # the folds this job trained or reused


@dataclass
class JobContext:
    """What every stage after data preparation reads: the prepared data, the target site,
    the run folder, lineage, tracking and this job's identity."""

    run_dir: Path
    dist: DistContext
    data: TrainData
    target: TargetData | None
    joint_ds: Any
    lineage: dict[str, str]
    tracking: JobTracking
    identity: JobIdentity
    say: Callable[..., None]


def load_folds(
    run_dir: Path, data: TrainData, identity: JobIdentity, fold_ids: Sequence[int]
) -> tuple[list[FoldResult], dict[int, str]]:
    """Every fold's stored result and its MLflow fold run id, checked against this job.

    Raises MedtlError naming each missing fold and, per fold trained under another config or
    other data, the keys that differ; nothing is pooled unless every fold is there and agrees.
    """
    results, run_ids, problems, found = [], {}, [], []
    for k in fold_ids:
        stored = load_fold_result(run_dir, k, data)
        if stored is None:
            problems.append(
                f"fold {k} has not finished ({fold_dir(run_dir, k) / RESULT_JSON} missing)"
            )
            continue
        diffs = identity.differences(stored.identity)
        if diffs:
            problems.append(
                f"fold {k} was trained under another config or data ("
                + "; ".join(d.replace(" there", f" in fold {k}") for d in diffs)
                + ")"
            )
            continue
        found.append(k)
        results.append(stored.result)
        if stored.fold_run_id:
            run_ids[k] = stored.fold_run_id
    if problems:
        have = ", ".join(map(str, found)) or "none"
        raise MedtlError(
            f"cannot collect {run_dir}: " + "; ".join(problems) + f". Folds that match: {have}. "
            "Run the missing or differing folds with `medtl train PIPELINE --folds K --out "
            f"{run_dir}` and this job's pipeline and --set values, then --collect again"
        )
    return results, run_ids


def collect(cfg: PipelineConfig, job: JobContext, folds: Sequence[FoldResult]) -> TrainOutcome:
    """Pool the folds, refit the final model, run the target stage, write the report and the
    bundle and publish them (rank 0 writes; every rank trains)."""
    data, run_dir, dist, tracking = job.data, job.run_dir, job.dist, job.tracking
    pooled = pool_folds(folds, data.classes, data.task, data.subgroup_and_study, cfg)
    n_pool = len(data.train_pool)
    job.say(f"final model: refit on {n_pool} images (cv.selection={cfg.cv.selection})")
    refit = refit_final(cfg, data, folds, run_dir, dist, target_ds=job.joint_ds)
    deployed = refit.point or pooled_operating_point(folds, data.task, cfg)
    model, target_info = run_target_stage(
        cfg, data, job.target, refit.model, deployed, folds, run_dir, dist
    )
    outcome = TrainOutcome(
        run_dir=run_dir, n_quarantined=len(data.quarantine), folds_run=[f.fold for f in folds]
    )
    if not dist.is_main:
        return outcome
    lineage = job.lineage
    run_info = build_run_info(cfg, data, folds, pooled, refit, deployed, lineage, tracking.ids)
    run_info["target"] = target_info
    paths, metrics = write_cv_report(run_dir, cfg, data, pooled, run_info)
    tracking.close_folds(metrics)
    bundle = save_model(run_dir, model, cfg, data, deployed, lineage, metrics)
    if data.test:
        held_out_report(run_dir, model, cfg, data, deployed)
    model_uri, registered = tracking.publish(run_dir, bundle, pooled.oof, metrics)
    outcome.report_html, outcome.report_md = paths.html, paths.markdown
    outcome.metrics, outcome.bundle_dir = metrics, bundle
    outcome.tracking_uri = tracking.ids["tracking_uri"]
    outcome.parent_run_id = tracking.ids["parent_run_id"]
    outcome.model_uri, outcome.registered = model_uri, registered
    return outcome
