"""Benchmark: mutants per second through ``medtl.io.load_image``, and the share of each
outcome (loaded, clean error, other), per source file type.

The seeded mutants of ``tests/fuzzing.py`` (imported by putting the tests folder on
``sys.path``) are loaded one after another in this process, on one core: no decoding pool,
so the rate is the reader's own. Outcomes: ``loaded``; ``clean error`` (``UnreadableImageError``);
``other`` (any other exception, ``BaseException`` included); ``hang`` (past ``--timeout-s``).
Writes benchmarks/results/reader_fuzz.md (tables) and reader_fuzz.jsonl (one row per file
type, then the run's totals).

    python benchmarks/reader_fuzz.py                     # 3,000 mutants, seed 1
    python benchmarks/reader_fuzz.py --mutants 500 --out benchmarks/results/reader_fuzz.smoke
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: no decoder or BLAS thread pools
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fuzzing  # noqa: E402 - tests/fuzzing.py, found through the line above

RESULTS = Path(__file__).parent / "results"
OUTCOMES = ("loaded", "clean error", "other", "hang")


class MutantTimeout(KeyboardInterrupt):
    """Raised by the alarm in a mutant that runs too long. It subclasses KeyboardInterrupt
    because the reader contract (and ``fuzzing.load_outcome``) let only KeyboardInterrupt
    and SystemExit through; anything else would be recorded as the file's error. Only a
    loop that comes back to Python can be stopped this way: a hang in native code would
    stall the run, which is why the fuzz test uses the decoding pool instead."""


def _alarm(signum, frame):
    raise MutantTimeout()


def run_one(m: fuzzing.Mutant, folder: Path, timeout_s: float) -> tuple[dict, float, float]:
    """Load ``m`` in process: (outcome dict, wall seconds, CPU seconds) of the load alone."""
    path = fuzzing.write(m, folder)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out = fuzzing.load_outcome({"image": str(path)})
    except MutantTimeout:
        out = {"outcome": "hang"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        path.unlink()
    return out, wall, cpu


def _label(out: dict) -> str:
    return {"unreadable": "clean error", "leak": "other"}.get(out["outcome"], out["outcome"])


def measure(seed: int, n: int, timeout_s: float) -> tuple[list[dict], list[dict]]:
    """Per-kind rows and the mutants whose outcome was ``other`` or ``hang``."""
    signal.signal(signal.SIGALRM, _alarm)
    by_kind: dict[str, dict] = {}
    odd: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="medtl-bench-fuzz-") as tmp:
        for m in fuzzing.mutants(seed, n):
            out, wall, cpu = run_one(m, Path(tmp), timeout_s)
            row = by_kind.setdefault(
                m.kind,
                {"kind": m.kind, "source": m.source, "mutants": 0, "wall_s": 0.0, "cpu_s": 0.0}
                | {k: 0 for k in OUTCOMES},
            )
            label = _label(out)
            row["mutants"] += 1
            row[label] += 1
            row["wall_s"] += wall
            row["cpu_s"] += cpu
            if label in ("other", "hang"):
                odd.append({"name": m.name, "detail": m.detail, **out})
    return list(by_kind.values()), odd


def _code_label() -> str:
    """Which readers ran: this checkout's commit (and whether medtl/io has edits on top), or
    the folder medtl was imported from when it is another copy (a before/after run)."""
    import medtl

    root = Path(__file__).resolve().parents[1]
    where = Path(medtl.__file__).resolve().parents[1]
    if where != root:
        return f"a copy of medtl at {where}"
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "medtl/io"], capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head.stdout.strip()}" + (
        " + uncommitted medtl/io edits" if dirty.stdout.strip() else ""
    )


def _share(key: str, row: dict) -> str:
    return f"{100 * row[key] / row['mutants']:.1f}%"


def render(rows: list[dict], odd: list[dict], a: argparse.Namespace, total: dict) -> str:
    """The Markdown tables: one row per file type, totals, and every ``other``/``hang``."""
    lines = [
        f"Reader fuzz: {total['mutants']:,} mutants of `tests/fuzzing.py` (seed {a.seed}), "
        f"loaded serially in one process through `medtl.io.load_image`; readers at "
        f"{total['code']}; {platform.machine()}, Python {platform.python_version()}, load "
        f"average {total['load_average']:.1f} at the start. Rates are mutants per second of "
        "the load alone (writing the file excluded), by CPU time and by wall time.",
        "",
        "| file type | source | mutants | loaded | clean error | other | hang | "
        "mutants/s (CPU) | mutants/s (wall) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in [*rows, total]:
        lines.append(
            f"| {r['kind']} | {r['source']} | {r['mutants']} | {_share('loaded', r)} | "
            f"{_share('clean error', r)} | {_share('other', r)} | {r['hang']} | "
            f"{r['mutants'] / max(r['cpu_s'], 1e-9):,.0f} | "
            f"{r['mutants'] / max(r['wall_s'], 1e-9):,.0f} |"
        )
    lines += ["", f"Outcomes other than loaded / clean error: {len(odd)}."]
    kinds = collections.Counter(o.get("type", o["outcome"]) for o in odd)
    if odd:
        lines += ["", "| exception | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in kinds.most_common()]
        lines += ["", "| mutant | edit | exception |", "|---|---|---|"]
        for o in odd:
            msg = o.get("msg", "").replace("|", "\\|").replace("\n", " ")[:120]
            lines.append(f"| {o['name']} | {o['detail']} | {o.get('type', 'hang')}: {msg} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=30.0, help="per mutant")
    ap.add_argument("--out", default=str(RESULTS / "reader_fuzz"), help="path without .md/.jsonl")
    ap.add_argument("--label", default="", help="names the readers measured (default: the commit)")
    a = ap.parse_args()

    load = os.getloadavg()[0]
    rows, odd = measure(a.seed, a.mutants, a.timeout_s)
    total = {
        "kind": "**all**",
        "source": "",
        "code": a.label or _code_label(),
        "load_average": load,
    }
    for key in ("mutants", "wall_s", "cpu_s", *OUTCOMES):
        total[key] = sum(r[key] for r in rows)
    md, jsonl = Path(f"{a.out}.md"), Path(f"{a.out}.jsonl")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(render(rows, odd, a, total))
    with open(jsonl, "w") as f:
        for r in [*rows, {**total, "kind": "all", "seed": a.seed, "others": odd}]:
            f.write(json.dumps(r) + "\n")
    print(md.read_text())


if __name__ == "__main__":
    main()
