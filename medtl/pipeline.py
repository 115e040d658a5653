"""The `medtl train` job: manifest -> splits -> per-fold training -> report -> model -> MLflow.

This module only wires the stages together; each stage's logic lives in its own module
(see docs/architecture.md). Under `torchrun` every rank runs this job; only rank 0 writes
files and talks to MLflow.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtl.config import PipelineConfig
from medtl.errors import ConfigError, ManifestError

log = logging.getLogger("medtl")


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


def default_run_dir(cfg: PipelineConfig, root: str | Path = "runs") -> Path:
    """A new timestamped folder under ``runs/`` named after the pipeline."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{cfg.name}-{stamp}"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU runs are reproducible."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resolve_task(cfg: PipelineConfig, records: list[dict], classes: list[str]) -> str:
    if cfg.data.task != "auto":
        return cfg.data.task
    first = records[0]["label"] if records else 0
    if isinstance(first, list | tuple | np.ndarray):
        return "multilabel"
    return "binary" if len(classes) == 2 else "multiclass"


def _cache_dir(cfg: PipelineConfig, run_dir: Path) -> Path:
    import os

    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    env = os.environ.get("MEDTL_CACHE_DIR")
    if env:
        return Path(env)
    # Shared by all runs under the same parent folder, so a second run reuses decoded images.
    return run_dir.parent / ".cache"


def _prepare(
    records: list[dict], transforms: Any, cache_dir: Path, cfg: PipelineConfig, dist: Any
) -> tuple[list[dict], list[Any]]:
    """Decode every image once into the cache and quarantine unreadable ones.

    Under torchrun each rank decodes only its share (records[rank::world]); the quarantine
    lists are then gathered so every rank drops the same files and the bad-file limit applies
    to the whole manifest.
    """
    from medtl.data import check_bad_fraction, prepare_records

    if dist.world_size == 1:
        prepared = prepare_records(
            records,
            transforms,
            cache_dir,
            cfg.data.max_bad_fraction,
            progress=cfg.train.progress,
            cache=cfg.data.cache,
        )
        return prepared.records, list(prepared.quarantine)
    import torch.distributed as tdist

    share = records[dist.rank :: dist.world_size]
    mine = prepare_records(share, transforms, cache_dir, 1.0, progress=False, cache=cfg.data.cache)
    parts: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(parts, [(q.path, q.reason) for q in mine.quarantine])
    from medtl.data import QuarantineEntry

    quarantine = [QuarantineEntry(p, r) for part in parts for p, r in part]
    check_bad_fraction(quarantine, len(records), cfg.data.max_bad_fraction)
    bad = {q.path for q in quarantine}
    return [r for r in records if str(r["image"]) not in bad], quarantine


def _label_names(label: Any, classes: list[str], task: str) -> str:
    if task == "multilabel":
        return "|".join(c for c, v in zip(classes, label, strict=True) if v)
    return classes[int(label)]


def _thresholds(y: np.ndarray, probs: np.ndarray, task: str, cfg: PipelineConfig) -> Any:
    """Operating threshold(s) chosen on held-out predictions, as the config asks."""
    from medtl.cv import choose_thresholds

    return choose_thresholds(y, probs, task, cfg.cv.threshold, cfg.cv.target_sensitivity)


def _oof_frame(
    records: list[dict],
    probs: np.ndarray,
    fold: int,
    classes: list[str],
    task: str,
    extra_cols: list[str],
) -> pd.DataFrame:
    """Out-of-fold rows for the report (which derives ``pred`` from the thresholds itself)."""
    rows = {
        "image": [r["image_rel"] for r in records],
        "patient_id": [r["patient_id"] for r in records],
        "fold": fold,
        "label": [_label_names(r["label"], classes, task) for r in records],
    }
    for i, c in enumerate(classes):
        rows[f"prob_{c}"] = probs[:, i]
    for col in extra_cols:
        rows[col] = [r.get(col) for r in records]
    return pd.DataFrame(rows)


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
    from medtl.training.distributed import init_distributed

    dist = init_distributed()
    is_main = dist.is_main
    manifest_path = manifest_path or cfg.data.manifest
    if not manifest_path:
        raise ConfigError(
            "no manifest given: pass --manifest M.csv or set data.manifest in the pipeline"
        )
    cfg.data.manifest = str(manifest_path)
    if register_name:
        cfg.tracking.register_name = register_name

    from medtl.cv import make_splits, save_splits
    from medtl.data import build_dataset, records_from_manifest, write_quarantine
    from medtl.manifest import read_manifest, validate_manifest
    from medtl.models import create_model
    from medtl.training import fit
    from medtl.transforms import build_transforms

    seed_everything(cfg.seed)
    run_dir = Path(out_dir) if out_dir else default_run_dir(cfg)
    if dist.world_size > 1 and not out_dir:
        raise ConfigError("under torchrun pass --out DIR so every rank writes to the same run")
    run_dir.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None and is_main else (lambda *a, **k: None)

    # 1. Data: validate up front (fast checks), then records and splits.
    manifest = read_manifest(
        manifest_path, label_column=cfg.data.label_column, patient_column=cfg.data.patient_column
    )
    report = validate_manifest(manifest, deep=False, classes=cfg.data.classes)
    if not report.ok:
        raise ManifestError(
            f"manifest {manifest_path} has {len(report.errors)} error(s): "
            + "; ".join(str(e) for e in report.errors[:5])
            + " (run `medtl manifest validate` for the full list)"
        )
    for w in report.warnings:
        log.warning("manifest: %s", w)
    missing_sub = [c for c in cfg.evaluation.subgroups if c not in manifest.df.columns]
    if missing_sub:
        log.warning("subgroup column(s) %s not in the manifest; skipped", missing_sub)
    subgroups = [c for c in cfg.evaluation.subgroups if c in manifest.df.columns]

    records, classes = records_from_manifest(manifest, cfg)
    task = _resolve_task(cfg, records, classes)
    cfg.data.task = task
    cfg.data.classes = list(classes)

    split_df = make_splits(
        manifest.df,
        cfg.cv,
        label_col=cfg.data.label_column,
        patient_col=cfg.data.patient_column,
        seed=cfg.seed,
    )
    # Whole columns once; a per-record .iloc builds a pandas Series each time.
    fold_of, split_of = split_df["fold"].to_numpy(), split_df["split"].to_numpy()
    image_of = manifest.df["image"].to_numpy()
    subgroup_of = {col: manifest.df[col].to_numpy() for col in subgroups}
    for r in records:
        i = r["row"]
        r["fold"] = int(fold_of[i])
        r["split"] = str(split_of[i])
        r["image_rel"] = str(image_of[i])
        for col, values in subgroup_of.items():
            r[col] = None if pd.isna(values[i]) else str(values[i])

    # 2. Preprocessing derived from the backbone's weights contract; decode once into the cache.
    # Building the model here also fails fast on missing weights, before any decoding.
    num_classes = len(classes)
    probe_model = create_model(cfg.model, num_classes, spatial_dims=cfg.spatial_dims)
    weights_info = dict(probe_model.weights_info)
    preprocess = probe_model.preprocess
    del probe_model
    tr_train = build_transforms(
        cfg.transforms, preprocess, cfg.model.in_channels, cfg.model.channel_adapt, train=True
    )
    tr_eval = build_transforms(
        cfg.transforms, preprocess, cfg.model.in_channels, cfg.model.channel_adapt, train=False
    )
    cache_dir = _cache_dir(cfg, run_dir)
    cfg.data.cache_dir = str(cache_dir)  # the feature cache of every fold and the refit lives here
    say(f"[bold]medtl train[/bold] {cfg.name}: {len(records)} images, classes {classes} ({task})")
    records, quarantine = _prepare(records, tr_eval, cache_dir, cfg, dist)
    if quarantine:
        say(
            f"[yellow]{len(quarantine)} unreadable file(s) quarantined[/yellow] (see quarantine.csv)"
        )

    tracker = None
    lineage: dict[str, str] = {}
    if is_main:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        save_splits(
            split_df,
            run_dir / "fold_assignments.csv",
            label_col=cfg.data.label_column,
            patient_col=cfg.data.patient_column,
        )
        write_quarantine(quarantine, run_dir / "quarantine.csv")
        from medtl.tracking.lineage import collect_lineage

        lineage = collect_lineage(cfg, report.content_hash, report.summary, weights_info)
        if cfg.tracking.enabled:
            from medtl.tracking.runs import TrainTracker

            tracker = TrainTracker(cfg.tracking, cfg, lineage)
            tracker.start()
            tracker.log_dataset(report.content_hash, report.summary)
            say(f"MLflow run {tracker.parent_run_id} at {tracker.tracking_uri}")

    # 3. Cross-validation.
    train_pool = [r for r in records if r["split"] != "test"]
    folds = sorted({r["fold"] for r in train_pool if r["fold"] >= 0})
    if cfg.cv.only_folds is not None:
        folds = [k for k in folds if k in cfg.cv.only_folds]
    oof_parts: list[pd.DataFrame] = []
    fold_thresholds: dict[int, Any] = {}
    fold_outputs: dict[int, tuple[list[dict], np.ndarray]] = {}
    fold_runs: dict[int, Any] = {}
    best_epochs: list[int] = []
    status = "FAILED"
    try:
        for k in folds:
            tr = [r for r in train_pool if r["fold"] != k]
            va = [r for r in train_pool if r["fold"] == k]
            say(f"fold {k}: {len(tr)} train / {len(va)} validation images")
            seed_everything(cfg.seed + k)
            model = create_model(cfg.model, num_classes, spatial_dims=cfg.spatial_dims)
            train_ds = build_dataset(tr, tr_train, cache_dir, cfg.data.cache)
            val_ds = build_dataset(va, tr_eval, cache_dir, cfg.data.cache)
            fold_run = tracker.fold_run(k) if tracker else None
            result = fit(
                cfg,
                model,
                train_ds,
                val_ds,
                workdir=run_dir / "folds" / f"fold_{k}",
                log_fn=fold_run.log_epoch if fold_run else None,
                dist=dist,
            )
            best_epochs.append(int(result.best_epoch) + 1)  # epochs trained up to the best one
            if not is_main:
                continue
            fold_outputs[k] = (va, result.val_probs)
            pd.DataFrame(result.history).to_csv(
                run_dir / "folds" / f"fold_{k}" / "history.csv", index=False
            )
            if fold_run:
                fold_runs[k] = fold_run

        # Thresholds: each fold's operating point is chosen on the OTHER folds' out-of-fold
        # predictions, so the sensitivity/specificity reported for a fold are not tuned on it.
        if is_main:
            for k, (va, probs) in fold_outputs.items():
                others = [fold_outputs[j] for j in fold_outputs if j != k]
                if others:
                    y_o = np.concatenate([np.asarray([r["label"] for r in v]) for v, _ in others])
                    p_o = np.concatenate([p for _, p in others])
                    thr = _thresholds(y_o, p_o, task, cfg)
                else:  # a single fold was run (cv.only_folds): nothing else to tune on
                    thr = _thresholds(np.asarray([r["label"] for r in va]), probs, task, cfg)
                fold_thresholds[k] = thr
                oof_parts.append(_oof_frame(va, probs, k, classes, task, subgroups))

        # 4. Final model: refit on every non-test patient by the same procedure.
        final_epochs = max(1, int(statistics.median(best_epochs))) if best_epochs else 1
        final_cfg = cfg.model_copy(deep=True)
        final_cfg.train.epochs = final_epochs
        final_cfg.train.early_stopping_patience = None
        say(f"final model: refit on {len(train_pool)} images for {final_epochs} epoch(s)")
        seed_everything(cfg.seed)
        final_model = create_model(cfg.model, num_classes, spatial_dims=cfg.spatial_dims)
        final = fit(
            final_cfg,
            final_model,
            build_dataset(train_pool, tr_train, cache_dir, cfg.data.cache),
            None,
            workdir=run_dir / "final",
            log_fn=None,
            dist=dist,
        )
        outcome = TrainOutcome(run_dir=run_dir, n_quarantined=len(quarantine))
        if not is_main:
            status = "FINISHED"
            return outcome

        if fold_outputs:
            y_all = np.concatenate(
                [np.asarray([r["label"] for r in v]) for v, _ in fold_outputs.values()]
            )
            p_all = np.concatenate([p for _, p in fold_outputs.values()])
            threshold = _thresholds(y_all, p_all, task, cfg)
        else:
            threshold = 0.5
        oof = pd.concat(oof_parts, ignore_index=True) if oof_parts else pd.DataFrame()
        data_summary = report.summary
        run_info = {
            "name": cfg.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "classes": classes,
            "task": task,
            "fold_thresholds": {str(k): v for k, v in fold_thresholds.items()},
            "final_threshold": threshold,
            "threshold_method": cfg.cv.threshold,
            # None (one fold run): the report's default source, and its optimism note, apply.
            "threshold_source": (
                "the other folds' predictions (never on the fold it is applied to); the "
                "deployed model's threshold on all pooled out-of-fold predictions"
                if len(fold_outputs) > 1
                else None
            ),
            "best_epochs": best_epochs,
            "final_epochs": final_epochs,
            "data_summary": data_summary,
            "manifest_hash": report.content_hash,
            "quarantine": [{"path": q.path, "reason": q.reason} for q in quarantine],
            "lineage": lineage,
            "weights": weights_info,
            "subgroups": subgroups,
            "mlflow": {
                "tracking_uri": tracker.tracking_uri if tracker else None,
                "parent_run_id": tracker.parent_run_id if tracker else None,
            },
        }
        (run_dir / "run_info.json").write_text(json.dumps(run_info, indent=2, default=str))

        from medtl.evaluation.report import write_report

        paths = write_report(
            run_dir,
            oof=oof,
            classes=classes,
            task=task,
            fold_thresholds=fold_thresholds,
            cfg=cfg,
            data_summary=data_summary,
            quarantine=run_info["quarantine"],
            run_info=run_info,
        )
        metrics = json.loads((run_dir / "metrics.json").read_text())
        # Fold runs get the report's own per-fold metrics (no second evaluation here).
        for k, fold_run in fold_runs.items():
            fold_run.log_metrics(_headline(metrics.get("folds", {}).get(str(k), {})))
            fold_run.end()

        from medtl.bundle import save_bundle

        bundle_dir = run_dir / "model"
        save_bundle(
            bundle_dir,
            final.model,
            cfg,
            classes,
            task,
            threshold,
            lineage,
            metrics=_headline(metrics.get("pooled", {})),
        )
        outcome.report_html = paths.html
        outcome.report_md = paths.markdown
        outcome.metrics = metrics
        outcome.bundle_dir = bundle_dir

        # Held-out test patients: the final model's report on data it never saw.
        test = [r for r in records if r["split"] == "test"]
        if test:
            _held_out_report(
                run_dir, final.model, test, tr_eval, cache_dir, cfg, classes, task, threshold
            )

        if tracker:
            tracker.log_metrics(_headline(metrics.get("pooled", {})))
            tracker.log_artifacts(run_dir)
            example = oof[["image"]].head(2) if len(oof) else None
            outcome.model_uri = tracker.log_model(bundle_dir, example)
            outcome.tracking_uri = tracker.tracking_uri
            outcome.parent_run_id = tracker.parent_run_id
            if cfg.tracking.register_name:
                from medtl.tracking.registry import register

                outcome.registered = register(
                    tracker.parent_run_id, cfg.tracking.register_name, cfg.tracking
                )
        status = "FINISHED"
        return outcome
    finally:
        if tracker:
            tracker.end(status)
        if dist.world_size > 1:
            dist.barrier()


def _headline(block: dict[str, Any]) -> dict[str, float]:
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


def _held_out_report(
    run_dir, model, test, tr_eval, cache_dir, cfg, classes, task, threshold
) -> None:
    from medtl.data import build_dataset
    from medtl.evaluation.report import write_evaluation_report
    from medtl.training import predict_proba

    ds = build_dataset(test, tr_eval, cache_dir, cfg.data.cache)
    probs = predict_proba(model, ds, cfg)
    df = _oof_frame(test, probs, -1, classes, task, cfg.evaluation.subgroups)
    write_evaluation_report(
        run_dir / "test", df, classes, task, threshold, cfg, {"source": "held-out test split"}
    )
