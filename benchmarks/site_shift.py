"""Benchmark: the demo's shifted site C before and after AdaBN.

Fine-tunes the default backbone on the demo's source sites (A+B) with the configuration the
adaptation tests use (``tests/adapt_helpers.py::DEMO_ADAPT_TEST_CONFIG``, data
``DEMO_ADAPT_DATA``), then scores the source validation patients, site C without adaptation,
and site C after AdaBN (BatchNorm statistics re-estimated on site C's unlabelled images).
AUROCs carry patient-bootstrap CIs (``medtl.evaluation.metrics.bootstrap_ci``); the AdaBN
change has a paired patient-bootstrap CI and the clustered DeLong p-value. Writes
benchmarks/results/site_shift.md and site_shift.jsonl (one row per seed).

    python benchmarks/site_shift.py                # the tests' seed (0): about 1-3 minutes of CPU
    python benchmarks/site_shift.py --seeds 0,1,2   # how much the seed moves the numbers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the one definition of the tests' config and data

N_BOOT = 1000


def _auroc_ci(y: np.ndarray, p: np.ndarray, patients: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from medtl.evaluation.metrics import bootstrap_ci

    def metric(yy: np.ndarray, pp: np.ndarray) -> float | None:
        return float(roc_auc_score(yy, pp)) if len(np.unique(yy)) == 2 else None

    low, high = bootstrap_ci(metric, y, p, patients, N_BOOT)
    return {
        "value": float(roc_auc_score(y, p)),
        "low": low,
        "high": high,
        "n_images": len(y),
        "n_patients": len(set(patients.tolist())),
    }


def run_seed(seed: int, work: Path) -> dict[str, Any]:
    """One source model (training seed ``seed``) and its three scores."""
    from adapt_helpers import DEMO_ADAPT_DATA, adabn_model, scores, train_source_model

    from medtl.demo_data import make_demo_data
    from medtl.evaluation.paired import compare_aurocs

    demo = make_demo_data(work / "demo", **DEMO_ADAPT_DATA)
    t0 = time.perf_counter()
    src = train_source_model(demo, work / f"seed{seed}", [f"seed={seed}"])
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    adapted = adabn_model(src)
    adabn_s = time.perf_counter() - t1
    y_s, p_s, g_s = scores(src.model, src.source_val, src.cfg)
    y_t, p_before, g_t = scores(src.model, src.target, src.cfg)
    _, p_after, _ = scores(adapted, src.target, src.cfg)
    diff = compare_aurocs(y_t, p_after, p_before, g_t, N_BOOT)
    return {
        "seed": seed,
        "data": DEMO_ADAPT_DATA,
        "source_val": _auroc_ci(y_s, p_s, g_s),
        "target_before": _auroc_ci(y_t, p_before, g_t),
        "target_adabn": _auroc_ci(y_t, p_after, g_t),
        "adabn_minus_before": {
            "value": diff.diff,
            "low": diff.bootstrap_ci[0],
            "high": diff.bootstrap_ci[1],
            "delong_p": diff.delong_p,
        },
        "n_source_train_images": len(src.source_train),
        "train_seconds": round(train_s, 1),
        "adabn_seconds": round(adabn_s, 1),
    }


def _ci(e: dict[str, Any]) -> str:
    lo, hi = e.get("low"), e.get("high")
    return f"{e['value']:.3f} ({lo:.3f}–{hi:.3f})" if lo is not None else f"{e['value']:.3f}"


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    """The Markdown table and the raw rows."""
    from adapt_helpers import DEMO_ADAPT_TEST_CONFIG

    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Site shift (benchmarks/site_shift.py)",
        "",
        "Fine-tune on demo sites A+B, score the source validation fold, site C without "
        "adaptation and site C after AdaBN on its unlabelled images. 95% patient-bootstrap CIs "
        f"({N_BOOT} resamples); the AdaBN change is paired (same patients) with the clustered "
        "DeLong p.",
        "",
        f"Config: `{json.dumps(DEMO_ADAPT_TEST_CONFIG)}`; data: `{json.dumps(rows[0]['data'])}`.",
        "",
        f"Train times are wall seconds on the machine that ran it ({os.cpu_count()} CPU cores, "
        f"1-minute load average {os.getloadavg()[0]:.1f} when written: shared machines run slower).",
        "",
        "| seed | source val AUROC | site C AUROC, no adaptation | gap | site C AUROC, AdaBN "
        "| AdaBN − none (paired CI; DeLong p) | train (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = r["source_val"]["value"] - r["target_before"]["value"]
        d = r["adabn_minus_before"]
        lines.append(
            f"| {r['seed']} | {_ci(r['source_val'])} | {_ci(r['target_before'])} | {gap:+.3f} "
            f"| {_ci(r['target_adabn'])} | {_ci(d)}; p={d['delong_p']:.3f} "
            f"| {r['train_seconds']:.0f} |"
        )
    (out / "site_shift.md").write_text("\n".join(lines) + "\n")
    with (out / "site_shift.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run_seed(seed, Path(tmp))
            rows.append(row)
            print(
                f"seed {seed}: source {_ci(row['source_val'])}, site C {_ci(row['target_before'])}"
                f" -> AdaBN {_ci(row['target_adabn'])} (train {row['train_seconds']:.0f} s)",
                flush=True,
            )
    write_results(rows, Path(args.out))
    print(f"wrote {Path(args.out) / 'site_shift.md'}")


if __name__ == "__main__":
    main()
