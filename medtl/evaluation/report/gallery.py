"""The report's case gallery: the most confident out-of-fold cases of each confusion-matrix
cell, with Grad-CAM overlays, from ``run_info["gallery"]`` (written by
:func:`medtl.evaluation.gallery.write_gallery`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medtl.evaluation.report.blocks import Block, Heading, Image, Paragraph, Table

if TYPE_CHECKING:  # sections.py imports this module: no run-time import back
    from medtl.evaluation.report.sections import ReportContext

# The cells of medtl.evaluation.gallery.CELLS, in order, as the report names them.
CELL_TITLES = {
    "TP": "True positives (highest probability)",
    "FP": "False positives (highest probability)",
    "FN": "False negatives (lowest probability)",
    "TN": "True negatives (lowest probability)",
}


def _intro(positive: str) -> str:
    return (
        "The most confident out-of-fold cases of each confusion-matrix cell at each fold's "
        f"operating threshold. Each image is shown as its fold's model saw it (after "
        f"preprocessing), beside a Grad-CAM map for '{positive}' from that fold's model, which "
        "never saw the patient. Grad-CAM shows where the evidence for the class lies, not "
        "whether the reasoning is right. Images can carry burned-in identifiers: review "
        "before sharing this report."
    )


def _cell_blocks(cell: str, items: list[Mapping[str, Any]], ctx: ReportContext) -> list[Block]:
    """Heading, table and overlays of one cell (a note when it has no cases)."""
    blocks: list[Block] = [Heading(3, CELL_TITLES[cell])]
    if not items:
        return blocks + [Paragraph("No out-of-fold case in this cell.")]
    rows = [
        [it.get("rank", i + 1), it["image"], it["patient_id"], it["fold"], f"{it['prob']:.3f}"]
        for i, it in enumerate(items)
    ]
    blocks.append(Table(["#", "image", "patient", "fold", "probability"], rows))
    for i, it in enumerate(items):
        alt = f"{cell} {it.get('rank', i + 1)}: image and Grad-CAM overlay"
        if (ctx.out_dir / it["png"]).is_file():
            blocks.append(Image(it["png"], alt))
        else:
            blocks.append(Paragraph(f"{alt}: overlay file {it['png']} is missing."))
    return blocks


def gallery_section(ctx: ReportContext) -> list[Block]:
    """Per cell (TP, FP, FN, TN): the cases' image, patient, fold, probability and overlays."""
    items = list(ctx.run_info.get("gallery") or [])
    if not items:
        return []
    positive = ctx.classes[-1] if ctx.classes else "positive"
    blocks: list[Block] = [Heading(2, "Case gallery (out-of-fold)"), Paragraph(_intro(positive))]
    for cell in CELL_TITLES:
        blocks += _cell_blocks(cell, [it for it in items if it.get("cell") == cell], ctx)
    return blocks
