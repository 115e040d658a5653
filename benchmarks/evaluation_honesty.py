"""Benchmark: does the cross-validated estimate match held-out data? Selection on the
reported fold (cv.selection=outer) against nested selection (inner), and calibration before
and after, on the demo and on a larger synthetic set, each with a held-out test split.

Each arm runs the real `medtl train` job (patient-grouped CV, refit, held-out report) with the
same data, seed and held-out patients; only cv.selection differs. Writes
benchmarks/results/evaluation_honesty.md (one run, numbers side by side).

    python benchmarks/evaluation_honesty.py                  # demo (80 patients) + 200 patients
    python benchmarks/evaluation_honesty.py --sets demo       # just the demo
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
PIPELINE = ROOT / "pipelines/cxr_2d_finetune.yaml"
SETS = {"demo": (80, 96), "synthetic-200": (200, 64)}  # patients, image size


def _ci(entry: dict) -> str:
    lo, hi = entry.get("low"), entry.get("high")
    ci = f" ({lo:.3f}–{hi:.3f})" if lo is not None and hi is not None else ""
    return f"{entry['value']:.3f}{ci}"


def run_arm(manifest: Path, work: Path, selection: str, size: int, epochs: int) -> dict:
    """One `medtl train` run; returns CV and held-out AUROC, ECE and Brier."""
    from medtl.config import load_config
    from medtl.jobs import run_train

    cfg = load_config(
        PIPELINE,
        [
            f"cv.selection={selection}",
            "cv.folds=5",
            "cv.test_fraction=0.25",
            f"transforms.spatial_size=[{size},{size}]",
            f"train.epochs={epochs}",
            "train.progress=false",
            "tracking.enabled=false",
            "evaluation.bootstrap=500",
            "evaluation.gallery_per_cell=0",
        ],
    )
    cfg.data.cache_dir = str(work / "cache")
    t0 = time.perf_counter()
    run_train(cfg, manifest_path=manifest, out_dir=work / selection)
    seconds = time.perf_counter() - t0
    cv = json.loads((work / selection / "metrics.json").read_text())
    test = json.loads((work / selection / "test" / "metrics.json").read_text())
    recal = cv.get("recalibration") or {}
    return {
        "selection": selection,
        "cv_auroc": cv["pooled"]["summary"]["auroc"],
        "test_auroc": test["pooled"]["summary"]["auroc"],
        "ece_before": (recal.get("before") or {}).get("ece"),
        "ece_after": cv["pooled"]["summary"]["ece"],
        "brier_before": (recal.get("before") or {}).get("brier"),
        "brier_after": cv["pooled"]["summary"]["brier"],
        "test_ece": test["pooled"]["summary"]["ece"],
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    from medtl.demo_data import make_demo_data

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            patients, size = SETS[name]
            demo = make_demo_data(Path(tmp) / name, n_patients=patients, image_size=size, seed=1)
            for selection in ("outer", "inner"):
                work = Path(tmp) / f"{name}-runs"
                r = run_arm(demo.manifest_csv, work, selection, min(size, 128), args.epochs)
                rows.append((name, r))
                print(name, json.dumps(r, default=str), flush=True)
    lines = [
        "| data | selection | CV AUROC (95% CI) | held-out AUROC (95% CI) | CV − held-out | "
        "ECE before → after (CV) | Brier before → after (CV) | held-out ECE | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        gap = r["cv_auroc"]["value"] - r["test_auroc"]["value"]
        ece = f"{_ci(r['ece_before'])} → {_ci(r['ece_after'])}" if r["ece_before"] else "n/a"
        brier = (
            f"{_ci(r['brier_before'])} → {_ci(r['brier_after'])}" if r["brier_before"] else "n/a"
        )
        lines.append(
            f"| {name} | {r['selection']} | {_ci(r['cv_auroc'])} | {_ci(r['test_auroc'])} | "
            f"{gap:+.3f} | {ece} | {brier} | {_ci(r['test_ece'])} | {r['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "evaluation_honesty.md").write_text(
        "# Evaluation honesty (benchmarks/evaluation_honesty.py)\n\n"
        f"Pipeline {PIPELINE.name}, 5-fold CV + 25% held-out patients, {args.epochs} epochs, "
        "one run per arm.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
