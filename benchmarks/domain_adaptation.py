"""Benchmark: target-site AUROC before and after each domain-adaptation method, with CIs.

Every arm runs the real `medtl train` job on the demo's source sites (A+B: patient-grouped CV,
refit) with the shifted site C as ``domain_adaptation.target_manifest`` (labelled: its labels
are read only to score). Same data, seed and recipe in every arm; only the method differs.
``none`` scores the plain model on site C; post-hoc methods (adabn, tent) adapt a copy of the
refit model; joint methods (coral, dann) train with site C batches and are compared with the
same recipe refit without adaptation. Writes benchmarks/results/domain_adaptation.{md,jsonl}.

    python benchmarks/domain_adaptation.py                 # all five methods
    python benchmarks/domain_adaptation.py --methods none adabn
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "tests"))
METHODS = ("none", "adabn", "tent", "coral", "dann")
# Smaller than tests/adapt_helpers.DEMO_ADAPT_DATA (120 + 60 patients, 5 epochs) so that five
# full train jobs fit in ~15 minutes on 2 cores; the recipe is otherwise DEMO_ADAPT_TEST_CONFIG.
DATA = {
    "n_patients": 60,
    "image_size": 96,
    "seed": 0,
    "with_3d": False,
    "n_holdout": 2,
    "target_patients": 30,
}
EPOCHS = 3


def _ci(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    lo, hi = entry.get("low"), entry.get("high")
    ci = f" ({lo:.3f}–{hi:.3f})" if lo is not None and hi is not None else ""
    return f"{entry['value']:.3f}{ci}"


def run_arm(demo, work: Path, method: str) -> dict:
    """One `medtl train` run with ``method``; source CV AUROC and target AUROC before/after."""
    from adapt_helpers import DEMO_ADAPT_TEST_CONFIG

    from medtl.config import build_config
    from medtl.jobs import run_train

    cfg = build_config(
        DEMO_ADAPT_TEST_CONFIG,
        [
            f"domain_adaptation.method={method}",
            f"domain_adaptation.target_manifest={demo.target_manifest_csv}",
            f"data.cache_dir={work / 'cache'}",
            f"train.epochs={EPOCHS}",
            "evaluation.bootstrap=1000",
            "evaluation.gallery_per_cell=0",
        ],
    )
    t0 = time.perf_counter()
    out = run_train(cfg, manifest_path=demo.manifest_csv, out_dir=work / method)
    t = out.metrics["target"]
    row = {
        "method": method,
        "seconds": round(time.perf_counter() - t0, 1),
        "source_cv_auroc": out.metrics["pooled"]["summary"]["auroc"],
        "target_before": t["before"]["summary"]["auroc"],
        "target_after": (t.get("after") or {}).get("summary", {}).get("auroc"),
        "difference": t.get("difference"),
        "n_target_patients": t["n_patients"],
    }
    print(json.dumps(row, default=str), flush=True)
    return row


def write_results(rows: list[dict], data_args: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "domain_adaptation.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r, default=str) + "\n")
    lines = [
        "# Domain adaptation on the demo's shifted site C",
        "",
        f"Data: `make_demo_data(**{data_args})`; recipe: `tests/adapt_helpers.py::"
        f"DEMO_ADAPT_TEST_CONFIG` with {EPOCHS} epochs (fine-tune tf_efficientnet_lite0, ImageNet "
        "weights, 64 px, 3-fold patient-grouped CV on sites A+B). AUROC with 95% patient-bootstrap "
        "CIs; the difference is after - before on the same site C patients (paired bootstrap).",
        "",
        "| method | source CV AUROC | site C, no adaptation | site C, adapted | after - before "
        "(95% CI) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r.get("difference") or {}
        diff = (
            f"{d['auroc_after_minus_before']:+.3f} ({d['bootstrap_ci'][0]:+.3f} to "
            f"{d['bootstrap_ci'][1]:+.3f})"
            if "auroc_after_minus_before" in d
            else "–"
        )
        lines.append(
            f"| {r['method']} | {_ci(r['source_cv_auroc'])} | {_ci(r['target_before'])} | "
            f"{_ci(r['target_after'])} | {diff} | {r['seconds']} |"
        )
    (RESULTS / "domain_adaptation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args()
    from medtl.demo_data import make_demo_data

    with tempfile.TemporaryDirectory(prefix="medtl-bench-da-") as tmp:
        work = Path(tmp)
        demo = make_demo_data(work / "demo", **DATA)
        rows = [run_arm(demo, work, m) for m in args.methods]
    write_results(rows, DATA)


if __name__ == "__main__":
    main()
