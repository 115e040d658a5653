"""The report's sections: one function per section, each turning a :class:`ReportContext`
into blocks. A report is a list of sections (:data:`SECTIONS` for a cross-validation run,
:data:`EVALUATION_SECTIONS` for a held-out evaluation); adding a section is adding a function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtl.config import PipelineConfig
from medtl.evaluation.metrics import targets_from_labels
from medtl.evaluation.report.blocks import (
    Block,
    BulletList,
    Heading,
    Image,
    Paragraph,
    Table,
)
from medtl.evaluation.report.formatting import (
    FOLD_COLUMNS,
    METRIC_LABELS,
    SUBGROUP_COLUMNS,
    fmt,
    fmt_threshold,
    format_ci,
)
from medtl.evaluation.report.gallery import gallery_section
from medtl.evaluation.report.target import target_section

# When run_info gives no threshold_source (medtl.pipeline gives one unless a single fold ran).
DEFAULT_THRESHOLD_SOURCE = "each fold's own validation predictions (the out-of-fold predictions)"

Threshold = float | list[float]


@dataclass(frozen=True)
class ReportContext:
    """What the sections read: predictions, metrics, config and the run's extra facts."""

    out_dir: Path
    title: str
    metrics: Mapping[str, Any]
    pred: pd.DataFrame
    classes: list[str]
    task: str
    cfg: PipelineConfig
    # {fold: threshold} of a cross-validation run; the one fixed threshold of a held-out one.
    thresholds: Mapping[int, Threshold] | Threshold
    # run_info.json of a run; the caller's ``info`` of a held-out evaluation.
    run_info: Mapping[str, Any] = field(default_factory=dict)
    data_summary: Mapping[str, Any] = field(default_factory=dict)
    quarantine: Sequence[Mapping[str, Any]] = ()
    plots: Mapping[str, Path] = field(default_factory=dict)

    @property
    def ci_pct(self) -> str:
        """The confidence level as a percentage, e.g. ``95%``."""
        return f"{self.metrics['ci']:.0%}"

    @property
    def has_folds(self) -> bool:
        """Whether the metrics hold per-fold results (a cross-validation run)."""
        return bool(self.metrics.get("folds"))

    def plot(self, name: str) -> str:
        """Path of plot ``name`` relative to the report folder, as the report links it."""
        return self.plots[name].relative_to(self.out_dir).as_posix()


Section = Callable[[ReportContext], list[Block]]


def build_blocks(ctx: ReportContext, sections: Sequence[Section]) -> list[Block]:
    """The whole report: each section's blocks in order."""
    return [block for section in sections for block in section(ctx)]


# ----------------------------------------------------------------------------- title
def title_section(ctx: ReportContext) -> list[Block]:
    """Title and one-paragraph summary of what was trained and how it was assessed."""
    cfg = ctx.cfg
    intro = (
        (cfg.description or "Transfer-learning classifier").rstrip(".")
        + f". A {cfg.model.backbone} network pretrained on "
        + f"{cfg.model.weights or 'no pretrained weights'} was adapted with the "
        + f"'{cfg.strategy.name}' strategy and assessed by {_cv_phrase(cfg)}."
    )
    return [Heading(1, ctx.title), Paragraph(intro)]


def evaluation_title_section(ctx: ReportContext) -> list[Block]:
    """Title and the model and data source of a held-out evaluation."""
    source = ctx.run_info.get("source")
    intro = (
        f"A trained {ctx.cfg.model.backbone} model ({ctx.cfg.strategy.name}) evaluated on "
        f"held-out data{(' from ' + str(source)) if source else ''}."
    )
    return [Heading(1, ctx.title), Paragraph(intro)]


# ----------------------------------------------------------------------------- data
def _numeric_items(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Counts only: numeric leaves of the data summary (strings could carry identifiers)."""
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _numeric_items(v, key + " / ")
        elif isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool):
            out.append((key, fmt(v) if isinstance(v, float) else str(v)))
    return out


def _class_counts(pred: pd.DataFrame, classes: list[str], task: str) -> list[list[Any]]:
    """``[class, positive images, patients with one]`` per class."""
    Y = targets_from_labels(pred["label"], classes, task)
    pats = pred["patient_id"].to_numpy()
    return [
        [c, int(Y[:, i].sum()), len(set(pats[Y[:, i] == 1].tolist()))]
        for i, c in enumerate(classes)
    ]


def data_section(ctx: ReportContext) -> list[Block]:
    """How many images, patients and positives per class were evaluated (counts only)."""
    m = ctx.metrics
    blocks: list[Block] = [
        Heading(2, "Data"),
        Paragraph(
            f"{m['n_images']} images from {m['n_patients']} patients were evaluated "
            f"({ctx.task}; classes: {', '.join(ctx.classes)})."
        ),
        Table(["class", "images", "patients"], _class_counts(ctx.pred, ctx.classes, ctx.task)),
    ]
    extra = _numeric_items(ctx.data_summary)
    if extra:
        blocks.append(Paragraph("Dataset summary (counts only):"))
        blocks.append(Table(["item", "count"], [list(r) for r in extra]))
    return blocks


# ----------------------------------------------------------------------------- results
def results_section(ctx: ReportContext) -> list[Block]:
    """Headline: pooled metrics with bootstrap intervals, and per class beyond binary."""
    m = ctx.metrics
    pooled = m["pooled"]
    blocks: list[Block] = [
        Heading(2, "Results" + (" (pooled out-of-fold)" if ctx.has_folds else "")),
        Paragraph(
            f"Values with {ctx.ci_pct} confidence intervals from a patient-level bootstrap "
            f"({m['n_boot']} resamples of patients). Summary: {m['summary_kind']}."
        ),
        _levels_table(ctx),
    ]
    note = _aggregate_note(ctx)
    if note is not None:
        blocks.append(note)
    if ctx.task != "binary":
        header = ["class", "positive images"] + [METRIC_LABELS[k] for k in FOLD_COLUMNS]
        rows = [
            [c, pc["n_pos"]] + [format_ci(pc["metrics"][k]) for k in FOLD_COLUMNS]
            for c, pc in pooled["per_class"].items()
        ]
        blocks += [Heading(3, "Per class (one-vs-rest)"), Table(header, rows)]
    return blocks


def _levels(ctx: ReportContext) -> list[tuple[str, Mapping[str, Any]]]:
    """``(level, metrics)`` for images, then studies and patients when they were evaluated."""
    return [("image", ctx.metrics)] + list((ctx.metrics.get("levels") or {}).items())


def _levels_table(ctx: ReportContext) -> Table:
    """Headline metrics per image, per study and per patient, side by side."""
    levels = _levels(ctx)
    header = ["metric"] + [
        f"per {lvl} (n={m['pooled']['n']}, {ctx.ci_pct} CI)" for lvl, m in levels
    ]
    names = list(ctx.metrics["pooled"]["summary"])
    rows = [
        [METRIC_LABELS.get(k, k)] + [format_ci(m["pooled"]["summary"].get(k)) for _, m in levels]
        for k in names
    ]
    return Table(header, rows)


def _aggregate_note(ctx: ReportContext) -> Paragraph | None:
    """How study and patient probabilities were formed, when those levels are shown."""
    levels = ctx.metrics.get("levels") or {}
    if not levels:
        return None
    how = next(iter(levels.values())).get("aggregate", "mean")
    return Paragraph(
        f"Study and patient results use the {how} of their images' probabilities; a study or "
        "patient is positive when any of its images is. Intervals resample patients at every "
        "level."
    )


def selection_section(ctx: ReportContext) -> list[Block]:
    """How each model chose its epoch, calibration and threshold (``cv.selection``)."""
    rule = ctx.run_info.get("selection_rule")
    if not rule:
        return []
    blocks: list[Block] = [Heading(2, "Model selection"), Paragraph(f"Rule: {rule}.")]
    if ctx.run_info.get("selection") == "outer":
        blocks.append(
            Paragraph(
                "Warning: with cv.selection=outer each fold's epoch was chosen on the fold that "
                "is reported, so these cross-validated results are optimistic. Use "
                "cv.selection=inner for an honest estimate."
            )
        )
    epochs = ctx.run_info.get("best_epochs")
    if epochs:
        blocks.append(
            Paragraph(
                f"Epochs to the chosen epoch per fold: {epochs}; the registered model: "
                f"{ctx.run_info.get('final_epochs')} (trained by the same rule on all non-test "
                "patients, so the cross-validation estimates the procedure that made it)."
            )
        )
    return blocks


def per_fold_section(ctx: ReportContext) -> list[Block]:
    """Each fold's metrics and threshold, then mean ± SD over folds; nothing without folds."""
    if not ctx.has_folds:
        return []
    m = ctx.metrics
    header = ["fold", "images", "patients", "threshold"] + [METRIC_LABELS[k] for k in FOLD_COLUMNS]
    fold_thr = m.get("thresholds", {}).get("per_fold", {})
    rows: list[list[Any]] = [
        [k, blk["n"], blk["n_patients"], fmt_threshold(fold_thr.get(k))]
        + [format_ci(blk["summary"][c]) for c in FOLD_COLUMNS]
        for k, blk in m["folds"].items()
    ]
    fs = m.get("fold_summary", {}).get("summary", {})
    rows.append(
        ["mean ± SD", "", "", ""]
        + [
            f"{fmt(fs[c]['mean'])} ± {fmt(fs[c]['std'])}" if c in fs else "n/a"
            for c in FOLD_COLUMNS
        ]
    )
    rows.append(
        [f"mean, {ctx.ci_pct} CI (t, over folds)", "", "", ""]
        + [
            format_ci(
                {"value": fs[c]["mean"], "low": fs[c].get("ci_low"), "high": fs[c].get("ci_high")}
            )
            if c in fs
            else "n/a"
            for c in FOLD_COLUMNS
        ]
    )
    return [
        Heading(2, "Per fold"),
        Paragraph(
            "Each fold's patients were never seen by that fold's model. "
            "Intervals are wide when a fold holds few patients."
        ),
        Table(header, rows),
    ]


# ----------------------------------------------------------------------------- threshold
def _threshold_method(cfg: PipelineConfig) -> str:
    """How the cross-validation chose each fold's threshold, in words."""
    if cfg.cv.threshold == "sensitivity":
        return (
            f"the highest threshold reaching sensitivity >= {cfg.cv.target_sensitivity:.2f} on the "
            "ROC curve"
        )
    return "maximum Youden index (sensitivity + specificity - 1) on the ROC curve"


def threshold_section(ctx: ReportContext) -> list[Block]:
    """How each fold's threshold was chosen, on what data, and the thresholds themselves."""
    assert isinstance(ctx.thresholds, Mapping), "a cross-validation report has fold thresholds"
    text = (
        f"Each fold's threshold was chosen as {_threshold_method(ctx.cfg)}"
        + f", on {ctx.run_info.get('threshold_source') or DEFAULT_THRESHOLD_SOURCE}"
        + ". A case is called positive when its probability is at or above the threshold"
        + (
            "; in multiclass tasks the predicted class is the most probable one and the "
            "per-class thresholds apply to the one-vs-rest metrics."
            if ctx.task == "multiclass"
            else "."
        )
    )
    rows = [[str(k), fmt_threshold(v)] for k, v in sorted(ctx.thresholds.items())]
    final = ctx.run_info.get("final_threshold")
    if final is not None:
        rows.append(["deployed model", fmt_threshold(final)])
    column = "threshold" + ("s (per class)" if ctx.task != "binary" else "")
    return [Heading(2, "Operating threshold"), Paragraph(text), Table(["fold", column], rows)]


def evaluation_threshold_section(ctx: ReportContext) -> list[Block]:
    """The fixed threshold a held-out evaluation applied (chosen in training, not here)."""
    text = (
        f"The model's stored threshold was applied unchanged: {fmt_threshold(ctx.thresholds)}"
        + (
            " (per class; the predicted class is the most probable one)"
            if ctx.task == "multiclass"
            else ""
        )
        + ". It was chosen during training, not on these data."
    )
    return [Heading(2, "Operating threshold"), Paragraph(text)]


# ----------------------------------------------------------------------------- plots
def curves_section(ctx: ReportContext) -> list[Block]:
    """ROC, precision-recall and confusion-matrix plots."""
    return [
        Heading(2, "Curves"),
        Image(ctx.plot("roc"), "ROC curves"),
        Image(ctx.plot("pr"), "Precision-recall curves"),
        Image(ctx.plot("confusion"), "Confusion matrix at the operating threshold"),
    ]


def calibration_section(ctx: ReportContext) -> list[Block]:
    """ECE and Brier score per class, and the reliability diagram."""
    pooled = ctx.metrics["pooled"]

    def brier(cls: str) -> Mapping[str, Any] | None:
        pc = pooled["per_class"].get(cls)
        return pc["metrics"]["brier"] if pc else None

    rows = [
        [c, fmt(cur["ece"], 3), format_ci(brier(c), 3)]
        for c, cur in ctx.metrics["calibration"].items()
    ]
    blocks: list[Block] = [
        Heading(2, "Calibration"),
        Paragraph(
            "Do predicted probabilities match observed frequencies? Points on the diagonal are "
            "well calibrated. ECE: expected calibration error over "
            f"{ctx.cfg.evaluation.calibration_bins} equal-width bins."
        ),
    ]
    recal = ctx.metrics.get("recalibration")
    cal_info = ctx.run_info.get("calibration") or {}
    if recal:
        blocks += [
            Paragraph(
                f"Probabilities were recalibrated ({cal_info.get('method')}); each fold's "
                "calibrator was fitted where its threshold was chosen, never on the fold it is "
                "reported on, so the calibrated results below are out-of-fold too. Thresholds "
                "apply to the calibrated probabilities."
            ),
            Table(
                ["", f"ECE ({ctx.ci_pct} CI)", f"Brier ({ctx.ci_pct} CI)"],
                [
                    [when, format_ci(recal[when]["ece"], 3), format_ci(recal[when]["brier"], 3)]
                    for when in ("before", "after")
                ],
            ),
            Image(ctx.plot("reliability_before"), "Reliability diagram before recalibration"),
            Image(ctx.plot("reliability"), "Reliability diagram after recalibration"),
        ]
        return blocks
    if cal_info.get("method") == "none":
        blocks.append(
            Paragraph("Probabilities were not recalibrated (evaluation.calibration=none).")
        )
    return blocks + [
        Table(["class", "ECE", f"Brier ({ctx.ci_pct} CI)"], rows),
        Image(ctx.plot("reliability"), "Reliability diagram"),
    ]


# ----------------------------------------------------------------------------- subgroups
def _cv_phrase(cfg: PipelineConfig) -> str:
    """How the folds were made, in words (patient-grouped k-fold or leave-one-group-out)."""
    by = cfg.cv.group_by
    if by:
        return (
            f"leave-one-{by}-out cross-validation over {cfg.cv.folds} {by} values (each {by} "
            f"scored by a model that never saw it; no patient in two folds)"
        )
    return f"{cfg.cv.folds}-fold cross-validation grouped by patient (no patient in two folds)"


def _held_out_folds(ctx: ReportContext) -> dict[str, int]:
    """Leave-one-group-out runs: each ``cv.group_by`` value and the fold that held it out."""
    by = ctx.cfg.cv.group_by
    if not by or not ctx.has_folds or by not in ctx.pred.columns or "fold" not in ctx.pred:
        return {}
    folds = ctx.pred.groupby(ctx.pred[by].astype(str))["fold"].unique()
    return {str(v): int(f[0]) for v, f in folds.items() if len(f) == 1}


def _held_out_note(ctx: ReportContext, held: Mapping[str, int]) -> Paragraph:
    by = ctx.cfg.cv.group_by
    return Paragraph(
        f"Leave-one-{by}-out (cv.group_by={by}): each {by} row holds the predictions of the "
        f"fold that held that {by} out, made by a model trained on the other {by} values only, "
        f"so it estimates performance at a {by} the model never saw; compare the rows to see "
        f"the shift between {by} values. Folds: "
        + ", ".join(f"{v} = fold {k}" for v, k in sorted(held.items(), key=lambda x: x[1]))
        + "."
    )


def subgroups_section(ctx: ReportContext) -> list[Block]:
    """Metrics per value of each configured subgroup column, and the columns not found; under
    leave-one-group-out CV the group rows are labelled with the fold that held them out."""
    m = ctx.metrics
    blocks: list[Block] = [Heading(2, "Subgroups")]
    held = _held_out_folds(ctx)
    if m["subgroups"]:
        header = ["subgroup", "value", "images", "patients", "positive images"] + [
            METRIC_LABELS[k] for k in SUBGROUP_COLUMNS
        ]
        rows = []
        for col, table in m["subgroups"].items():
            for v, blk in table.items():
                n_pos = (
                    blk["n_pos"]
                    if "n_pos" in blk
                    else ", ".join(f"{c}: {pc['n_pos']}" for c, pc in blk["per_class"].items())
                )
                shown = v
                if col == ctx.cfg.cv.group_by and str(v) in held:
                    shown = f"{v} (held out, fold {held[str(v)]})"
                rows.append(
                    [col, shown, blk["n"], blk["n_patients"], n_pos]
                    + [format_ci(blk["summary"][k]) for k in SUBGROUP_COLUMNS]
                )
        blocks.append(Table(header, rows))
        if held:
            blocks.append(_held_out_note(ctx, held))
    else:
        blocks.append(Paragraph("No subgroup columns were available."))
    if m.get("subgroups_missing"):
        missing = ", ".join(m["subgroups_missing"])
        blocks.append(Paragraph(f"Configured subgroup column(s) not in the data: {missing}."))
    return blocks


# ----------------------------------------------------------------------------- quarantine
def quarantine_section(ctx: ReportContext) -> list[Block]:
    """Files that could not be read, by the path the manifest gave, and why."""
    q = ctx.quarantine
    if not q:
        return [Heading(2, "Quarantined files"), Paragraph("None: every listed image was read.")]
    blocks: list[Block] = [
        Heading(2, "Quarantined files"),
        Paragraph(
            f"{len(q)} file(s) could not be read and were left out of this run (no "
            "training, prediction or metric uses them):"
        ),
        Table(["file", "reason"], [[r.get("path", ""), r.get("reason", "")] for r in q]),
    ]
    breakdown = ctx.run_info.get("quarantine_breakdown") or {}
    rows = [
        [col, value, c["quarantined"], c["total"], f"{c['quarantined'] / max(c['total'], 1):.1%}"]
        for col, table in breakdown.items()
        for value, c in table.items()
    ]
    if rows:
        blocks += [
            Paragraph(
                "By label and subgroup: a decoder that fails at one site can drop a subgroup "
                "while the overall bad-file share stays low."
            ),
            Table(["by", "value", "quarantined", "listed", "share"], rows),
        ]
    return blocks


# ----------------------------------------------------------------------------- limitations
def _positives(block: Mapping[str, Any]) -> list[int]:
    return [pc["n_pos"] for pc in block["per_class"].values()] or [0]


def _shared_notes(metrics: Mapping[str, Any]) -> list[str]:
    """Notes of every report: small folds, no bootstrap, why patients are resampled."""
    notes = []
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
    return notes + list(metrics.get("notes", []))


def _data_note(ctx: ReportContext) -> str:
    """What data the estimate rests on, in counts."""
    m = ctx.metrics
    sites = (m.get("subgroups") or {}).get("site") or {}
    where = f" from {len(sites)} site(s)" if sites else ""
    if ctx.cfg.cv.group_by:
        by = ctx.cfg.cv.group_by
        return (
            f"Retrospective validation by {_cv_phrase(ctx.cfg)}, on {m['n_images']} images "
            f"from {m['n_patients']} patients{where}. Each {by}'s results come from a model "
            f"that never saw that {by}, a proxy for a new {by}; sites, scanners or populations "
            "unlike these are not covered, and prospective validation is needed before "
            "clinical use."
        )
    return (
        f"Retrospective internal validation: {ctx.cfg.cv.folds}-fold cross-validation on one "
        f"dataset of {m['n_images']} images from {m['n_patients']} patients{where}. Performance on "
        "other sites, scanners or populations is not established; external or prospective "
        "validation is needed before clinical use."
    )


def _selection_notes(ctx: ReportContext) -> list[str]:
    """What the selection rule, the thresholds and the calibration mean for the numbers."""
    info, cfg = ctx.run_info, ctx.cfg
    notes = []
    if info.get("selection") == "outer":
        notes.append(
            "Each fold's epoch was chosen on the reported fold (cv.selection=outer): AUROC and "
            "every other metric are optimistic."
        )
    elif info.get("selection"):
        notes.append(
            f"Epoch choice (cv.selection={info['selection']}), calibration and thresholds used an "
            f"inner split of {cfg.cv.inner_fraction:.0%} of each model's training patients: on "
            "small data these choices are noisy, and each model trained on the rest only."
        )
    source = info.get("threshold_source")
    if source is None or source == DEFAULT_THRESHOLD_SOURCE:
        notes.append(
            "Thresholds were chosen on the same validation predictions they are scored on, so "
            "sensitivity, specificity, PPV, NPV, F1 and accuracy are optimistic; AUROC, AUPRC, "
            "Brier score and ECE do not depend on the threshold."
        )
    for who, note in (info.get("operating_point_notes") or {}).items():
        notes.append(
            f"Operating point of {'fold ' + who if who != 'deployed' else 'the deployed model'}: {note}."
        )
    method = (info.get("calibration") or {}).get("method")
    reweighted = cfg.train.sampler == "balanced" or cfg.train.loss in ("weighted_ce", "focal")
    if method == "none" and reweighted:
        notes.append(
            "Probabilities were not recalibrated although training re-weighted the classes "
            "(balanced sampler or weighted loss): they over- or under-state the true risk."
        )
    return notes


def _quarantine_notes(ctx: ReportContext) -> list[str]:
    """How many listed images were left out, and any group that lost a larger share."""
    q = ctx.quarantine
    listed = ctx.run_info.get("n_images_listed")
    if not q or not listed:
        return []
    share = len(q) / listed
    notes = [
        f"{len(q)} of {listed} listed images ({share:.1%}) could not be read and are excluded."
    ]
    for col, table in (ctx.run_info.get("quarantine_breakdown") or {}).items():
        for value, c in table.items():
            if c["total"] and c["quarantined"] / c["total"] > max(2 * share, 0.05):
                notes.append(
                    f"{col}={value} lost {c['quarantined']} of {c['total']} images "
                    f"({c['quarantined'] / c['total']:.0%}): its results may be biased."
                )
    return notes


def limitations_section(ctx: ReportContext) -> list[Block]:
    """What was actually done, and what that does and does not show (generated from the run)."""
    notes = [
        _data_note(ctx),
        "Pooled out-of-fold results combine predictions of the fold models, each at its own "
        "fold's threshold; the deployed model is refit on all non-test patients by the same rule.",
        *_selection_notes(ctx),
        *_quarantine_notes(ctx),
    ]
    if ctx.metrics["n_patients"] < 100:
        notes.append(
            f"Only {ctx.metrics['n_patients']} patients: every interval is wide; treat point "
            "estimates with caution."
        )
    return [Heading(2, "Limitations and notes"), BulletList(notes + _shared_notes(ctx.metrics))]


def evaluation_limitations_section(ctx: ReportContext) -> list[Block]:
    """What one fixed model scored on one data set does and does not show."""
    notes = [
        "Evaluation of one fixed model at a fixed threshold on the data listed above; it "
        "speaks for populations and scanners like these only."
    ]
    return [Heading(2, "Limitations and notes"), BulletList(notes + _shared_notes(ctx.metrics))]


# ----------------------------------------------------------------------------- run
def _config_rows(cfg: PipelineConfig, weights: Mapping[str, Any]) -> list[list[str]]:
    """The config facts a reader needs to reproduce the run."""
    return [
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
        [
            "cross-validation",
            f"{cfg.cv.folds} folds, leave one {cfg.cv.group_by} out, seed {cfg.seed}"
            if cfg.cv.group_by
            else f"{cfg.cv.folds} folds, grouped by patient, seed {cfg.seed}",
        ],
    ]


def run_section(ctx: ReportContext) -> list[Block]:
    """Config, weights, creation time, manifest hash and MLflow run of a training run."""
    info = ctx.run_info
    rows = _config_rows(ctx.cfg, info.get("weights") or {})
    for key in ("created", "manifest_hash", "final_epochs"):
        if info.get(key) is not None:
            rows.append([key.replace("_", " "), str(info[key])])
    mlflow = info.get("mlflow") or {}
    if mlflow.get("parent_run_id"):
        rows.append(["MLflow run", str(mlflow["parent_run_id"])])
    return [Heading(2, "Run"), Table(["item", "value"], rows)]


def evaluation_run_section(ctx: ReportContext) -> list[Block]:
    """The model's config, then every item of the caller's ``info``."""
    rows = _config_rows(ctx.cfg, {}) + [[str(k), str(v)] for k, v in ctx.run_info.items()]
    return [Heading(2, "Run"), Table(["item", "value"], rows)]


SECTIONS: list[Section] = [
    title_section,
    data_section,
    results_section,
    per_fold_section,
    selection_section,
    threshold_section,
    curves_section,
    calibration_section,
    gallery_section,
    subgroups_section,
    target_section,
    quarantine_section,
    limitations_section,
    run_section,
]
EVALUATION_SECTIONS: list[Section] = [
    evaluation_title_section,
    data_section,
    results_section,
    evaluation_threshold_section,
    curves_section,
    calibration_section,
    subgroups_section,
    quarantine_section,
    evaluation_limitations_section,
    evaluation_run_section,
]
