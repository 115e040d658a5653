"""Model card for a registered model version: Markdown and self-contained HTML from one outline.

The card covers what TRIPOD+AI asks a reviewer to see: intended use and population, data
sources and dates, participants and counts, outcome definition, missing and quarantined data,
discrimination and calibration with confidence intervals, subgroups with intervals, and
limitations. What only people know comes from the pipeline's ``card:`` section or
``medtl register --card``; the numbers come from the run (metrics, lineage, quarantine). Every
item nobody supplied is listed plainly as "not yet known", never filled with boilerplate. The
card is built from run-level facts only, so it never sees patient-level values.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CARD_ITEMS",
    "DEFAULT_INTENDED_USE",
    "DEFAULT_LIMITATIONS",
    "build_model_card",
    "format_metric",
    "group_metrics",
    "not_yet_known",
    "summary_metrics",
]

# A standing restriction shown with every card, beside (never instead of) the stated use.
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
    "The operating threshold was chosen on validation data; a different disease prevalence "
    "or image source may need a new threshold.",
    "Not a cleared medical device.",
)

# The card items people supply: key in CardConfig -> what the card calls it.
CARD_ITEMS: dict[str, str] = {
    "intended_use": "intended use",
    "intended_users": "intended users",
    "target_population": "target population",
    "contraindications": "contraindications",
    "outcome_definition": "outcome definition",
    "reference_standard": "reference standard (how labels were established)",
    "data_sources": "data sources",
    "data_dates": "data collection dates",
    "eligibility": "eligibility criteria",
    "missing_data": "handling of missing data",
    "known_limitations": "known limitations",
    "contact": "contact",
}

# Metrics of the pooled summary, by the TRIPOD+AI heading they answer.
_DISCRIMINATION = ("auroc", "auprc")
_CALIBRATION = ("ece", "brier")
_SUBGROUP_METRICS = ("auroc", "sensitivity", "specificity", "ece")

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

Block = tuple[Any, ...]  # ("p" | "h3", text) | ("ul", items) | ("table", headers, rows)
Section = tuple[str, list[Block]]


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


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """A ``metrics.json`` summary (``{metric: {value, low, high}}``) in ``group_metrics`` form."""
    out: dict[str, dict[str, float | None]] = {}
    for name, e in summary.items():
        if isinstance(e, Mapping) and isinstance(e.get("value"), int | float):
            lo, hi = e.get("low"), e.get("high")
            out[name] = {
                "value": float(e["value"]),
                "ci_low": float(lo) if isinstance(lo, int | float) else None,
                "ci_high": float(hi) if isinstance(hi, int | float) else None,
            }
    return out


def format_metric(m: Mapping[str, Any], digits: int = 3) -> str:
    """``0.912 (0.850 to 0.960)``; the value alone when there is no interval."""
    v = m.get("value")
    s = "n/a" if v is None else f"{v:.{digits}f}"
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        s += f" ({m['ci_low']:.{digits}f} to {m['ci_high']:.{digits}f})"
    return s


def not_yet_known(card: Mapping[str, Any]) -> list[str]:
    """The card items nobody supplied (empty strings and lists count as not supplied)."""
    return [label for key, label in CARD_ITEMS.items() if not card.get(key)]


def _unknown(label: str, key: str) -> str:
    return (
        f"Not yet known: {label}. Nobody has stated it; set card.{key} in the pipeline or in "
        "the file given to medtl register --card."
    )


def _stated(card: Mapping[str, Any], key: str) -> list[Block]:
    """The item as a paragraph (text) or list (several entries), or its "not yet known" line."""
    v = card.get(key)
    if not v:
        return [("p", _unknown(CARD_ITEMS[key], key))]
    if isinstance(v, str):
        return [("p", v)]
    return [("ul", [str(x) for x in v])]


def _flat_numbers(d: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(_flat_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, int | float) and not isinstance(d, bool):
        out[prefix] = float(d)
    return out


def _subgroup_rows(subgroups: Any) -> list[list[str]]:
    """Rows ``[group, level, metric, value (CI)]``: from ``metrics.json`` subgroup blocks
    (headline metrics, level shown with its counts) or from flat ``metric_ci_low`` mappings."""
    rows: list[list[str]] = []
    if not isinstance(subgroups, Mapping):
        return rows
    for group, levels in subgroups.items():
        if not isinstance(levels, Mapping):
            continue
        for level, res in levels.items():
            if not isinstance(res, Mapping):
                continue
            name = str(level)
            if isinstance(res.get("summary"), Mapping):
                grouped = summary_metrics(res["summary"])
                grouped = {k: grouped[k] for k in _SUBGROUP_METRICS if k in grouped}
                if "n" in res:
                    name += f" ({res['n']} images, {res.get('n_patients', '?')} patients)"
            else:
                grouped = group_metrics(_flat_numbers(res))
            for metric, m in grouped.items():
                rows.append([str(group), name, metric, format_metric(m)])
    return rows


def _model_section(info: Mapping[str, Any]) -> Section:
    card = info.get("card") or {}
    rows = [
        ["Task", str(info.get("task", "unknown"))],
        ["Classes", ", ".join(map(str, info.get("classes", [])))],
        ["Backbone", str(info.get("backbone", "unknown"))],
        ["Transfer strategy", str(info.get("strategy", "unknown"))],
        ["Created", str(info.get("created", ""))],
        ["Contact", str(card.get("contact") or "not yet known")],
    ]
    text = info.get("description") or "Image classifier trained with medtl (transfer learning)."
    return "Model", [("p", text), ("table", ["Field", "Value"], rows)]


def _intended_use_section(card: Mapping[str, Any]) -> Section:
    blocks: list[Block] = _stated(card, "intended_use")
    for key, head in (
        ("intended_users", "Intended users"),
        ("target_population", "Target population"),
        ("contraindications", "Contraindications (do not use)"),
    ):
        blocks += [("h3", head), *_stated(card, key)]
    blocks.append(("p", f"Always applies: {DEFAULT_INTENDED_USE}"))
    return "Intended use", blocks


def _sources_section(info: Mapping[str, Any]) -> Section:
    card = info.get("card") or {}
    blocks: list[Block] = [("h3", "Data sources"), *_stated(card, "data_sources")]
    blocks += [("h3", "Dates"), *_stated(card, "data_dates")]
    blocks += [("h3", "Eligibility"), *_stated(card, "eligibility")]
    digest = (info.get("lineage") or {}).get("medtl.manifest_hash")
    if digest:
        blocks.append(("p", f"Training manifest sha256 (content hash): {digest}."))
    return "Data sources and dates", blocks


def _outcome_section(info: Mapping[str, Any]) -> Section:
    card = info.get("card") or {}
    blocks: list[Block] = list(_stated(card, "outcome_definition"))
    blocks += [("h3", "Reference standard"), *_stated(card, "reference_standard")]
    classes = ", ".join(map(str, info.get("classes", [])))
    if classes:
        blocks.append(("p", f"Model output classes (positive class last): {classes}."))
    return "Outcome", blocks


def _participants_section(info: Mapping[str, Any]) -> Section:
    """Participants and counts: patients, studies, images per class, sites."""
    data = dict(info.get("data") or {})
    data.update({k: v for k, v in (info.get("participants") or {}).items() if v is not None})
    rows: list[list[str]] = []
    for key in ("patients", "studies", "images"):
        if data.get(key) is not None:
            rows.append([key, str(data[key])])
    for cls, n in (data.get("patients_per_class") or {}).items():
        rows.append([f"patients with {cls}", str(n)])
    for cls, n in (data.get("class_counts") or {}).items():
        rows.append([f"images labelled {cls}", str(n)])
    for site, n in (data.get("sites") or {}).items():
        rows.append([f"images from site {site}", str(n)])
    known = {"patients", "studies", "images", "patients_per_class", "class_counts", "sites"}
    rows += [[k, str(v)] for k, v in data.items() if k not in known and not isinstance(v, dict)]
    blocks: list[Block] = [
        ("p", "Counts only; no patient-level information is part of this card."),
        ("table", ["Quantity", "Value"], rows or [["(not recorded)", ""]]),
    ]
    return "Training data", blocks


def _missing_section(info: Mapping[str, Any]) -> Section:
    """Quarantined images (unreadable, left out) by label and site, and how missing data
    was handled."""
    q = info.get("quarantine")
    blocks: list[Block] = []
    if not isinstance(q, Mapping):
        blocks.append(("p", "Not yet known: quarantined images (the run recorded no list)."))
    else:
        n, listed = int(q.get("n", 0)), q.get("listed")
        of = f" of {listed} listed" if listed else ""
        blocks.append(("p", f"{n}{of} images could not be read and were left out (quarantine)."))
        rows = [
            [col, str(value), f"{c.get('quarantined', 0)} of {c.get('total', 0)}"]
            for col, table in (q.get("by") or {}).items()
            for value, c in table.items()
            if isinstance(c, Mapping)
        ]
        if n and rows:
            blocks.append(("table", ["Column", "Value", "Quarantined"], rows))
    blocks += [("h3", "Handling of missing data"), *_stated(info.get("card") or {}, "missing_data")]
    return "Missing and quarantined data", blocks


def _performance_section(info: Mapping[str, Any]) -> Section:
    """Discrimination and calibration with CIs, then the threshold-dependent metrics."""
    metrics: Mapping[str, Mapping[str, Any]] = info.get("performance") or info.get("metrics") or {}
    ci = info.get("ci", 0.95)
    boot = info.get("n_boot")
    how = f"{boot} patient-level bootstrap resamples" if boot else "patient-level bootstrap"
    blocks: list[Block] = [
        ("p", f"Pooled out-of-fold estimates with {ci:.0%} confidence intervals ({how})."),
    ]
    groups = (
        ("Discrimination", _DISCRIMINATION),
        ("Calibration (after recalibration)", _CALIBRATION),
    )
    for head, names in groups:
        rows = [[k, format_metric(metrics[k])] for k in names if k in metrics]
        blocks.append(("h3", head))
        blocks.append(
            ("table", ["Metric", "Value (CI)"], rows)
            if rows
            else ("p", f"Not yet known: {head.split(' ')[0].lower()} (no such metric logged).")
        )
    before = info.get("calibration_before") or {}
    if before:
        rows = [[k, format_metric(m)] for k, m in before.items()]
        blocks += [
            ("h3", "Calibration before recalibration"),
            ("table", ["Metric", "Value (CI)"], rows),
        ]
    shown = set(_DISCRIMINATION + _CALIBRATION)
    rest = [[k, format_metric(m)] for k, m in metrics.items() if k not in shown]
    blocks.append(("h3", "At the operating threshold, and other metrics"))
    blocks.append(("table", ["Metric", "Value (CI)"], rest or [["(none logged)", ""]]))
    return "Performance", blocks


def _subgroup_section(info: Mapping[str, Any]) -> Section:
    srows = _subgroup_rows(info.get("subgroups"))
    blocks: list[Block] = (
        [("table", ["Subgroup", "Level", "Metric", "Value (CI)"], srows)]
        if srows
        else [("p", "No subgroup results were recorded: subgroup performance is not yet known.")]
    )
    missing = info.get("subgroups_missing") or []
    if missing:
        blocks.append(("p", f"Subgroup columns not in the data: {', '.join(map(str, missing))}."))
    return "Subgroup results", blocks


def _adaptation_section(info: Mapping[str, Any]) -> Section | None:
    """The target site a domain-adapted model was adapted to, and how it did there."""
    t = info.get("target")
    if not t:
        return None
    blocks: list[Block] = [
        (
            "p",
            f"Adapted with '{t.get('method')}' to a target site: manifest "
            f"{t.get('manifest')} (sha256 {t.get('manifest_sha256')}), {t.get('n_images')} "
            f"images of {t.get('n_patients')} patients, {t.get('n_quarantined')} quarantined.",
        )
    ]
    rows = [
        [arm, format_metric(summary_metrics(t[arm]["summary"]).get("auroc") or {})]
        for arm in ("before", "after")
        if t.get(arm)
    ]
    if rows:
        blocks.append(("table", ["Target site", "AUROC (CI)"], rows))
    else:
        blocks.append(
            ("p", "The target manifest had no labels: target performance is not yet known.")
        )
    blocks.append(("p", str(t.get("note", ""))))
    return "Domain adaptation", blocks


def _threshold_section(info: Mapping[str, Any]) -> Section:
    how = info.get("threshold_method") or "not recorded"
    where = info.get("threshold_source") or (
        "each fold's on the other folds' out-of-fold predictions, the final model's on all of "
        "them pooled"
    )
    return "Operating threshold", [
        ("p", f"Threshold(s): {json.dumps(info.get('threshold'))}."),
        ("p", f"Chosen by the '{how}' rule on held-out predictions: {where}."),
    ]


def _run_limitations(info: Mapping[str, Any]) -> list[str]:
    """Limitations that follow from what the run did (sites, size, selection, quarantine)."""
    notes: list[str] = []
    part = {**(info.get("data") or {}), **(info.get("participants") or {})}
    sites = part.get("sites") or {}
    if len(sites) == 1:
        notes.append("All training images come from one site: other sites are untested.")
    n = part.get("patients")
    if n is not None and str(n).isdigit() and int(n) < 100:
        notes.append(f"Only {n} patients: every interval is wide.")
    if info.get("selection") == "outer":
        notes.append(
            "Epochs were chosen on the reported folds (cv.selection=outer): metrics are optimistic."
        )
    q = info.get("quarantine") or {}
    if q.get("n"):
        notes.append(f"{q['n']} images were unreadable and left out; see the quarantine above.")
    return notes


def _limitations_section(info: Mapping[str, Any]) -> Section:
    card = info.get("card") or {}
    stated = [str(x) for x in card.get("known_limitations") or info.get("limitations") or []]
    blocks: list[Block] = (
        [("p", "Stated by the model's owners:"), ("ul", stated)]
        if stated
        else [("p", _unknown(CARD_ITEMS["known_limitations"], "known_limitations"))]
    )
    blocks += [("p", "From this run and in general:")]
    blocks.append(("ul", _run_limitations(info) + list(DEFAULT_LIMITATIONS)))
    return "Limitations", blocks


def _outline(info: Mapping[str, Any]) -> tuple[str, list[Section]]:
    name = info.get("name", "medtl model")
    version = info.get("version")
    title = f"Model card: {name}" + (f" version {version}" if version else "")
    card = dict(info.get("card") or {})
    if info.get("intended_use") and not card.get("intended_use"):
        card["intended_use"] = info["intended_use"]
    if info.get("limitations") and not card.get("known_limitations"):
        card["known_limitations"] = list(info["limitations"])
    info = {**info, "card": card}
    lineage = info.get("lineage") or {}
    unknown = not_yet_known(card)
    sections: list[Section] = [
        _model_section(info),
        (
            "Not yet known",
            [("p", "Items of the card that nobody has supplied yet:"), ("ul", unknown)]
            if unknown
            else [("p", "Every item of the card has been supplied.")],
        ),
        _intended_use_section(card),
        _sources_section(info),
        _outcome_section(info),
        _participants_section(info),
        _missing_section(info),
        _performance_section(info),
        _subgroup_section(info),
        *[sec for sec in (_adaptation_section(info),) if sec is not None],
        _threshold_section(info),
        _limitations_section(info),
        (
            "Lineage",
            [("table", ["Tag", "Value"], [[k, str(v)] for k, v in sorted(lineage.items())])],
        ),
    ]
    return title, sections


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _to_markdown(title: str, sections: Sequence[Section]) -> str:
    out = [f"# {title}", ""]
    for head, blocks in sections:
        out += [f"## {head}", ""]
        for block in blocks:
            if block[0] == "p":
                out += [block[1], ""]
            elif block[0] == "h3":
                out += [f"### {block[1]}", ""]
            elif block[0] == "ul":
                out += [f"- {item}" for item in block[1]] + [""]
            else:
                _, headers, rows = block
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "---|" * len(headers))
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                out.append("")
    return "\n".join(out)


# Tables sit in a scrolling box on screen; long values (hashes, run ids) wrap anywhere, and
# print keeps every column on the page.
_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
    "color:#222;line-height:1.4}.tbl{overflow-x:auto;max-width:100%}"
    "table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;"
    "padding:.3rem .6rem;text-align:left;vertical-align:top;overflow-wrap:anywhere}"
    "th{background:#f3f3f3}h2{border-bottom:1px solid #ddd}"
    "@media print{body{margin:0;max-width:none;font-size:10pt}.tbl{overflow:visible}"
    "h2{break-after:avoid}tr{break-inside:avoid}}"
)


def _to_html(title: str, sections: Sequence[Section]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for head, blocks in sections:
        out.append(f"<h2>{e(head)}</h2>")
        for block in blocks:
            if block[0] == "p":
                out.append(f"<p>{e(block[1])}</p>")
            elif block[0] == "h3":
                out.append(f"<h3>{e(block[1])}</h3>")
            elif block[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in block[1]) + "</ul>")
            else:
                _, headers, rows = block
                out.append('<div class="tbl"><table><thead><tr>')
                out.append("".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>")
                for r in rows:
                    out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>")
                out.append("</tbody></table></div>")
    out.append("</body></html>")
    return "\n".join(out)


def build_model_card(info: Mapping[str, Any]) -> tuple[str, str]:
    """``(markdown, html)`` of the model card; HTML is self-contained (inline CSS, no links).

    ``info`` keys (all optional): name, version, description, task, classes, backbone,
    strategy, created, card (``CardConfig`` fields), data and participants (counts), quarantine
    (``{n, listed, by}``), performance (the pooled summary; else metrics) and calibration_before
    (``group_metrics`` form), ci, n_boot,
    subgroups (``{group: {level: metrics}}``), subgroups_missing, threshold, threshold_method,
    threshold_source, selection, lineage; intended_use and limitations are older spellings of
    the card's intended_use and known_limitations.
    """
    title, sections = _outline(info)
    return _to_markdown(title, sections), _to_html(title, sections)
