"""Benchmark: few-shot AUROC against k (patients per class), ImageNet-pretrained backbone vs
the same network randomly initialised, for both few-shot classifiers.

Runs `medtl fewshot`'s episodic mode (``medtl.fewshot.run_fewshot_episodes``) on demo data
generated with enough patients for k = 20 per class plus query patients. Embeddings are
computed once per image and backbone (feature cache); every episode reuses them.
Writes benchmarks/results/fewshot.md (table) and fewshot.jsonl (one JSON row per line).

    python benchmarks/fewshot.py                          # CPU: 100 patients, 224 px, 200 episodes
    python benchmarks/fewshot.py --device cuda --patients 300
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--patients", type=int, default=100, help="demo patients (~30%% nodule)")
    ap.add_argument("--size", type=int, default=224, help="model input side in pixels")
    ap.add_argument("--shots", default="1,5,10,20")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--classifiers", default="logistic,prototype")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from medtl.config import build_config
    from medtl.demo_data import make_demo_data
    from medtl.fewshot import run_fewshot_episodes
    from medtl.fewshot.report import fmt_ci

    shots = [int(k) for k in a.shots.split(",")]
    rows, lines = [], []
    with tempfile.TemporaryDirectory(prefix="medtl-bench-fewshot-") as tmp:
        root = Path(tmp)
        demo = make_demo_data(root / "demo", n_patients=a.patients, image_size=96, seed=a.seed)
        for name in a.classifiers.split(","):
            cfg = build_config(
                {
                    "seed": a.seed,
                    "strategy": {"name": "few_shot", "fewshot_classifier": name},
                    "data": {"positive_class": "nodule", "cache_dir": str(root / "cache")},
                    "transforms": {"spatial_size": [a.size, a.size], "augment": "none"},
                    "train": {"device": a.device, "progress": False},
                    "tracking": {"enabled": False},
                }
            )
            t0 = time.perf_counter()
            res = run_fewshot_episodes(
                cfg, demo.manifest_csv, root / name, shots=shots, episodes=a.episodes
            )
            secs = time.perf_counter() - t0
            info = res.info
            for r in res.result.rows:
                row = {
                    "classifier": name,
                    "variant": r.variant,
                    "k": r.k_shot,
                    "episodes": r.episodes,
                    "auroc": r.auroc.mean,
                    "auroc_low": r.auroc.low,
                    "auroc_high": r.auroc.high,
                    "accuracy": r.accuracy.mean,
                    "accuracy_low": r.accuracy.low,
                    "accuracy_high": r.accuracy.high,
                    "seconds_this_classifier": round(secs, 1),
                    "images": info["n_images"],
                    "patients_per_class": info["patients_per_class"],
                    "size": a.size,
                    "device": a.device,
                }
                rows.append(row)
                lines.append(
                    f"| {name} | {r.variant} | {r.k_shot} | {fmt_ci(r.auroc)} | "
                    f"{fmt_ci(r.accuracy)} |"
                )
    cpu = f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    head = (
        f"Few-shot on demo data: {rows[0]['images']} images, patients per class "
        f"{rows[0]['patients_per_class']}, {a.size} px, {a.episodes} episodes per k, "
        f"device {a.device} ({cpu}), seed {a.seed}. AUROC / accuracy: mean over episodes "
        "[95% CI].\n\n"
        "| classifier | backbone | k (patients / class) | AUROC | accuracy |\n"
        "|---|---|---:|---|---|\n"
    )
    table = head + "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fewshot.md").write_text(table)
    with (RESULTS / "fewshot.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
