"""Model card for a registered model version: Markdown and self-contained HTML from one outline.

Sections: intended use, data (counts only), metrics with confidence intervals, subgroup
results, operating threshold and how it was chosen, limitations, lineage. The card is built
from MLflow run data and the bundle's metadata, so it never sees patient-level values.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_INTENDED_USE",
    "DEFAULT_LIMITATIONS",
    "build_model_card",
    "format_metric",
    "group_metrics",
]

DEFAULT_INTENDED_USE = (
    "Research and clinical decision support only; not for autonomous diagnosis. Every output "
    "must be reviewed by a qualified clinician before it informs patient care."
)
DEFAULT_LIMITATIONS = (
    "Performance was estimated on the training institution's data by patient-grouped "
    "cross-validation; other sites, scanners, protocols or populations need local evaluation "
    "before use.",
    "Confidence intervals come from a patient-level bootstrap; small subgroups have wide "
    "intervals and may be missing.",
    "The operating threshold was chosen on validation folds; a different disease prevalence "
    "or image source may need a new threshold.",
    "Not a cleared medical device.",
)

# (low, high) suffix pairs that evaluation code and MLflow metric flattening produce.
_CI_SUFFIXES = (
    ("_ci_low", "_ci_high"),
    (".ci_low", ".ci_high"),
    (".ci.low", ".ci.high"),
    (".lower", ".upper"),
    ("_lower", "_upper"),
    (".low", ".high"),
    ("_low", "_high"),
)
_VALUE_SUFFIXES = (".value", ".point", ".estimate", ".mean")


def group_metrics(flat: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
    """``{"auroc": .9, "auroc_ci_low": .8, ...}`` -> ``{"auroc": {value, ci_low, ci_high}}``."""
    out: dict[str, dict[str, float | None]] = {}
    used: set[str] = set()
    for key in sorted(flat):
        for lo, hi in _CI_SUFFIXES:
            if key.endswith(lo) and key.removesuffix(lo) + hi in flat:
                base = key.removesuffix(lo)
                entry = out.setdefault(base, {"value": None, "ci_low": None, "ci_high": None})
                entry["ci_low"] = float(flat[key])
                entry["ci_high"] = float(flat[base + hi])
                used.update({key, base + hi})
                break
    for key in sorted(flat):
        if key in used:
            continue
        base = key
        for suf in _VALUE_SUFFIXES:
            if key.endswith(suf):
                base = key.removesuffix(suf)
                break
        entry = out.setdefault(base, {"value": None, "ci_low": None, "ci_high": None})
        entry["value"] = float(flat[key])
    return dict(sorted(out.items()))


def format_metric(m: Mapping[str, Any], digits: int = 3) -> str:
    """``0.912 (0.850 to 0.960)``; the value alone when there is no interval."""
    v = m.get("value")
    s = "n/a" if v is None else f"{v:.{digits}f}"
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        s += f" ({m['ci_low']:.{digits}f} to {m['ci_high']:.{digits}f})"
    return s


def _flat_numbers(d: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(_flat_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, int | float) and not isinstance(d, bool):
        out[prefix] = float(d)
    return out


def _subgroup_rows(subgroups: Any) -> list[list[str]]:
    """Rows ``[group, level, metric, value (CI)]`` from nested subgroup results."""
    rows: list[list[str]] = []
    if not isinstance(subgroups, Mapping):
        return rows
    for group, levels in subgroups.items():
        if not isinstance(levels, Mapping):
            continue
        for level, res in levels.items():
            grouped = group_metrics(_flat_numbers(res))
            for metric, m in grouped.items():
                rows.append([str(group), str(level), metric, format_metric(m)])
    return rows


def _outline(info: Mapping[str, Any]) -> tuple[str, list[tuple[str, list[tuple]]]]:
    name = info.get("name", "medtl model")
    version = info.get("version")
    title = f"Model card: {name}" + (f" version {version}" if version else "")
    sections: list[tuple[str, list[tuple]]] = []

    summary = [
        (
            "p",
            info.get("description") or "Image classifier trained with medtl (transfer learning).",
        ),
        (
            "table",
            ["Field", "Value"],
            [
                ["Task", str(info.get("task", "unknown"))],
                ["Classes", ", ".join(map(str, info.get("classes", [])))],
                ["Backbone", str(info.get("backbone", "unknown"))],
                ["Transfer strategy", str(info.get("strategy", "unknown"))],
                ["Created", str(info.get("created", ""))],
            ],
        ),
    ]
    sections.append(("Model", summary))
    sections.append(("Intended use", [("p", info.get("intended_use") or DEFAULT_INTENDED_USE)]))

    data = info.get("data") or {}
    rows = [[k, str(v)] for k, v in data.items() if k != "class_counts"]
    for cls, n in (data.get("class_counts") or {}).items():
        rows.append([f"images labelled {cls}", str(n)])
    sections.append(
        (
            "Training data",
            [
                ("p", "Counts only; no patient-level information is part of this card."),
                ("table", ["Quantity", "Value"], rows or [["(not recorded)", ""]]),
            ],
        )
    )

    metrics = info.get("metrics") or {}
    ci = info.get("ci", 0.95)
    mrows = [[k, format_metric(m)] for k, m in metrics.items()]
    sections.append(
        (
            "Performance",
            [
                (
                    "p",
                    f"Pooled out-of-fold estimates with {ci:.0%} confidence intervals "
                    "(patient-level bootstrap).",
                ),
                ("table", ["Metric", "Value (CI)"], mrows or [["(none logged)", ""]]),
            ],
        )
    )
    srows = _subgroup_rows(info.get("subgroups"))
    sections.append(
        (
            "Subgroup results",
            [("table", ["Subgroup", "Level", "Metric", "Value (CI)"], srows)]
            if srows
            else [("p", "No subgroup results were recorded.")],
        )
    )

    thr = info.get("threshold")
    how = info.get("threshold_method") or "not recorded"
    sections.append(
        (
            "Operating threshold",
            [
                ("p", f"Threshold(s): {json.dumps(thr)}."),
                (
                    "p",
                    f"Chosen by the '{how}' rule on held-out predictions: each fold's on the other "
                    "folds' out-of-fold predictions, the final model's on all of them pooled.",
                ),
            ],
        )
    )
    sections.append(("Limitations", [("ul", list(info.get("limitations") or DEFAULT_LIMITATIONS))]))
    lineage = info.get("lineage") or {}
    sections.append(
        (
            "Lineage",
            [("table", ["Tag", "Value"], [[k, str(v)] for k, v in sorted(lineage.items())])],
        )
    )
    return title, sections


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _to_markdown(title: str, sections: list[tuple[str, list[tuple]]]) -> str:
    out = [f"# {title}", ""]
    for head, blocks in sections:
        out += [f"## {head}", ""]
        for block in blocks:
            if block[0] == "p":
                out += [block[1], ""]
            elif block[0] == "ul":
                out += [f"- {item}" for item in block[1]] + [""]
            else:
                _, headers, rows = block
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "---|" * len(headers))
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                out.append("")
    return "\n".join(out)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
    "color:#222}table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;"
    "padding:.3rem .6rem;text-align:left}th{background:#f3f3f3}h2{border-bottom:1px solid #ddd}"
)


def _to_html(title: str, sections: list[tuple[str, list[tuple]]]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for head, blocks in sections:
        out.append(f"<h2>{e(head)}</h2>")
        for block in blocks:
            if block[0] == "p":
                out.append(f"<p>{e(block[1])}</p>")
            elif block[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in block[1]) + "</ul>")
            else:
                _, headers, rows = block
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>")
                for r in rows:
                    out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>")
                out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def build_model_card(info: Mapping[str, Any]) -> tuple[str, str]:
    """``(markdown, html)`` of the model card; HTML is self-contained (inline CSS, no links).

    ``info`` keys (all optional): name, version, description, intended_use, task, classes,
    backbone, strategy, created, data (counts), metrics (``group_metrics`` output), ci,
    subgroups (``{group: {level: metrics}}``), threshold, threshold_method, limitations,
    lineage.
    """
    title, sections = _outline(info)
    return _to_markdown(title, sections), _to_html(title, sections)
