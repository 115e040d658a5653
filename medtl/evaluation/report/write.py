"""Writing a report's files: predictions, metrics, plots, then the sections rendered twice."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtl.config import PipelineConfig, load_config
from medtl.errors import MedtlError
from medtl.evaluation import plots
from medtl.evaluation.metrics import (
    evaluate_predictions,
    row_thresholds,
    targets_from_labels,
)
from medtl.evaluation.report.blocks import render_html, render_markdown
from medtl.evaluation.report.formatting import json_threshold
from medtl.evaluation.report.sections import (
    EVALUATION_SECTIONS,
    SECTIONS,
    ReportContext,
    Section,
    build_blocks,
)
from medtl.spreadsheet import read_csv, write_csv

OOF_FILENAME = "oof_predictions.csv"
UNCALIBRATED_PREFIX = "uncal_prob_"  # the model's probabilities before recalibration


@dataclass
class ReportPaths:
    """Files a report wrote."""

    out_dir: Path
    markdown: Path
    html: Path
    metrics: Path
    predictions: Path
    plots: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------- predictions
def _predictions_table(
    df: pd.DataFrame,
    classes: list[str],
    task: str,
    thresholds: Any,
    subgroups: Sequence[str],
    label_col: str,
    patient_col: str,
    extra_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per image with ``pred`` recomputed from the thresholds (so it always agrees)."""
    for col in ("image", label_col, patient_col):
        if col not in df.columns:
            raise MedtlError(f"prediction table lacks column '{col}'; it has {list(df.columns)}")
    probs = df[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    if task == "multiclass":
        pred = [classes[i] for i in probs.argmax(1)]
    else:
        T = row_thresholds(df, thresholds, len(classes), task)
        if task == "binary":
            pred = np.where(probs[:, 1] >= T[:, 1], classes[1], classes[0]).tolist()
        else:
            hits = probs >= T
            pred = ["|".join(c for c, h in zip(classes, row, strict=True) if h) for row in hits]
    out = pd.DataFrame(
        {
            "image": df["image"].astype(str).to_numpy(),
            "patient_id": df[patient_col].astype(str).to_numpy(),
            "fold": df["fold"].astype(int).to_numpy() if "fold" in df.columns else -1,
            "label": df[label_col].fillna("").astype(str).to_numpy(),
        }
    )
    for i, c in enumerate(classes):
        out[f"prob_{c}"] = probs[:, i]
    out["pred"] = pred
    for col in [*subgroups, *extra_columns]:
        if col in df.columns and col not in out.columns:
            out[col] = df[col].to_numpy()
    for col in df.columns:  # the model's own probabilities, when these were recalibrated
        if col.startswith(UNCALIBRATED_PREFIX):
            out[col] = df[col].to_numpy(dtype=float)
    return out


def _read_predictions(path: Path) -> pd.DataFrame:
    """A written prediction table, identifiers and labels kept as text (as they were written)."""
    head = read_csv(path, nrows=0).columns
    numeric = ("prob_", UNCALIBRATED_PREFIX)
    text_cols = {c: str for c in head if not c.startswith(numeric) and c != "fold"}
    return read_csv(path, dtype=text_cols, keep_default_na=False)


# ----------------------------------------------------------------------------- plots
def _write_plots(
    out_dir: Path, pred: pd.DataFrame, classes: list[str], task: str, metrics: Mapping[str, Any]
) -> dict[str, Path]:
    """ROC, PR (per fold and pooled), reliability and confusion plots under ``plots/``."""
    Y = targets_from_labels(pred["label"], classes, task)
    P = pred[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    cols = [1] if task == "binary" else list(range(len(classes)))
    folds = sorted(set(pred["fold"].astype(int)) - {-1})
    fold_ids = pred["fold"].astype(int).to_numpy()
    panels = {}
    for c in cols:
        series = {f"fold {k}": (Y[fold_ids == k, c], P[fold_ids == k, c]) for k in folds}
        series["pooled"] = (Y[:, c], P[:, c])
        panels[classes[c]] = series
    pdir = out_dir / "plots"
    paths = {
        "roc": plots.plot_roc(panels, pdir / "roc.png"),
        "pr": plots.plot_pr(panels, pdir / "pr.png"),
        "reliability": plots.plot_reliability(metrics["calibration"], pdir / "reliability.png"),
    }
    if "recalibration" in metrics:
        before = metrics["recalibration"]["calibration_before"]
        paths["reliability_before"] = plots.plot_reliability(
            before, pdir / "reliability_before.png"
        )
    pooled = metrics["pooled"]
    if task == "multiclass":
        conf = {"top class (argmax)": (pooled["confusion"], classes)}
    else:
        conf = {}
        for name, pc in pooled["per_class"].items():
            k = pc["counts"]
            neg = "other" if task == "multilabel" else classes[0]
            conf[name] = (
                [[k["tn"], k["fp"]], [k["fn"], k["tp"]]],
                [f"not {name}" if task == "multilabel" else neg, name],
            )
    paths["confusion"] = plots.plot_confusion(conf, pdir / "confusion.png")
    return paths


# ----------------------------------------------------------------------------- extra metrics
def _add_levels_and_recalibration(
    metrics: dict[str, Any],
    pred: pd.DataFrame,
    classes: list[str],
    task: str,
    thresholds: Any,
    cfg: PipelineConfig,
) -> None:
    """``metrics["levels"]``: the same evaluation per study and per patient;
    ``metrics["recalibration"]``: the model's own probabilities evaluated too, when these
    were recalibrated (ECE, Brier and reliability before and after)."""
    from medtl.evaluation.levels import aggregate_predictions, level_columns

    metrics["levels"] = {}
    for level, col in level_columns(pred, cfg.data.study_column).items():
        agg = aggregate_predictions(
            pred, col, classes, task, cfg.evaluation.aggregate, cfg.evaluation.subgroups
        )
        metrics["levels"][level] = evaluate_predictions(agg, classes, task, thresholds, cfg)
        metrics["levels"][level]["aggregate"] = cfg.evaluation.aggregate
    raw_cols = [f"{UNCALIBRATED_PREFIX}{c}" for c in classes]
    if not all(c in pred.columns for c in raw_cols):
        return
    raw = pred.drop(columns=[f"prob_{c}" for c in classes]).rename(
        columns={r: f"prob_{c}" for r, c in zip(raw_cols, classes, strict=True)}
    )
    before = evaluate_predictions(raw, classes, task, thresholds, cfg)
    keep = ("ece", "brier")
    metrics["recalibration"] = {
        "before": {k: before["pooled"]["summary"][k] for k in keep},
        "after": {k: metrics["pooled"]["summary"][k] for k in keep},
        "calibration_before": before["calibration"],
    }


# ----------------------------------------------------------------------------- entry points
def _write_all(
    ctx: ReportContext, sections: Sequence[Section], predictions_name: str
) -> ReportPaths:
    """Write predictions, metrics.json and plots, then the sections as report.md and .html."""
    out_dir = ctx.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / predictions_name
    write_csv(ctx.pred, pred_path)  # text cells cannot run as spreadsheet formulas
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(ctx.metrics, indent=2, allow_nan=False) + "\n")
    plot_paths = _write_plots(out_dir, ctx.pred, ctx.classes, ctx.task, ctx.metrics)
    blocks = build_blocks(replace(ctx, plots=plot_paths), sections)
    md_path = out_dir / "report.md"
    md_path.write_text(render_markdown(blocks))
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(blocks, out_dir, ctx.title))
    return ReportPaths(out_dir, md_path, html_path, metrics_path, pred_path, plot_paths)


def _quarantine_list(quarantine: Any) -> list[Mapping[str, Any]]:
    """Quarantine records as ``{"path", "reason"}`` mappings, whatever form they came in."""
    if quarantine is None:
        return []
    if isinstance(quarantine, pd.DataFrame):
        return [
            {str(k): v for k, v in row.items()} for row in quarantine.astype(str).to_dict("records")
        ]
    return [
        q
        if isinstance(q, Mapping)
        else {"path": getattr(q, "path", str(q)), "reason": getattr(q, "reason", "")}
        for q in quarantine
    ]


def write_report(
    out_dir: str | Path,
    *,
    oof: pd.DataFrame,
    classes: Sequence[str],
    task: str,
    fold_thresholds: Mapping[Any, float | list[float]],
    cfg: PipelineConfig,
    data_summary: Mapping[str, Any] | None = None,
    quarantine: list[dict[str, Any]] | pd.DataFrame | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> ReportPaths:
    """Write the cross-validation report of a run (see the package docstring for the files).

    ``oof``: one row per validation image with image, patient_id, fold, label, prob_<class>.
    ``fold_thresholds``: ``{fold: float}`` (binary) or ``{fold: [per class]}``.
    """
    classes = [str(c) for c in classes]
    run_info = dict(run_info or {})
    thresholds = {int(k): v for k, v in fold_thresholds.items()}
    if "fold" not in oof.columns:
        raise MedtlError(
            "the out-of-fold table needs a 'fold' column; use write_evaluation_report for held-out data"
        )
    subgroups = list(cfg.evaluation.subgroups)
    pred = _predictions_table(
        oof, classes, task, thresholds, subgroups, "label", "patient_id", [cfg.data.study_column]
    )
    metrics = evaluate_predictions(pred, classes, task, thresholds, cfg)
    _add_levels_and_recalibration(metrics, pred, classes, task, thresholds, cfg)
    metrics["thresholds"] = {
        "method": cfg.cv.threshold,
        "target_sensitivity": cfg.cv.target_sensitivity
        if cfg.cv.threshold == "sensitivity"
        else None,
        "per_fold": {str(k): json_threshold(v) for k, v in sorted(thresholds.items())},
        "final": json_threshold(run_info.get("final_threshold")),
    }
    metrics["config_identity"] = cfg.identity()
    if run_info.get("target"):  # domain adaptation: the target site before and after
        metrics["target"] = run_info["target"]
    ctx = ReportContext(
        out_dir=Path(out_dir),
        title=f"medtl report: {cfg.name}",
        metrics=metrics,
        pred=pred,
        classes=classes,
        task=task,
        cfg=cfg,
        thresholds=thresholds,
        run_info=run_info,
        data_summary=data_summary or {},
        quarantine=_quarantine_list(quarantine),
    )
    return _write_all(ctx, SECTIONS, OOF_FILENAME)


def write_evaluation_report(
    out_dir: str | Path,
    preds_df: pd.DataFrame,
    classes: Sequence[str],
    task: str,
    threshold: float | list[float],
    cfg: PipelineConfig,
    info: Mapping[str, Any] | None = None,
    quarantine: Sequence[Mapping[str, Any]] = (),
) -> ReportPaths:
    """Report of one trained model on held-out data (same metrics and files, no folds;
    predictions go to ``predictions.csv``, the unreadable inputs ``quarantine``, path and
    reason, to the report's quarantine section). Labels/patients are read from ``label`` /
    ``patient_id`` or else the config's column names."""
    classes = [str(c) for c in classes]
    df = preds_df.copy()
    label_col = "label" if "label" in df.columns else cfg.data.label_column
    patient_col = "patient_id" if "patient_id" in df.columns else cfg.data.patient_column
    if label_col in df.columns and df[label_col].isna().all():
        raise MedtlError("held-out evaluation needs labels, but the label column is empty")
    if label_col in df.columns and task != "multilabel" and df[label_col].isna().any():
        raise MedtlError(
            f"{int(df[label_col].isna().sum())} held-out row(s) have no label; drop or label them"
        )
    if task == "multilabel" and label_col in df.columns and cfg.data.label_separator != "|":
        df[label_col] = (
            df[label_col].fillna("").astype(str).str.replace(cfg.data.label_separator, "|")
        )
    df["fold"] = -1
    subgroups = list(cfg.evaluation.subgroups)
    pred = _predictions_table(df, classes, task, threshold, subgroups, label_col, patient_col)
    metrics = evaluate_predictions(pred, classes, task, threshold, cfg)
    metrics["thresholds"] = {
        "method": "fixed (the model's operating threshold)",
        "final": json_threshold(threshold),
    }
    metrics["config_identity"] = cfg.identity()
    ctx = ReportContext(
        out_dir=Path(out_dir),
        title=f"medtl evaluation: {cfg.name}",
        metrics=metrics,
        pred=pred,
        classes=classes,
        task=task,
        cfg=cfg,
        thresholds=threshold,
        quarantine=list(quarantine),
        run_info=dict(info or {}),
    )
    return _write_all(ctx, EVALUATION_SECTIONS, "predictions.csv")


def regenerate_report(run_dir: str | Path) -> ReportPaths:
    """Rebuild a run's report from ``oof_predictions.csv``, ``config.yaml`` and ``run_info.json``."""
    run_dir = Path(run_dir)
    needed = [run_dir / OOF_FILENAME, run_dir / "config.yaml", run_dir / "run_info.json"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise MedtlError(
            f"cannot regenerate the report: {run_dir} lacks {missing} (is it a `medtl train` run folder?)"
        )
    info = json.loads((run_dir / "run_info.json").read_text())
    absent = [k for k in ("classes", "task", "fold_thresholds") if k not in info]
    if absent:
        raise MedtlError(
            f"{run_dir / 'run_info.json'} lacks key(s) {absent}; see medtl.evaluation.report"
        )
    cfg = load_config(run_dir / "config.yaml")
    oof = _read_predictions(run_dir / OOF_FILENAME)
    return write_report(
        run_dir,
        oof=oof,
        classes=info["classes"],
        task=info["task"],
        fold_thresholds=info["fold_thresholds"],
        cfg=cfg,
        data_summary=info.get("data_summary") or {},
        quarantine=info.get("quarantine") or [],
        run_info=info,
    )
