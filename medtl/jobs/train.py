"""The `medtl train` job, as the stages it runs (docs/architecture.md lists each one's input
and output). Under `torchrun` every rank runs this job; only rank 0 writes files and talks to
MLflow.

One job runs every fold and then the post-fold stages (``collect.py``). The same stages also
run apart: ``folds=[...]`` (`--folds`) trains only those folds into a shared run folder and
stops; ``collect=True`` (`--collect`) trains no fold and pools what the fold jobs left there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from medtl.config import CVConfig, PipelineConfig
from medtl.errors import ConfigError, MedtlError
from medtl.jobs.collect import JobContext, TrainOutcome, collect, load_folds
from medtl.jobs.folds import FoldResult, fold_ids, fold_split, run_fold, seed_everything
from medtl.jobs.outputs import write_job_inputs
from medtl.jobs.prepare import TrainData, prepare_data, read_inputs, split_patients
from medtl.jobs.run_store import (
    JobIdentity,
    JobRecord,
    StoredFold,
    adopt_stored_splits,
    drop_checkpoints,
    job_identity,
    load_fold_result,
    read_job_record,
    run_lock,
    save_fold_result,
    write_job_record,
)
from medtl.jobs.target import joint_target, prepare_target, target_lineage
from medtl.jobs.tracking import JobTracking, attach_tracking, start_tracking
from medtl.training.distributed import DistContext

__all__ = ["TrainOutcome", "default_run_dir", "run_folds", "run_train"]

log = logging.getLogger("medtl")
Mode = Literal["all", "folds", "collect"]


def run_train(
    cfg: PipelineConfig,
    *,
    manifest_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    register_name: str | None = None,
    console: Any = None,
    folds: Sequence[int] | None = None,
    collect_folds: bool = False,
) -> TrainOutcome:
    """Run the whole cross-validated training job and return where its outputs are.

    ``folds``: a fold job, only these folds into ``out_dir`` (no refit, report or
    registration). ``collect_folds``: no fold is trained; every fold's stored result in
    ``out_dir`` is pooled, then refit, report and registration run as in a whole job.

    Raises ConfigError/ManifestError before any training when the config or data are wrong;
    MedtlError when ``collect_folds`` finds a fold missing or trained under another config.
    """
    from medtl.training.distributed import init_distributed

    mode = job_mode(folds, collect_folds, out_dir)
    dist = init_distributed()
    manifest = resolve_job(cfg, manifest_path, register_name)
    if folds is not None:
        cfg.cv.only_folds = sorted(set(folds))
    seed_everything(cfg.seed)
    run_dir = make_run_dir(cfg, out_dir, dist)
    say = console.print if console is not None and dist.is_main else _silent
    job = prepare_job(cfg, manifest, run_dir, dist, mode, say)

    status = "FAILED"
    try:
        if mode == "collect":
            results, run_ids = load_folds(
                run_dir, job.data, job.identity, fold_ids(job.data, cfg.cv)
            )
            job.tracking.reopen_folds(run_ids)
        else:
            results = run_folds(cfg, job, new_fold_runs=mode == "all")
        if mode == "folds":
            outcome = TrainOutcome(
                run_dir, n_quarantined=len(job.data.quarantine), folds_run=[r.fold for r in results]
            )
        else:
            outcome = collect(cfg, job, results)
        status = "FINISHED"
        return outcome
    finally:
        if mode == "folds":  # the parent run stays open for the other fold jobs and --collect
            job.tracking.end_folds(status)
        else:
            job.tracking.end(status)
        if dist.world_size > 1:
            dist.barrier()


def job_mode(folds: Sequence[int] | None, collect_folds: bool, out_dir: Any) -> Mode:
    """Which job this is: every fold (``all``), a fold job or the collect job.

    Raises ConfigError for ``--folds`` with ``--collect``, or either without ``--out``."""
    if folds is not None and collect_folds:
        raise ConfigError(
            "--folds and --collect exclude each other: run each fold job with --folds K "
            "--out RUN, then one job with --collect --out RUN"
        )
    flag = "--folds" if folds is not None else "--collect" if collect_folds else None
    if flag and not out_dir:
        raise ConfigError(
            f"{flag} needs --out RUN: the fold jobs and --collect of one run share its folder"
        )
    if folds is not None and not list(folds):
        raise ConfigError("--folds names no fold; example: --folds 0,2")
    return "folds" if folds is not None else "collect" if collect_folds else "all"


def prepare_job(
    cfg: PipelineConfig,
    manifest: str,
    run_dir: Path,
    dist: DistContext,
    mode: Mode,
    say: Callable[..., None],
) -> JobContext:
    """Read, split and decode the data (and the target site), then claim the run folder and
    start or join the MLflow parent run (rank 0); later jobs of a run adopt its splits."""
    from medtl.tracking.lineage import collect_lineage

    inputs = read_inputs(cfg, manifest)
    split_df = split_patients(inputs, cfg)
    n, classes, task = len(inputs.records), inputs.classes, inputs.task
    say(f"[bold]medtl train[/bold] {cfg.name}: {n} images, classes {classes} ({task})")
    data = prepare_data(cfg, inputs, split_df, run_dir, dist)
    if data.quarantine:
        n_bad = len(data.quarantine)
        say(f"[yellow]{n_bad} unreadable file(s) quarantined[/yellow] (see quarantine.csv)")
    target = prepare_target(cfg, inputs, data, dist)
    joint_ds = joint_target(cfg, data, target)
    if mode == "folds":
        check_requested_folds(data, cfg.cv)
    identity = job_identity(cfg, data.manifest_hash, target.manifest_hash if target else None)
    lineage: dict[str, str] = {}
    tracking = JobTracking()
    if dist.is_main:
        weights = data.transforms.weights_info
        lineage = collect_lineage(cfg, data.manifest_hash, data.validation.summary, weights)
        lineage.update(target_lineage(target, cfg.domain_adaptation.method))
        tracking = claim_run(cfg, data, run_dir, identity, lineage, mode, say)
    if dist.world_size > 1:
        dist.barrier()  # rank 0 has written (or checked) the run's splits and record
    if mode != "all":
        adopt_stored_splits(data, run_dir)
    return JobContext(run_dir, dist, data, target, joint_ds, lineage, tracking, identity, say)


def check_requested_folds(data: TrainData, cv: CVConfig) -> None:
    """A fold job's ``--folds`` must name folds of the split (ConfigError lists them)."""
    have = sorted({r["fold"] for r in data.train_pool if r["fold"] >= 0})
    bad = [k for k in cv.only_folds or [] if k not in have]
    if bad:
        raise ConfigError(
            f"--folds {','.join(map(str, bad))}: no such fold; this split has folds "
            f"{', '.join(map(str, have))} (cv.folds={cv.folds})"
        )


def claim_run(
    cfg: PipelineConfig,
    data: TrainData,
    run_dir: Path,
    identity: JobIdentity,
    lineage: dict[str, str],
    mode: Mode,
    say: Callable[..., None],
) -> JobTracking:
    """Under the run folder's lock: the first job of a run (and every whole job) writes the
    config, splits, quarantine and job record and starts the MLflow parent run; a fold job or
    collect after it checks its identity against the record and joins that parent run."""
    with run_lock(run_dir):
        record = read_job_record(run_dir)
        if mode == "collect" and record is None:
            raise MedtlError(
                f"{run_dir} holds no fold jobs (no job.json): run `medtl train PIPELINE "
                f"--folds K --out {run_dir}` for each fold first, then --collect"
            )
        if record is not None and mode != "all":
            return join_run(cfg, data, run_dir, identity, lineage, record, mode, say)
        if record is not None:
            forget_other_run(run_dir, identity, record)
        write_job_inputs(run_dir, cfg, data)
        tracking = start_tracking(
            cfg, lineage, data.validation, data.manifest_hash, True, say, run_dir=run_dir
        )
        ids = tracking.ids
        write_job_record(run_dir, JobRecord(identity, ids["parent_run_id"], ids["tracking_uri"]))
        return tracking


def join_run(
    cfg: PipelineConfig,
    data: TrainData,
    run_dir: Path,
    identity: JobIdentity,
    lineage: dict[str, str],
    record: JobRecord,
    mode: Mode,
    say: Callable[..., None],
) -> JobTracking:
    """A later fold job (refused on any difference from the run's record) or the collect job
    (each fold is checked by ``load_folds``); joins the recorded parent run, or starts one
    when the earlier jobs tracked nothing."""
    diffs = identity.differences(record.identity)
    if mode == "folds" and diffs:
        raise ConfigError(
            f"{run_dir} is a run of another config or data: " + "; ".join(diffs) + ". Every "
            "fold job of one run needs the same pipeline, --set values and manifest content; "
            "use them, or another --out"
        )
    if mode == "collect":  # the config that pools and reports is this job's
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if not cfg.tracking.enabled:
        return JobTracking()
    if record.parent_run_id:
        return attach_tracking(cfg, lineage, record.parent_run_id, say, run_dir=run_dir)
    tracking = start_tracking(
        cfg, lineage, data.validation, data.manifest_hash, True, say, run_dir=run_dir
    )
    ids = tracking.ids
    write_job_record(
        run_dir,
        replace(record, parent_run_id=ids["parent_run_id"], tracking_uri=ids["tracking_uri"]),
    )
    return tracking


def forget_other_run(run_dir: Path, identity: JobIdentity, record: JobRecord) -> None:
    """A whole job into a folder that held another run starts afresh: checkpoints of another
    config are refused by the engine; those of other data (same config) are removed here."""
    diffs = identity.differences(record.identity)
    if not diffs:
        return
    if identity.data != record.identity.data:
        gone = drop_checkpoints(run_dir)
        log.warning(
            "%s held a run of other data (%s); %d checkpoint/result file(s) removed, training "
            "starts afresh",
            run_dir,
            "; ".join(diffs),
            len(gone),
        )
    else:
        log.warning(
            "%s held a run of another config (%s); its folds train afresh",
            run_dir,
            "; ".join(diffs),
        )


def run_folds(
    cfg: PipelineConfig, job: JobContext, *, new_fold_runs: bool = True
) -> list[FoldResult]:
    """Train this job's folds (``fold_ids``); a fold that already finished under this job's
    identity is read back instead. Rank 0 stores each result as soon as its fold ends.

    ``new_fold_runs``: a reused fold gets a fresh MLflow fold run with its stored history
    (a whole job's new parent run); a fold job keeps the run its first training opened."""
    results = []
    for k in fold_ids(job.data, cfg.cv):
        stored = load_fold_result(job.run_dir, k, job.data)
        if stored is not None and stored.identity == job.identity:
            results.append(reuse_fold(job, stored, new_fold_runs))
            continue
        tr, va = fold_split(job.data, k)
        job.say(f"fold {k}: {len(tr)} train / {len(va)} validation images")
        log_fn = job.tracking.fold_logger(k)
        result = run_fold(cfg, job.data, k, job.run_dir, job.dist, log_fn, job.joint_ds)
        if job.dist.is_main:
            save_fold_result(job.run_dir, result, job.identity, job.tracking.fold_run_id(k))
        results.append(result)
    return results


def reuse_fold(job: JobContext, stored: StoredFold, new_fold_run: bool) -> FoldResult:
    """A finished fold's stored result, its history replayed into a new fold run if asked."""
    k = stored.result.fold
    job.say(f"fold {k}: finished earlier under this config; its stored result is reused")
    log_fn = job.tracking.fold_logger(k) if new_fold_run else None
    if log_fn is not None:
        for i, row in enumerate(stored.result.history):
            log_fn({key: v for key, v in row.items() if key != "epoch"}, int(row.get("epoch", i)))
    return stored.result


def resolve_job(
    cfg: PipelineConfig, manifest_path: str | Path | None, register_name: str | None
) -> str:
    """The manifest this job trains on (``--manifest`` wins over ``data.manifest``), written
    back into the config with ``--register``; ConfigError when there is none."""
    if cfg.strategy.name == "few_shot":  # the CLI gives the full `medtl fewshot` commands
        raise ConfigError(
            "strategy.name=few_shot is not trained by `medtl train` (k-fold CV over a handful of "
            "patients leaves folds without a patient of a class); use `medtl fewshot`"
        )
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


def _silent(*args: Any, **kwargs: Any) -> None:
    """The console of ranks other than 0, and of jobs run without one."""
