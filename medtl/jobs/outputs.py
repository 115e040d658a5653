"""Output stages of `medtl train`: the run folder's inputs (config, splits, quarantine), the
report of the pooled folds, the model bundle and the held-out test report."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medtl.config import CVConfig, PipelineConfig
from medtl.evaluation.calibrators import apply_calibration, resolve_method
from medtl.jobs.folds import FoldResult
from medtl.jobs.pooling import PooledResult, oof_frame
from medtl.jobs.prepare import TrainData
from medtl.jobs.refit import Refit
from medtl.jobs.selection import OperatingPoint, rule_text
from medtl.jobs.tracking import headline
from medtl.models.model import MedtlModel

# Where each fold's threshold came from under cv.selection=outer, when more than one fold ran.
OUTER_THRESHOLD_SOURCE = (
    "the other folds' predictions (never on the fold it is applied to); the "
    "deployed model's threshold on all pooled out-of-fold predictions"
)
INNER_THRESHOLD_SOURCE = (
    "each fold model's own inner validation patients (part of its training patients, never "
    "the fold it is reported on), on calibrated probabilities; the deployed model's on its own "
    "inner validation patients"
)


def threshold_source(cv: CVConfig, n_folds: int) -> str | None:
    """What chose the thresholds; None (one fold run under outer) lets the report's default
    source, and its optimism note, apply."""
    if cv.selection != "outer":
        return INNER_THRESHOLD_SOURCE
    return OUTER_THRESHOLD_SOURCE if n_folds > 1 else None


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
    refit: Refit,
    deployed: OperatingPoint,
    lineage: Mapping[str, str],
    tracking_ids: Mapping[str, str | None],
) -> dict[str, Any]:
    """``run_info.json``: what the report and `medtl report` read besides the predictions."""
    method = resolve_method(cfg.evaluation.calibration, data.task)
    return {
        "name": cfg.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": data.classes,
        "task": data.task,
        "fold_thresholds": {str(k): v for k, v in pooled.fold_thresholds.items()},
        "final_threshold": deployed.threshold,
        "threshold_method": cfg.cv.threshold,
        "threshold_source": threshold_source(cfg.cv, len(folds)),
        "selection": cfg.cv.selection,
        "selection_rule": rule_text(cfg.cv, cfg.train.epochs),
        "calibration": {
            "method": method,
            "folds": {str(k): p.calibration.to_dict() for k, p in pooled.fold_points.items()},
            "deployed": deployed.calibration.to_dict(),
        },
        "operating_point_notes": {
            **{str(k): p.note for k, p in pooled.fold_points.items() if p.note},
            **({"deployed": deployed.note} if deployed.note else {}),
        },
        "best_epochs": [r.epochs_to_best for r in folds],
        "final_epochs": refit.epochs,
        "data_summary": data.validation.summary,
        "manifest_hash": data.manifest_hash,
        "quarantine": [{"path": q.path, "reason": q.reason} for q in data.quarantine],
        "quarantine_breakdown": data.quarantine_breakdown,
        "n_images_listed": len(data.records) + len(data.quarantine),
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
    """The case gallery, ``run_info.json`` and the report of the pooled folds; returns the
    report's paths and metrics."""
    from medtl.evaluation.gallery import write_gallery
    from medtl.evaluation.report import write_report

    per_cell = cfg.evaluation.gallery_per_cell
    gallery = write_gallery(run_dir, cfg, data, pooled.oof, per_cell, pooled.fold_thresholds)
    run_info = {**run_info, "gallery": gallery}
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
    model: MedtlModel,
    cfg: PipelineConfig,
    data: TrainData,
    deployed: OperatingPoint,
    lineage: Mapping[str, str],
    metrics: Mapping[str, Any],
) -> Path:
    """The final model as a bundle under ``run_dir/model``: its calibrator, threshold,
    pooled headline metrics and the training images' input profile (intended-use guard)."""
    from medtl.bundle import save_bundle
    from medtl.evaluation.leakage import optional_salt, training_fingerprint
    from medtl.intended_use import training_profile

    bundle_dir = run_dir / "model"
    save_bundle(
        bundle_dir,
        model,
        cfg,
        data.classes,
        data.task,
        deployed.threshold,
        lineage,
        headline(metrics.get("pooled", {})),
        calibration=deployed.calibration.to_dict(),
        # Salted hashes of the training patients and pixels: `medtl evaluate` refuses overlap.
        training_set=training_fingerprint(data.train_pool, optional_salt()),
        # Modality, body part, view, photometric, sizes: `medtl predict` flags inputs outside.
        input_profile=training_profile(r["image"] for r in data.train_pool),
    )
    return bundle_dir


def held_out_report(
    run_dir: Path, model: MedtlModel, cfg: PipelineConfig, data: TrainData, deployed: OperatingPoint
) -> None:
    """The final model (calibrated as deployed) scored once on the held-out test patients,
    into ``run_dir/test``."""
    from medtl.data import build_dataset
    from medtl.evaluation.report import write_evaluation_report
    from medtl.training import predict_proba

    ds = build_dataset(data.test, data.transforms.eval, data.cache_dir, cfg.data.cache)
    raw = predict_proba(model, ds, cfg)
    recalibrated = deployed.calibration.method != "none"
    probs = apply_calibration(deployed.calibration, raw, data.task) if recalibrated else raw
    df = oof_frame(
        data.test,
        probs,
        -1,
        data.classes,
        data.task,
        cfg.evaluation.subgroups,
        raw if recalibrated else None,
    )
    source = {"source": "held-out test split"}
    write_evaluation_report(
        run_dir / "test", df, data.classes, data.task, deployed.threshold, cfg, source
    )
