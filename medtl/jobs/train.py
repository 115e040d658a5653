"""The `medtl train` job, as the stages it runs (docs/architecture.md lists each one's input
and output). Under `torchrun` every rank runs this job; only rank 0 writes files and talks to
MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medtl.config import PipelineConfig
from medtl.errors import ConfigError
from medtl.jobs.folds import fold_ids, fold_split, run_fold, seed_everything
from medtl.jobs.outputs import (
    build_run_info,
    held_out_report,
    save_model,
    write_cv_report,
    write_job_inputs,
)
from medtl.jobs.pooling import pool_folds, pooled_operating_point
from medtl.jobs.prepare import prepare_data, read_inputs, split_patients
from medtl.jobs.refit import refit_final
from medtl.jobs.tracking import JobTracking, start_tracking
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


def run_train(
    cfg: PipelineConfig,
    *,
    manifest_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    register_name: str | None = None,
    console: Any = None,
) -> TrainOutcome:
    """Run the whole cross-validated training job and return where its outputs are.

    Raises ConfigError/ManifestError before any training when the config or data are wrong.
    """
    from medtl.tracking.lineage import collect_lineage
    from medtl.training.distributed import init_distributed

    dist = init_distributed()
    manifest = resolve_job(cfg, manifest_path, register_name)
    seed_everything(cfg.seed)
    run_dir = make_run_dir(cfg, out_dir, dist)
    say = console.print if console is not None and dist.is_main else _silent

    inputs = read_inputs(cfg, manifest)
    split_df = split_patients(inputs, cfg)
    n, classes, task = len(inputs.records), inputs.classes, inputs.task
    say(f"[bold]medtl train[/bold] {cfg.name}: {n} images, classes {classes} ({task})")
    data = prepare_data(cfg, inputs, split_df, run_dir, dist)
    if data.quarantine:
        n_bad = len(data.quarantine)
        say(f"[yellow]{n_bad} unreadable file(s) quarantined[/yellow] (see quarantine.csv)")
    lineage: dict[str, str] = {}
    if dist.is_main:
        write_job_inputs(run_dir, cfg, data)
        weights = data.transforms.weights_info
        lineage = collect_lineage(cfg, data.manifest_hash, data.validation.summary, weights)
    tracking = start_tracking(cfg, lineage, data.validation, data.manifest_hash, dist.is_main, say)

    status = "FAILED"
    try:
        folds = []
        for k in fold_ids(data, cfg.cv):
            tr, va = fold_split(data, k)
            say(f"fold {k}: {len(tr)} train / {len(va)} validation images")
            folds.append(run_fold(cfg, data, k, run_dir, dist, tracking.fold_logger(k)))
        pooled = pool_folds(folds, data.classes, data.task, data.subgroup_and_study, cfg)
        n_pool = len(data.train_pool)
        say(f"final model: refit on {n_pool} images (cv.selection={cfg.cv.selection})")
        refit = refit_final(cfg, data, folds, run_dir, dist)
        deployed = refit.point or pooled_operating_point(folds, data.task, cfg)
        outcome = TrainOutcome(run_dir=run_dir, n_quarantined=len(data.quarantine))
        if dist.is_main:
            run_info = build_run_info(
                cfg, data, folds, pooled, refit, deployed, lineage, tracking.ids
            )
            paths, metrics = write_cv_report(run_dir, cfg, data, pooled, run_info)
            tracking.close_folds(metrics)
            bundle = save_model(run_dir, refit.model, cfg, data, deployed, lineage, metrics)
            if data.test:
                held_out_report(run_dir, refit.model, cfg, data, deployed)
            model_uri, registered = tracking.publish(run_dir, bundle, pooled.oof, metrics)
            outcome = _finished(outcome, paths, metrics, bundle, tracking, model_uri, registered)
        status = "FINISHED"
        return outcome
    finally:
        tracking.end(status)
        if dist.world_size > 1:
            dist.barrier()


def resolve_job(
    cfg: PipelineConfig, manifest_path: str | Path | None, register_name: str | None
) -> str:
    """The manifest this job trains on (``--manifest`` wins over ``data.manifest``), written
    back into the config with ``--register``; ConfigError when there is none."""
    manifest = manifest_path or cfg.data.manifest
    if not manifest:
        raise ConfigError(
            "no manifest given: pass --manifest M.csv or set data.manifest in the pipeline"
        )
    cfg.data.manifest = str(manifest)
    if register_name:
        cfg.tracking.register_name = register_name
    return str(manifest)


def default_run_dir(cfg: PipelineConfig, root: str | Path = "runs") -> Path:
    """A new timestamped folder under ``runs/`` named after the pipeline."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{cfg.name}-{stamp}"


def make_run_dir(cfg: PipelineConfig, out_dir: str | Path | None, dist: DistContext) -> Path:
    """``--out``, or a new folder under ``runs/`` (torchrun ranks must be told one folder)."""
    if dist.world_size > 1 and not out_dir:
        raise ConfigError("under torchrun pass --out DIR so every rank writes to the same run")
    run_dir = Path(out_dir) if out_dir else default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _finished(
    outcome: TrainOutcome,
    paths: Any,
    metrics: dict[str, Any],
    bundle_dir: Path,
    tracking: JobTracking,
    model_uri: str | None,
    registered: dict[str, Any] | None,
) -> TrainOutcome:
    """Fill in the outcome of rank 0, which wrote everything."""
    outcome.report_html, outcome.report_md = paths.html, paths.markdown
    outcome.metrics, outcome.bundle_dir = metrics, bundle_dir
    outcome.tracking_uri = tracking.ids["tracking_uri"]
    outcome.parent_run_id = tracking.ids["parent_run_id"]
    outcome.model_uri, outcome.registered = model_uri, registered
    return outcome


def _silent(*args: Any, **kwargs: Any) -> None:
    """The console of ranks other than 0, and of jobs run without one."""
