"""Benchmark: how long a medtl process takes to exit once its work is done, with and without
the heap frozen at exit (``medtl.cli._exit_fast``: ``atexit.register(gc.freeze)``).

Each run is a fresh interpreter that imports what ``medtl prepare`` imports (torch, MONAI, the
jobs) and stops; the parent times from the child's last atexit hook (it prints a clock reading)
to the moment ``waitpid`` returns: the interpreter's own shutdown, which a user waits for after
every command. Arms alternate (frozen, not frozen, ...) so that drift in the machine's speed
hits both. Writes ``benchmarks/results/exit_time.{md,jsonl}``.

    python benchmarks/exit_time.py              # 5 runs per arm, about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# CLOCK_MONOTONIC is one clock for every process of the machine, so the child's reading and
# the parent's compare directly.
CHILD = """
import atexit, gc, sys, time
atexit.register(lambda: print("EXIT", time.monotonic(), flush=True))  # first in: runs last
if sys.argv[1] == "frozen":
    atexit.register(gc.freeze)  # as medtl.cli registers it: before the libraries' own hooks
import medtl.jobs.prepare_job
"""


def one_exit(arm: str) -> float:
    """Seconds from the child's last atexit hook to its end, for one fresh interpreter."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, arm], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = b""
    while not line.startswith(b"EXIT "):  # anything a library prints before it is skipped
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {arm} child ended without its exit line")
    last_hook = float(line.split()[1])
    os.waitpid(proc.pid, 0)
    return time.monotonic() - last_hook


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per arm")
    a = ap.parse_args()
    times: dict[str, list[float]] = {"frozen": [], "not frozen": []}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "exit_time.jsonl", "w") as raw:
        for i in range(a.runs):
            for arm in times:
                s = one_exit("frozen" if arm == "frozen" else "plain")
                times[arm].append(s)
                raw.write(json.dumps({"run": i, "arm": arm, "exit_s": s}) + "\n")
    med = {arm: statistics.median(v) for arm, v in times.items()}
    lines = [
        f"Exit time: {platform.platform(terse=True)}, {os.cpu_count()} cores, "
        f"{a.runs} runs per arm, after importing medtl.jobs.prepare_job",
        "",
        "| arm | median exit, s | runs, s |",
        "|---|---:|---|",
        *(
            f"| {arm} | {med[arm]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |"
            for arm, v in times.items()
        ),
        "",
        f"Frozen heap: {med['not frozen'] - med['frozen']:.2f} s less per command "
        f"({med['not frozen'] / med['frozen']:.1f}x faster exit).",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "exit_time.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
