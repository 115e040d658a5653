"""The report's target-site section (domain adaptation): the source cross-validation beside the
target site before and after adaptation, each with patient-bootstrap CIs, from
``metrics["target"]`` (written by :func:`medtl.jobs.target.evaluate_target`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medtl.evaluation.report.blocks import Block, BulletList, Heading, Paragraph, Table
from medtl.evaluation.report.formatting import METRIC_LABELS, fmt, format_ci

if TYPE_CHECKING:  # sections.py imports this module: no run-time import back
    from medtl.evaluation.report.sections import ReportContext

TARGET_COLUMNS = ("auroc", "sensitivity", "specificity", "ppv", "npv", "ece")
ARM_TITLES = {"before": "target, no adaptation", "after": "target, adapted"}


def _row(name: str, summary: Mapping[str, Any], n: Any) -> list[str]:
    return [name, fmt(n)] + [format_ci(summary.get(k)) for k in TARGET_COLUMNS]


def _difference_text(diff: Mapping[str, Any], ci_pct: str) -> str:
    if "auroc_after_minus_before" not in diff:
        return str(diff.get("note", ""))
    low, high = diff["bootstrap_ci"]
    return (
        f"AUROC after minus before on the same {diff['n_patients']} target patients: "
        f"{fmt(diff['auroc_after_minus_before'], 3)} (paired patient bootstrap {ci_pct} CI "
        f"{fmt(low, 3)} to {fmt(high, 3)}; clustered DeLong p = {fmt(diff['delong_p'], 3)}). "
        "An interval that includes 0 means adaptation did not measurably help here."
    )


def target_section(ctx: ReportContext) -> list[Block]:
    """Source CV vs target site, before and after adaptation (nothing without a target)."""
    t = ctx.metrics.get("target")
    if not t:
        return []
    method = t["method"]
    facts = [
        f"Adaptation method: {method}",
        f"Target manifest: {t['manifest']} (sha256 {str(t['manifest_sha256'])[:16]}…), "
        f"{t['n_images']} images of {t['n_patients']} patients, {t['n_quarantined']} quarantined",
        "Target patients never appear in the source folds (checked: no shared patient or file).",
    ]
    blocks: list[Block] = [Heading(2, "Target site"), BulletList(facts)]
    if not t.get("labelled"):
        rates = ", ".join(f"{k}: {fmt(v)}" for k, v in t.get("predicted_positive_rate", {}).items())
        blocks.append(Paragraph(f"{t['unlabelled_note']}. Positive-prediction rate: {rates}."))
        blocks.append(Paragraph(t["note"]))
        return blocks
    header = ["evaluated on", "images"] + [METRIC_LABELS.get(k, k) for k in TARGET_COLUMNS]
    pooled = ctx.metrics.get("pooled", {})
    rows = [
        _row("source, cross-validation (out of fold)", pooled.get("summary", {}), pooled.get("n"))
    ]
    for arm in ("before", "after"):
        if arm in t:
            rows.append(_row(ARM_TITLES[arm], t[arm]["summary"], t[arm]["n"]))
    blocks.append(Table(header, rows))
    if "difference" in t:
        blocks.append(Paragraph(_difference_text(t["difference"], ctx.ci_pct)))
    blocks.append(Paragraph(t["note"]))
    return blocks
