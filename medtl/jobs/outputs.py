"""Output stages of `medtl train`: the run folder's inputs (config, splits, quarantine), the
report of the pooled folds, the model bundle and the held-out test report."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import nn

from medtl.config import PipelineConfig
from medtl.jobs.folds import FoldResult
from medtl.jobs.pooling import PooledResult, oof_frame
from medtl.jobs.prepare import TrainData
from medtl.jobs.tracking import headline

# Where each fold's threshold came from, when more than one fold ran (see build_run_info).
THRESHOLD_SOURCE = (
    "the other folds' predictions (never on the fold it is applied to); the "
    "deployed model's threshold on all pooled out-of-fold predictions"
)


def write_job_inputs(run_dir: Path, cfg: PipelineConfig, data: TrainData) -> None:
    """The resolved config, the fold assignments and the quarantine list, before training."""
    from medtl.cv import save_splits
    from medtl.data import write_quarantine

    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    save_splits(
        data.split_df,
        run_dir / "fold_assignments.csv",
        label_col=cfg.data.label_column,
        patient_col=cfg.data.patient_column,
    )
    write_quarantine(data.quarantine, run_dir / "quarantine.csv")


def build_run_info(
    cfg: PipelineConfig,
    data: TrainData,
    folds: Sequence[FoldResult],
    pooled: PooledResult,
    final_epochs: int,
    lineage: Mapping[str, str],
    tracking_ids: Mapping[str, str | None],
) -> dict[str, Any]:
    """``run_info.json``: what the report and `medtl report` read besides the predictions."""
    return {
        "name": cfg.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": data.classes,
        "task": data.task,
        "fold_thresholds": {str(k): v for k, v in pooled.fold_thresholds.items()},
        "final_threshold": pooled.threshold,
        "threshold_method": cfg.cv.threshold,
        # None (one fold run): the report's default source, and its optimism note, apply.
        "threshold_source": THRESHOLD_SOURCE if len(folds) > 1 else None,
        "best_epochs": [r.epochs_to_best for r in folds],
        "final_epochs": final_epochs,
        "data_summary": data.validation.summary,
        "manifest_hash": data.manifest_hash,
        "quarantine": [{"path": q.path, "reason": q.reason} for q in data.quarantine],
        "lineage": dict(lineage),
        "weights": data.transforms.weights_info,
        "subgroups": data.subgroups,
        "mlflow": dict(tracking_ids),
    }


def write_cv_report(
    run_dir: Path,
    cfg: PipelineConfig,
    data: TrainData,
    pooled: PooledResult,
    run_info: Mapping[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """``run_info.json`` and the report of the pooled folds; returns its paths and metrics."""
    from medtl.evaluation.report import write_report

    (run_dir / "run_info.json").write_text(json.dumps(run_info, indent=2, default=str))
    paths = write_report(
        run_dir,
        oof=pooled.oof,
        classes=data.classes,
        task=data.task,
        fold_thresholds=pooled.fold_thresholds,
        cfg=cfg,
        data_summary=data.validation.summary,
        quarantine=run_info["quarantine"],
        run_info=run_info,
    )
    return paths, json.loads((run_dir / "metrics.json").read_text())


def save_model(
    run_dir: Path,
    model: nn.Module,
    cfg: PipelineConfig,
    data: TrainData,
    threshold: Any,
    lineage: Mapping[str, str],
    metrics: Mapping[str, Any],
) -> Path:
    """The final model as a bundle under ``run_dir/model`` with its pooled headline metrics."""
    from medtl.bundle import save_bundle

    bundle_dir = run_dir / "model"
    pooled = headline(metrics.get("pooled", {}))
    save_bundle(bundle_dir, model, cfg, data.classes, data.task, threshold, lineage, pooled)
    return bundle_dir


def held_out_report(
    run_dir: Path, model: nn.Module, cfg: PipelineConfig, data: TrainData, threshold: Any
) -> None:
    """The final model scored once on the held-out test patients, into ``run_dir/test``."""
    from medtl.data import build_dataset
    from medtl.evaluation.report import write_evaluation_report
    from medtl.training import predict_proba

    ds = build_dataset(data.test, data.transforms.eval, data.cache_dir, cfg.data.cache)
    probs = predict_proba(model, ds, cfg)
    df = oof_frame(data.test, probs, -1, data.classes, data.task, cfg.evaluation.subgroups)
    source = {"source": "held-out test split"}
    write_evaluation_report(run_dir / "test", df, data.classes, data.task, threshold, cfg, source)
