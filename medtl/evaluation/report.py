"""Clinical report of a run: ``report.md``, a self-contained ``report.html``, ``metrics.json``,
``oof_predictions.csv`` and ``plots/*.png``.

The report is built once as a list of blocks (heading, paragraph, table, image, list) and
rendered twice: Markdown linking ``plots/*.png``, and HTML with the same plots embedded as
base64 PNG data URIs, inline CSS and no external links or scripts (it opens offline and can be
attached to an e-mail). Only counts describe the data; no identifier appears in the report
(quarantined files are listed by the path the manifest gave).

``regenerate_report(run_dir)`` rebuilds everything from the run folder:

- ``oof_predictions.csv``: one row per image: image, patient_id, fold, label, prob_<class>...,
  pred, subgroup columns.
- ``config.yaml``: the resolved pipeline config (``medtl.config.load_config``).
- ``run_info.json`` (written by ``medtl.pipeline``), the keys read here::

      {"classes": ["normal", "pneumonia"],          # class order of the prob_ columns
       "task": "binary" | "multiclass" | "multilabel",
       "fold_thresholds": {"0": 0.41, "1": [0.3, 0.5, 0.2], ...},  # float, or one per class
       "final_threshold": 0.43 | [..] | null,       # optional: the deployed model's threshold
       "data_summary": {"n_images": 480, ...},      # counts; numeric leaves are shown
       "quarantine": [{"path": "...", "reason": "..."}],
       "threshold_source": "...",                   # optional: what data chose the thresholds
                                                    # (default: the fold's own validation set)
       ...}                                          # anything else: shown under "Run"

  The whole dict is the ``run_info`` argument of :func:`write_report`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

__all__ = [
    "ReportPaths",
    "format_ci",
    "headline_rows",
    "regenerate_report",
    "write_evaluation_report",
    "write_report",
]

OOF_FILENAME = "oof_predictions.csv"
METRIC_LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC (average precision)",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "f1": "F1",
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
    "brier": "Brier score (lower is better)",
    "ece": "ECE (lower is better)",
}
FOLD_COLUMNS = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv")
SUBGROUP_COLUMNS = ("auroc", "sensitivity", "specificity", "ppv", "npv")
# When run_info gives no threshold_source (medtl.pipeline gives one unless a single fold ran).
DEFAULT_THRESHOLD_SOURCE = "each fold's own validation predictions (the out-of-fold predictions)"


@dataclass
class ReportPaths:
    """Files a report wrote."""

    out_dir: Path
    markdown: Path
    html: Path
    metrics: Path
    predictions: Path
    plots: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------- formatting
def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def format_ci(entry: Mapping[str, Any] | None, digits: int = 2) -> str:
    """``0.91 (0.85–0.96)``; ``n/a`` when undefined; the value alone when there is no CI."""
    if not entry or entry.get("value") is None:
        return "n/a"
    text = _fmt(entry["value"], digits)
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" ({_fmt(entry['low'], digits)}\u2013{_fmt(entry['high'], digits)})"
    return text


def headline_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(metric, "0.91 (0.85–0.96)")`` rows of the pooled summary, for terminals and cards."""
    pooled = metrics.get("pooled", metrics)
    return [(METRIC_LABELS.get(m, m), format_ci(e)) for m, e in pooled.get("summary", {}).items()]


def _json_threshold(t: Any) -> float | list[float] | None:
    if t is None:
        return None
    if isinstance(t, list | tuple | np.ndarray):
        return [float(x) for x in t]
    return float(t)


def _fmt_threshold(t: Any) -> str:
    if t is None:
        return "n/a"
    if isinstance(t, list | tuple):
        return ", ".join(_fmt(x, 3) for x in t)
    return _fmt(t, 3)


# ----------------------------------------------------------------------------- document model
# A block is a tuple: ("h1"|"h2"|"h3"|"p", text) | ("ul", [items]) |
# ("table", header, rows) | ("img", relative path, alt text).
Block = tuple


def _render_md(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "table":
            header, rows = b[1], b[2]

            def cell(x: Any) -> str:
                return str(x).replace("|", "\\|").replace("\n", " ")

            lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left}th{background:#f0f0f0}
tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
p.note{color:#555}
"""


def _render_html(blocks: Sequence[Block], out_dir: Path, title: str) -> str:
    body: list[str] = []
    esc = html.escape
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{esc(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{esc(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{esc(str(i))}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{esc(str(h))}</th>" for h in b[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{esc(str(x))}</td>" for x in r) + "</tr>" for r in b[2]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((out_dir / b[1]).read_bytes()).decode("ascii")
            body.append(f'<img alt="{esc(b[2])}" src="data:image/png;base64,{data}">')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# ----------------------------------------------------------------------------- predictions
def _predictions_table(
    df: pd.DataFrame,
    classes: list[str],
    task: str,
    thresholds: Any,
    subgroups: Sequence[str],
    label_col: str,
    patient_col: str,
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
    for col in subgroups:
        if col in df.columns and col not in out.columns:
            out[col] = df[col].to_numpy()
    return out


def _read_predictions(path: Path) -> pd.DataFrame:
    head = pd.read_csv(path, nrows=0).columns
    text_cols = {c: str for c in head if not c.startswith("prob_") and c != "fold"}
    return pd.read_csv(path, dtype=text_cols, keep_default_na=False)


# ----------------------------------------------------------------------------- plots
def _write_plots(
    out_dir: Path, pred: pd.DataFrame, classes: list[str], task: str, metrics: dict
) -> dict[str, Path]:
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


# ----------------------------------------------------------------------------- report content
def _numeric_items(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Counts only: numeric leaves of the data summary (strings could carry identifiers)."""
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _numeric_items(v, key + " / ")
        elif isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool):
            out.append((key, _fmt(v) if isinstance(v, float) else str(v)))
    return out


def _class_counts(pred: pd.DataFrame, classes: list[str], task: str) -> list[list[Any]]:
    Y = targets_from_labels(pred["label"], classes, task)
    pats = pred["patient_id"].to_numpy()
    return [
        [c, int(Y[:, i].sum()), len(set(pats[Y[:, i] == 1].tolist()))]
        for i, c in enumerate(classes)
    ]


def _summary_table(block: Mapping[str, Any]) -> list[list[str]]:
    return [[METRIC_LABELS.get(m, m), format_ci(e)] for m, e in block["summary"].items()]


def _per_class_table(block: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["class", "positive images"] + [METRIC_LABELS[m] for m in FOLD_COLUMNS]
    rows = [
        [c, pc["n_pos"]] + [format_ci(pc["metrics"][m]) for m in FOLD_COLUMNS]
        for c, pc in block["per_class"].items()
    ]
    return header, rows


def _content(
    *,
    title: str,
    intro: list[str],
    metrics: dict[str, Any],
    pred: pd.DataFrame,
    classes: list[str],
    task: str,
    cfg: PipelineConfig,
    thresholds_section: list[Block],
    data_summary: Mapping[str, Any],
    quarantine: list[dict[str, Any]],
    run_rows: list[list[str]],
    limitations: list[str],
) -> list[Block]:
    ci_pct = f"{metrics['ci']:.0%}"
    blocks: list[Block] = [("h1", title)]
    blocks += [("p", t) for t in intro]

    blocks.append(("h2", "Data"))
    blocks.append(
        (
            "p",
            f"{metrics['n_images']} images from {metrics['n_patients']} patients were evaluated "
            f"({task}; classes: {', '.join(classes)}).",
        )
    )
    blocks.append(("table", ["class", "images", "patients"], _class_counts(pred, classes, task)))
    extra = _numeric_items(data_summary)
    if extra:
        blocks.append(("p", "Dataset summary (counts only):"))
        blocks.append(("table", ["item", "count"], [list(r) for r in extra]))

    pooled = metrics["pooled"]
    has_folds = bool(metrics.get("folds"))
    blocks.append(("h2", "Results" + (" (pooled out-of-fold)" if has_folds else "")))
    blocks.append(
        (
            "p",
            f"Values with {ci_pct} confidence intervals from a patient-level bootstrap "
            f"({metrics['n_boot']} resamples of patients). Summary: {metrics['summary_kind']}.",
        )
    )
    blocks.append(("table", ["metric", f"value ({ci_pct} CI)"], _summary_table(pooled)))
    if task != "binary":
        header, rows = _per_class_table(pooled)
        blocks.append(("h3", "Per class (one-vs-rest)"))
        blocks.append(("table", header, rows))

    if has_folds:
        blocks.append(("h2", "Per fold"))
        blocks.append(
            (
                "p",
                "Each fold's patients were never seen by that fold's model. "
                "Intervals are wide when a fold holds few patients.",
            )
        )
        header = ["fold", "images", "patients", "threshold"] + [
            METRIC_LABELS[m] for m in FOLD_COLUMNS
        ]
        rows = []
        fold_thr = metrics.get("thresholds", {}).get("per_fold", {})
        for k, blk in metrics["folds"].items():
            rows.append(
                [k, blk["n"], blk["n_patients"], _fmt_threshold(fold_thr.get(k))]
                + [format_ci(blk["summary"][m]) for m in FOLD_COLUMNS]
            )
        fs = metrics.get("fold_summary", {}).get("summary", {})
        rows.append(
            ["mean ± SD", "", "", ""]
            + [
                f"{_fmt(fs[m]['mean'])} ± {_fmt(fs[m]['std'])}" if m in fs else "n/a"
                for m in FOLD_COLUMNS
            ]
        )
        blocks.append(("table", header, rows))

    blocks += thresholds_section

    blocks.append(("h2", "Curves"))
    blocks.append(("img", "plots/roc.png", "ROC curves"))
    blocks.append(("img", "plots/pr.png", "Precision-recall curves"))
    blocks.append(("img", "plots/confusion.png", "Confusion matrix at the operating threshold"))

    blocks.append(("h2", "Calibration"))
    blocks.append(
        (
            "p",
            "Do predicted probabilities match observed frequencies? Points on the diagonal are "
            "well calibrated. ECE: expected calibration error over "
            f"{cfg.evaluation.calibration_bins} equal-width bins.",
        )
    )
    cal_rows = [
        [c, _fmt(cur["ece"], 3), format_ci(_pc_metric(pooled, c, "brier"), 3)]
        for c, cur in metrics["calibration"].items()
    ]
    blocks.append(("table", ["class", "ECE", f"Brier ({ci_pct} CI)"], cal_rows))
    blocks.append(("img", "plots/reliability.png", "Reliability diagram"))

    blocks.append(("h2", "Subgroups"))
    if metrics["subgroups"]:
        header = ["subgroup", "value", "images", "patients", "positive images"] + [
            METRIC_LABELS[m] for m in SUBGROUP_COLUMNS
        ]
        rows = []
        for col, table in metrics["subgroups"].items():
            for v, blk in table.items():
                n_pos = (
                    blk["n_pos"]
                    if "n_pos" in blk
                    else ", ".join(f"{c}: {pc['n_pos']}" for c, pc in blk["per_class"].items())
                )
                rows.append(
                    [col, v, blk["n"], blk["n_patients"], n_pos]
                    + [format_ci(blk["summary"][m]) for m in SUBGROUP_COLUMNS]
                )
        blocks.append(("table", header, rows))
    else:
        blocks.append(("p", "No subgroup columns were available."))
    if metrics.get("subgroups_missing"):
        blocks.append(
            (
                "p",
                f"Configured subgroup column(s) not in the data: {', '.join(metrics['subgroups_missing'])}.",
            )
        )

    blocks.append(("h2", "Quarantined files"))
    if quarantine:
        blocks.append(
            (
                "p",
                f"{len(quarantine)} file(s) could not be read and were left out of training "
                "and evaluation:",
            )
        )
        blocks.append(
            (
                "table",
                ["file", "reason"],
                [[q.get("path", ""), q.get("reason", "")] for q in quarantine],
            )
        )
    else:
        blocks.append(("p", "None: every listed image was read."))

    blocks.append(("h2", "Limitations and notes"))
    blocks.append(("ul", limitations + list(metrics.get("notes", []))))

    blocks.append(("h2", "Run"))
    blocks.append(("table", ["item", "value"], run_rows))
    return blocks


def _pc_metric(block: Mapping[str, Any], cls: str, metric: str) -> Mapping[str, Any] | None:
    pc = block["per_class"].get(cls)
    return pc["metrics"][metric] if pc else None


def _run_rows(cfg: PipelineConfig, run_info: Mapping[str, Any]) -> list[list[str]]:
    weights = run_info.get("weights") or {}
    rows = [
        ["pipeline", cfg.name],
        ["config identity", cfg.identity()],
        ["backbone", cfg.model.backbone],
        [
            "pretrained weights",
            f"{weights.get('tag') or cfg.model.weights} "
            f"(sha256 {str(weights.get('sha256') or 'n/a')[:12]})",
        ],
        ["transfer strategy", cfg.strategy.name],
        ["preprocessing", f"{cfg.transforms.preset}, size {cfg.transforms.spatial_size}"],
        ["epochs (max) / batch size", f"{cfg.train.epochs} / {cfg.train.batch_size}"],
        ["cross-validation", f"{cfg.cv.folds} folds, grouped by patient, seed {cfg.seed}"],
    ]
    for key in ("created", "manifest_hash", "final_epochs"):
        if run_info.get(key) is not None:
            rows.append([key.replace("_", " "), str(run_info[key])])
    mlflow = run_info.get("mlflow") or {}
    if mlflow.get("parent_run_id"):
        rows.append(["MLflow run", str(mlflow["parent_run_id"])])
    return rows


def _limitations(
    metrics: Mapping[str, Any], cfg: PipelineConfig, held_out: bool, threshold_source: str | None
) -> list[str]:
    notes = []
    if held_out:
        notes.append(
            "Evaluation of one fixed model at a fixed threshold on the data listed above; it "
            "speaks for populations and scanners like these only."
        )
    else:
        notes.append(
            "Retrospective internal validation (cross-validation on one dataset). Performance on "
            "other sites, scanners or populations is not established; prospective or external "
            "validation is needed before clinical use."
        )
        notes.append(
            "Pooled out-of-fold results combine predictions of the fold models, each at its own "
            "fold's threshold; the deployed model is refit on all patients."
        )
        if threshold_source is None or threshold_source == DEFAULT_THRESHOLD_SOURCE:
            notes.append(
                "Thresholds were chosen on the same validation predictions they are scored on, so "
                "sensitivity, specificity, PPV, NPV, F1 and accuracy are optimistic; AUROC, AUPRC, "
                "Brier score and ECE do not depend on the threshold."
            )
    small = [
        k
        for k, b in metrics.get("folds", {}).items()
        if b["n_patients"] < 30 or min(_positives(b)) < 10
    ]
    if small:
        notes.append(
            f"Fold(s) {', '.join(small)} hold fewer than 30 patients or fewer than 10 positive "
            "images of a class: their intervals are wide and fold-to-fold spread is large."
        )
    if metrics["n_boot"] == 0:
        notes.append("Bootstrap disabled (evaluation.bootstrap=0): no confidence intervals.")
    notes.append(
        "Confidence intervals resample patients, not images, because images of one patient are "
        "correlated."
    )
    return notes


def _positives(block: Mapping[str, Any]) -> list[int]:
    return [pc["n_pos"] for pc in block["per_class"].values()] or [0]


# ----------------------------------------------------------------------------- entry points
def _write_all(
    out_dir: Path,
    *,
    pred: pd.DataFrame,
    metrics: dict[str, Any],
    classes: list[str],
    task: str,
    cfg: PipelineConfig,
    predictions_name: str,
    title: str,
    intro: list[str],
    thresholds_section: list[Block],
    data_summary: Mapping[str, Any],
    quarantine: list[dict[str, Any]],
    run_rows: list[list[str]],
    held_out: bool,
    threshold_source: str | None = None,
) -> ReportPaths:
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / predictions_name
    pred.to_csv(pred_path, index=False)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    plot_paths = _write_plots(out_dir, pred, classes, task, metrics)
    blocks = _content(
        title=title,
        intro=intro,
        metrics=metrics,
        pred=pred,
        classes=classes,
        task=task,
        cfg=cfg,
        thresholds_section=thresholds_section,
        data_summary=data_summary,
        quarantine=quarantine,
        run_rows=run_rows,
        limitations=_limitations(metrics, cfg, held_out, threshold_source),
    )
    md_path = out_dir / "report.md"
    md_path.write_text(_render_md(blocks))
    html_path = out_dir / "report.html"
    html_path.write_text(_render_html(blocks, out_dir, title))
    return ReportPaths(out_dir, md_path, html_path, metrics_path, pred_path, plot_paths)


def _quarantine_list(quarantine: Any) -> list[dict[str, Any]]:
    if quarantine is None:
        return []
    if isinstance(quarantine, pd.DataFrame):
        return quarantine.astype(str).to_dict("records")
    return [
        q
        if isinstance(q, Mapping)
        else {"path": getattr(q, "path", str(q)), "reason": getattr(q, "reason", "")}
        for q in quarantine
    ]


def _threshold_method(cfg: PipelineConfig) -> str:
    if cfg.cv.threshold == "sensitivity":
        return (
            f"the highest threshold reaching sensitivity >= {cfg.cv.target_sensitivity:.2f} on the "
            "ROC curve"
        )
    return "maximum Youden index (sensitivity + specificity - 1) on the ROC curve"


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
    """Write the cross-validation report of a run (see module docstring for the files).

    ``oof``: one row per validation image with image, patient_id, fold, label, prob_<class>.
    ``fold_thresholds``: ``{fold: float}`` (binary) or ``{fold: [per class]}``.
    """
    out_dir = Path(out_dir)
    classes = [str(c) for c in classes]
    run_info = dict(run_info or {})
    thresholds = {int(k): v for k, v in fold_thresholds.items()}
    if "fold" not in oof.columns:
        raise MedtlError(
            "the out-of-fold table needs a 'fold' column; use write_evaluation_report for held-out data"
        )
    subgroups = list(cfg.evaluation.subgroups)
    pred = _predictions_table(oof, classes, task, thresholds, subgroups, "label", "patient_id")
    metrics = evaluate_predictions(pred, classes, task, thresholds, cfg)
    final = run_info.get("final_threshold")
    metrics["thresholds"] = {
        "method": cfg.cv.threshold,
        "target_sensitivity": cfg.cv.target_sensitivity
        if cfg.cv.threshold == "sensitivity"
        else None,
        "per_fold": {str(k): _json_threshold(v) for k, v in sorted(thresholds.items())},
        "final": _json_threshold(final),
    }
    metrics["config_identity"] = cfg.identity()

    thr_blocks: list[Block] = [("h2", "Operating threshold")]
    thr_blocks.append(
        (
            "p",
            f"Each fold's threshold was chosen as {_threshold_method(cfg)}"
            + f", on {run_info.get('threshold_source') or DEFAULT_THRESHOLD_SOURCE}"
            + ". A case is called positive when its probability is at or above the threshold"
            + (
                "; in multiclass tasks the predicted class is the most probable one and the "
                "per-class thresholds apply to the one-vs-rest metrics."
                if task == "multiclass"
                else "."
            ),
        )
    )
    thr_rows = [[str(k), _fmt_threshold(v)] for k, v in sorted(thresholds.items())]
    if final is not None:
        thr_rows.append(
            ["deployed model (all pooled out-of-fold predictions)", _fmt_threshold(final)]
        )
    thr_blocks.append(
        ("table", ["fold", "threshold" + ("s (per class)" if task != "binary" else "")], thr_rows)
    )

    return _write_all(
        out_dir,
        pred=pred,
        metrics=metrics,
        classes=classes,
        task=task,
        cfg=cfg,
        predictions_name=OOF_FILENAME,
        title=f"medtl report: {cfg.name}",
        intro=[
            (cfg.description or "Transfer-learning classifier").rstrip(".")
            + f". A {cfg.model.backbone} network pretrained on "
            + f"{cfg.model.weights or 'no pretrained weights'} was adapted with the "
            + f"'{cfg.strategy.name}' strategy and assessed by {cfg.cv.folds}-fold "
            "cross-validation grouped by patient (no patient in two folds).",
        ],
        thresholds_section=thr_blocks,
        data_summary=data_summary or {},
        quarantine=_quarantine_list(quarantine),
        run_rows=_run_rows(cfg, run_info),
        held_out=False,
        threshold_source=run_info.get("threshold_source"),
    )


def write_evaluation_report(
    out_dir: str | Path,
    preds_df: pd.DataFrame,
    classes: Sequence[str],
    task: str,
    threshold: float | list[float],
    cfg: PipelineConfig,
    info: Mapping[str, Any] | None = None,
) -> ReportPaths:
    """Report of one trained model on held-out data (same metrics and files, no folds;
    predictions go to ``predictions.csv``). Labels/patients are read from ``label`` /
    ``patient_id`` or else the config's column names."""
    out_dir = Path(out_dir)
    classes = [str(c) for c in classes]
    info = dict(info or {})
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
        "final": _json_threshold(threshold),
    }
    metrics["config_identity"] = cfg.identity()
    thr_blocks: list[Block] = [
        ("h2", "Operating threshold"),
        (
            "p",
            f"The model's stored threshold was applied unchanged: {_fmt_threshold(threshold)}"
            + (
                " (per class; the predicted class is the most probable one)"
                if task == "multiclass"
                else ""
            )
            + ". It was chosen during training, not on these data.",
        ),
    ]
    run_rows = _run_rows(cfg, {}) + [[str(k), str(v)] for k, v in info.items()]
    return _write_all(
        out_dir,
        pred=pred,
        metrics=metrics,
        classes=classes,
        task=task,
        cfg=cfg,
        predictions_name="predictions.csv",
        title=f"medtl evaluation: {cfg.name}",
        intro=[
            f"A trained {cfg.model.backbone} model ({cfg.strategy.name}) evaluated on "
            f"held-out data{(' from ' + str(info['source'])) if info.get('source') else ''}."
        ],
        thresholds_section=thr_blocks,
        data_summary={},
        quarantine=[],
        run_rows=run_rows,
        held_out=True,
        threshold_source="training data",
    )


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
