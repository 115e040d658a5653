"""The report's document model (headings, paragraphs, lists, tables, images) and its two
renderers: Markdown linking the plots, and standalone HTML embedding them as base64."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Heading:
    """A title of level 1 to 3 (``#`` to ``###``, ``<h1>`` to ``<h3>``)."""

    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class BulletList:
    """An unordered list of plain-text items."""

    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    """A table; cells are shown with ``str``."""

    header: Sequence[Any]
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True)
class Image:
    """A PNG given by its path relative to the report folder."""

    path: str
    alt: str


Block = Heading | Paragraph | BulletList | Table | Image


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block) -> str:
    match block:
        case Heading(level, text):
            return "#" * level + " " + text
        case Paragraph(text):
            return text
        case BulletList(items):
            return "\n".join(f"- {item}" for item in items)
        case Table(header, rows):
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(_md_cell(x) for x in r) + " |" for r in rows]
            return "\n".join(lines)
        case Image(path, alt):
            return f"![{alt}]({path})"


def render_markdown(blocks: Sequence[Block]) -> str:
    """The blocks as Markdown; images link their files."""
    return "\n\n".join(_md_block(b) for b in blocks) + "\n"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left}th{background:#f0f0f0}
tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
p.note{color:#555}
.tbl{overflow-x:auto;max-width:100%}
@media print,(max-width:800px){body{margin:1em auto;padding:0 .5em}table{font-size:.78em}
th,td{padding:.2em .3em}}
@media print{.tbl{overflow:visible}img{break-inside:avoid}h2,h3{break-after:avoid}
tr{break-inside:avoid}}
"""
# Wide tables scroll in their own box on screen; at print width (and narrow windows) the
# compact rules above keep every column on the page (tests/test_browser_render.py checks it).


def _html_block(block: Block, out_dir: Path) -> str:
    esc = html.escape
    match block:
        case Heading(level, text):
            return f"<h{level}>{esc(text)}</h{level}>"
        case Paragraph(text):
            return f"<p>{esc(text)}</p>"
        case BulletList(items):
            return "<ul>" + "".join(f"<li>{esc(str(i))}</li>" for i in items) + "</ul>"
        case Table(header, rows):
            head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(str(x))}</td>" for x in r) + "</tr>" for r in rows
            )
            return (
                f'<div class="tbl"><table><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table></div>"
            )
        case Image(path, alt):
            data = base64.b64encode((out_dir / path).read_bytes()).decode("ascii")
            return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def render_html(blocks: Sequence[Block], out_dir: Path, title: str) -> str:
    """The blocks as one HTML file: inline CSS, images from ``out_dir`` embedded, no links."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(_html_block(b, out_dir) for b in blocks)
        + "\n</body></html>\n"
    )
