"""What people look at, checked as they see it: a real run's report.html and its registered
model card (from the README quick start, see readme_quickstart.py) rendered in headless Chromium (Debian's `chromium`, installed by
scripts/system_deps.sh): every image decoded, nothing wider than the window or cut off at
desktop and at A4 print width, a screenshot that is not blank, and a PDF print.

The checks run in the page itself: a copy of the page gets a small script that measures the
layout after load and writes the result into the DOM, which ``--dump-dom`` prints.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from readme_quickstart import run_quickstart

ROOT = Path(__file__).parent.parent
DESKTOP, PRINT_WIDTH = 1280, 720  # px; A4 portrait minus Chromium's print margins is ~720
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # we run as root here and in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

# Runs after load; the JSON it leaves in <pre id="medtl-check"> is what the test reads.
CHECK_JS = r"""
window.addEventListener('load', () => {
  const vw = document.documentElement.clientWidth;
  const name = el => el.tagName.toLowerCase() + ': ' + (el.textContent || el.alt || '').trim().slice(0, 50);
  const scroller = el => {
    for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === 'auto' || o === 'scroll') return p;
    }
    return null;
  };
  const all = [...document.body.querySelectorAll('*')];
  const res = {
    viewport: vw,
    scrollWidth: document.documentElement.scrollWidth,
    images: document.images.length,
    broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    tables: document.querySelectorAll('table').length,
    wide: all.filter(el => el.getBoundingClientRect().right > vw + 1).map(name).slice(0, 10),
    cut: all.filter(el => ['hidden', 'clip'].includes(getComputedStyle(el).overflowX)
                          && el.scrollWidth > el.clientWidth + 1).map(name).slice(0, 10),
    scrolledTables: [...document.querySelectorAll('table')].filter(t => {
      const s = scroller(t); return s && s.scrollWidth > s.clientWidth + 1; }).map(name),
  };
  const pre = document.createElement('pre');
  pre.id = 'medtl-check';
  pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
"""


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "system_deps.sh")], timeout=900)
        found = shutil.which("chromium")
    if found is None:
        reason = "chromium is not installed (apt-get install chromium needs root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: scripts/system_deps.sh must install it)")
        pytest.skip(reason)
    return found


def _browse(page: Path, *args: str, width: int = DESKTOP, height: int = 900) -> str:
    """Chromium on ``page`` with a fresh profile; returns stdout (the DOM for --dump-dom)."""
    with tempfile.TemporaryDirectory(prefix="medtl-chromium-") as profile:
        p = subprocess.run(
            [
                _chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--virtual-time-budget=10000",
                *args,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _layout(page: Path, work: Path, width: int) -> dict:
    """The in-page checks of ``page`` at window ``width``."""
    probe = work / f"{page.stem}.probe.html"
    text = page.read_text()
    assert "</body>" in text
    probe.write_text(text.replace("</body>", f"<script>{CHECK_JS}</script></body>"))
    dom = _browse(probe, "--dump-dom", width=width)
    m = re.search(r'<pre id="medtl-check">(.*?)</pre>', dom, flags=re.S)
    assert m, "the check script did not run: " + dom[-500:]
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The README quick start's real run (demo data, gallery on, registered with the example
    card; shared with tests/test_readme.py): its report.html and the model card's HTML."""
    qs = run_quickstart(tmp_path_factory.getbasetemp())
    for cmd, p in qs.steps:
        assert p.returncode == 0, f"quick start: {' '.join(cmd)}\n{p.stderr[-2000:]}"
    import mlflow

    from medtl.tracking.store import make_client

    uri = f"sqlite:///{qs.cwd / 'mlflow.db'}"
    tag = make_client(uri).get_model_version("cxr-quickstart", "1").tags["medtl.model_card"]
    work = tmp_path_factory.mktemp("browser")
    card = mlflow.artifacts.download_artifacts(tag, dst_path=str(work), tracking_uri=uri)
    return {
        "report": qs.cwd / "runs" / "quickstart" / "report.html",
        "card": Path(card),
        "work": work,
    }


@pytest.mark.parametrize("which", ["report", "card"])
def test_page_renders_whole_at_desktop_and_print_width(pages, which):
    page = pages[which]
    for width in (DESKTOP, PRINT_WIDTH):
        res = _layout(page, pages["work"], width)
        assert res["viewport"] == width, res
        assert res["tables"] >= 5, res
        assert res["broken"] == [], res  # every <img> decoded
        assert res["scrollWidth"] <= width, res  # no horizontal scrolling of the page
        assert res["wide"] == [], res  # no element runs past the window
        assert res["cut"] == [], res  # no box hides overflowing content
        assert res["scrolledTables"] == [], res  # every table fits without scrolling
    if which == "report":
        assert res["images"] >= 5 + 4  # plots + gallery overlays
    else:
        assert res["images"] == 0  # the card is text only


@pytest.mark.parametrize("which", ["report", "card"])
def test_screenshot_is_not_blank_and_pdf_prints(pages, which):
    from PIL import Image

    page, work = pages[which], pages["work"]
    shot = work / f"{which}.png"
    _browse(page, f"--screenshot={shot}", height=1600)
    img = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
    assert img.size == (DESKTOP, 1600)
    dark = sum(img.histogram()[:200]) / (img.size[0] * img.size[1])
    assert dark > 0.005, f"screenshot of {which} is (almost) blank: {dark:.4f} dark pixels"

    pdf = work / f"{which}.pdf"
    _browse(page, f"--print-to-pdf={pdf}", "--no-pdf-header-footer")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    pages_n = len(re.findall(rb"/Type\s*/Page(?![s\w])", data))
    assert pages_n >= (3 if which == "report" else 2), pages_n
