"""The few-shot job's own report files: ``fewshot.json`` (machine-readable) and
``fewshot.md`` (the table a person reads), plus ``episodes.csv`` (one row per episode)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medtl.fewshot.evaluate import EpisodicResult, MeanCI

__all__ = ["episodic_markdown", "fmt_ci", "write_episodic_report", "write_fit_summary"]

CI_NOTE = (
    "Intervals: mean +- t * sd / sqrt(episodes) over episodes drawn from these patients "
    "(the usual few-shot protocol). Episodes share patients, so the interval shows how "
    "results vary with the choice of support patients here; it does not cover the "
    "uncertainty of having these particular patients."
)


def fmt_ci(m: MeanCI, digits: int = 3) -> str:
    """``0.712 [0.698, 0.726]`` (``n/a`` when undefined)."""
    if not math.isfinite(m.mean):
        return "n/a"
    if not (math.isfinite(m.low) and math.isfinite(m.high)):
        return f"{m.mean:.{digits}f}"
    return f"{m.mean:.{digits}f} [{m.low:.{digits}f}, {m.high:.{digits}f}]"


def episodic_markdown(result: EpisodicResult, info: Mapping[str, Any]) -> str:
    """``fewshot.md``: what was evaluated, then AUROC and accuracy per variant and k."""
    ci = int(round(100 * float(info.get("ci", 0.95))))
    lines = [
        f"# medtl few-shot: {info.get('name', '')}",
        "",
        f"- data: {info['n_images']} images of {info['n_patients']} patients; patients per "
        "class: " + ", ".join(f"{k}={v}" for k, v in info["patients_per_class"].items()),
        f"- backbone: {info['backbone']} ({info['weights']}) against a randomly initialised copy",
        f"- classifier: {info['classifier']} ({info['classifier_description']}), on embeddings "
        "cached once per image",
        f"- episodes: {info['episodes']} per k, {info['ways']}-way; a shot is one patient (all "
        f"of its images); query: {info['query']}; support and query never share a patient",
        f"- quarantined (unreadable) images: {info['n_quarantined']}",
        "",
        f"| variant | k (patients per class) | episodes | AUROC ({ci}% CI) | accuracy ({ci}% CI) |",
        "|---|---:|---:|---|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.variant} | {r.k_shot} | {r.episodes} | {fmt_ci(r.auroc)} | {fmt_ci(r.accuracy)} |"
        )
    lines += ["", CI_NOTE, ""]
    return "\n".join(lines)


def write_episodic_report(
    out_dir: Path, result: EpisodicResult, info: Mapping[str, Any]
) -> tuple[Path, Path]:
    """``fewshot.json``, ``fewshot.md`` and ``episodes.csv`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "fewshot.json"
    js.write_text(json.dumps({"mode": "episodic", **info, **result.to_dict()}, indent=2))
    md = out_dir / "fewshot.md"
    md.write_text(episodic_markdown(result, info))
    pd.DataFrame(result.per_episode).to_csv(out_dir / "episodes.csv", index=False)
    return js, md


def write_fit_summary(
    out_dir: Path, info: Mapping[str, Any], headline: Mapping[str, float]
) -> tuple[Path, Path]:
    """``fewshot.json`` and ``fewshot.md`` of the support/query mode (the full clinical
    report of the query set is in ``query/``)."""
    js = out_dir / "fewshot.json"
    js.write_text(json.dumps({"mode": "support_query", **info, "query": dict(headline)}, indent=2))

    def cell(name: str) -> str:
        v, lo, hi = (headline.get(f"{name}{s}") for s in ("", "_ci_low", "_ci_high"))
        if v is None:
            return "n/a"
        return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")

    md = out_dir / "fewshot.md"
    md.write_text(
        "\n".join(
            [
                f"# medtl few-shot model: {info.get('name', '')}",
                "",
                f"- support: {info['support_images']} images of {info['support_patients']} "
                "patients; patients per class: "
                + ", ".join(f"{k}={v}" for k, v in info["support_patients_per_class"].items()),
                f"- query: {info['query_images']} images of {info['query_patients']} patients "
                "(no patient in both)",
                f"- classifier: {info['classifier']} ({info['classifier_description']}); "
                f"operating rule: {info['operating_rule']}",
                f"- model bundle: {info['bundle']}",
                "",
                "| query metric | value (patient-bootstrap 95% CI) |",
                "|---|---|",
                f"| AUROC | {cell('auroc')} |",
                f"| accuracy | {cell('accuracy')} |",
                "",
                "Full report of the query set: query/report.html.",
                "",
            ]
        )
    )
    return js, md
