"""Benchmark: reading a large manifest and checking its table, without touching the images.

Writes a synthetic manifest of N rows (about two images per patient, paths with spaces and
non-ASCII characters, sites, a free-text note column) in two flavours:

* ``clean``: UTF-8, comma separated, LF line ends;
* ``excel``: what a spreadsheet export on a German Windows desktop gives: cp1252 text,
  ``;`` separators, decimal commas, CRLF line ends, 1% blank rows and 1% of notes holding a
  quoted line break.

and times, once each, in this process:

* ``read``: ``read_manifest`` (decoding, separator detection, blank rows, row origins, path
  resolution);
* ``table checks``: ``validate_manifest(check_files=False)``: every check that needs no file
  (empty cells, control characters in paths, duplicates, labels, patients across folds and
  test, summary) plus the table-only content hash;
* ``table hash``: ``manifest_content_hash(include_files=False)`` alone (part of the above);
* ``table + file checks`` (``--files``): ``validate_manifest(hash_files=False)``: the table
  checks plus one ``stat`` per row, on empty files created for the run (creation not
  timed). ``medtl train`` and ``medtl manifest validate`` also hash every file's bytes,
  which costs a full read of the data and is not measured here.

No file's bytes are hashed anywhere here. Prints Markdown, writes it to
``benchmarks/results/manifest_table.md`` and one JSON row per measurement to
``manifest_table.jsonl``.

    python benchmarks/manifest_table.py                   # N = 20,000 and 200,000, ~1 min
    python benchmarks/manifest_table.py --files           # also the stat pass (creates N files)
    python benchmarks/manifest_table.py --sizes 2000 --profile   # cProfile of the slow parts
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import os
import platform
import pstats
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"


def make_table(n: int, seed: int = 0) -> pd.DataFrame:
    """N manifest rows: ~2 images per patient, 3 sites, non-ASCII paths with spaces."""
    rng = np.random.default_rng(seed)
    patient = np.arange(n) // 2
    sites = np.array(["Zürich", "Genève", "Köln"])
    return pd.DataFrame(
        {
            "image": [
                f"Röntgen Bilder/Gruppe {p // 500:04d}/P{p:07d} Bild {i % 2}.dcm"
                for i, p in enumerate(patient)
            ],
            "label": np.where(rng.random(n) < 0.3, "nodule", "normal"),
            "patient_id": [f"P-{p:07d}" for p in patient],
            "study_id": [f"S-{p:07d}-{i % 2}" for i, p in enumerate(patient)],
            "site": sites[patient % 3],
            "sex": np.where(patient % 2 == 0, "F", "M"),
            "age": np.round(rng.uniform(20, 90, n), 1),
            "note": np.where(rng.random(n) < 0.05, "Befund unklar, Rücksprache", ""),
        }
    )


def write_clean(df: pd.DataFrame, path: Path) -> None:
    """UTF-8, comma separated."""
    df.to_csv(path, index=False)


def write_excel(df: pd.DataFrame, path: Path, seed: int = 0) -> None:
    """cp1252, ';', decimal commas, CRLF, 1% blank rows, 1% quoted line breaks in notes."""
    rng = np.random.default_rng(seed + 1)
    out = df.astype(str)
    out["age"] = out["age"].str.replace(".", ",", regex=False)
    broken = rng.random(len(df)) < 0.01
    out.loc[broken, "note"] = "erste Zeile\r\nzweite Zeile"
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=";", lineterminator="\r\n")
    writer.writerow(out.columns)
    blank = rng.random(len(df)) < 0.01
    empty = [""] * len(out.columns)
    for row, is_blank in zip(out.itertuples(index=False, name=None), blank, strict=True):
        writer.writerow(row)
        if is_blank:
            writer.writerow(empty)
    path.write_bytes(buf.getvalue().encode("cp1252"))


def make_files(df: pd.DataFrame, root: Path) -> None:
    """An empty file for every row's image (what the stat pass looks at)."""
    for folder in {str(Path(p).parent) for p in df["image"]}:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for p in df["image"]:
        (root / p).touch()


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and this process's CPU seconds (one run)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(path: Path, flavour: str, n: int, files: bool, profile: bool) -> list[dict]:
    """The timings of one manifest file."""
    import logging

    from medtl.manifest import manifest_content_hash, read_manifest, validate_manifest

    logging.getLogger("medtl").setLevel(logging.ERROR)  # the blank-row/encoding warnings
    stages: dict[str, Callable[[], Any]] = {}
    m, wall, cpu = timed(lambda: read_manifest(path))
    rows = [{"flavour": flavour, "n": n, "stage": "read", "wall_s": wall, "cpu_s": cpu}]
    stages["read"] = lambda: read_manifest(path)
    stages["table checks"] = lambda: validate_manifest(m, check_files=False)
    stages["table hash"] = lambda: manifest_content_hash(m, include_files=False)
    for stage in ("table checks", "table hash"):
        report, wall, cpu = timed(stages[stage])
        rows.append({"flavour": flavour, "n": n, "stage": stage, "wall_s": wall, "cpu_s": cpu})
        if stage == "table checks":
            assert report.ok, [str(e) for e in report.errors]
            assert report.summary["images"] == n
    if files:
        full = lambda: validate_manifest(m, hash_files=False)  # noqa: E731
        report, wall, cpu = timed(full)
        assert report.ok, [str(e) for e in report.errors][:3]
        stage = "table + file checks"
        rows.append({"flavour": flavour, "n": n, "stage": stage, "wall_s": wall, "cpu_s": cpu})
        stages[stage] = full
    if profile:
        for stage, fn in stages.items():
            prof = cProfile.Profile()
            prof.runcall(fn)
            print(f"\n--- profile: {flavour}, N={n:,}, {stage}")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(14)
    for r in rows:
        r["rows_per_s"] = n / max(r["wall_s"], 1e-9)
        r["load1"] = os.getloadavg()[0]
    return rows


def markdown(rows: list[dict], sizes: list[int], load: float) -> str:
    """The results table: wall seconds and rows/s per stage, flavour and N."""
    lines = [
        f"### Manifest table: read and checks without touching images (N = "
        f"{', '.join(f'{n:,}' for n in sizes)})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(1-minute load average {load:.1f} at the end), Python {platform.python_version()}, "
        f"pandas {pd.__version__}; one run per cell: wall seconds / CPU seconds of this "
        "process (rows per wall second). With the cores shared, wall time is up to ~3x the CPU "
        "time; the CPU time is what the code costs. "
        "`excel`: cp1252, `;`, decimal commas, CRLF, 1% blank rows, 1% quoted line breaks.",
        "",
        "| flavour | stage | " + " | ".join(f"N = {n:,}" for n in sizes) + " | CPU ratio |",
        "|---|---|" + "---:|" * (len(sizes) + 1),
    ]
    keys = list(dict.fromkeys((r["flavour"], r["stage"]) for r in rows))
    for flavour, stage in keys:
        cells = {r["n"]: r for r in rows if (r["flavour"], r["stage"]) == (flavour, stage)}
        shown = [
            f"{cells[n]['wall_s']:.2f} s / {cells[n]['cpu_s']:.2f} s ({cells[n]['rows_per_s']:,.0f}/s)"
            if n in cells
            else ""
            for n in sizes
        ]
        ratio = ""
        if sizes[0] in cells and sizes[-1] in cells and len(sizes) > 1:
            r = cells[sizes[-1]]["cpu_s"] / max(cells[sizes[0]]["cpu_s"], 1e-9)
            ratio = f"{r:.1f}x for {sizes[-1] / sizes[0]:.0f}x rows"
        lines.append(f"| {flavour} | {stage} | " + " | ".join(shown) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--files", action="store_true", help="also time the stat pass")
    parser.add_argument("--profile", action="store_true", help="print cProfile of each stage")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="medtl-manifest-bench-"))
    try:
        for n in args.sizes:
            df = make_table(n)
            folder = tmp / f"n{n}"
            folder.mkdir()
            if args.files:
                make_files(df, folder)
            for flavour, write in (("clean", write_clean), ("excel", write_excel)):
                path = folder / f"{flavour}.csv"
                write(df, path)
                rows += measure(path, flavour, n, args.files, args.profile)
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = markdown(rows, args.sizes, os.getloadavg()[0])
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "manifest_table.md").write_text(text)
        with open(RESULTS / "manifest_table.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
