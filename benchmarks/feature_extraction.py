"""Benchmark: feature-extraction fast path vs naive frozen training over a 5-fold CV.

Both arms train only a new head on the same frozen backbone, the same demo images and the
same patient-grouped folds. The fast path embeds every image once (cached, reused by every
fold) and fits a logistic-regression head; the naive arm is `fine_tune` with every backbone
stage frozen, pushing each image through the backbone every epoch of every fold.
Prints a Markdown table and writes it to benchmarks/results/feature_extraction.md.

    python benchmarks/feature_extraction.py                       # CPU, small
    python benchmarks/feature_extraction.py --device cuda --backbone resnet50 --size 224
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

RESULTS = Path(__file__).parent / "results"


def build(manifest_csv: Path, cfg, cache: Path):
    """Records, eval/train transforms of the real data stages (augmentation off: same inputs)."""
    from medtl.data import prepare_records, records_from_manifest
    from medtl.manifest import read_manifest
    from medtl.models import get_backbone_spec
    from medtl.transforms import build_transforms

    records, classes = records_from_manifest(read_manifest(manifest_csv), cfg)
    cfg.data.task = "binary" if len(classes) == 2 else "multiclass"
    spec = get_backbone_spec(cfg.model.backbone)
    args = (cfg.transforms, spec.preprocess, cfg.model.in_channels, cfg.model.channel_adapt)
    tr = build_transforms(*args, train=False)
    records = prepare_records(records, tr, cache, 1.0, progress=False).records
    return records, classes, tr


def run_cv(cfg, records, classes, tr, cache: Path, work: Path, folds: int) -> tuple[float, float]:
    """(wall seconds, pooled out-of-fold AUROC) of one strategy over patient-grouped folds."""
    from medtl.data import build_dataset
    from medtl.models import create_model
    from medtl.training import fit

    y = np.array([r["label"] for r in records])
    groups = [r["patient_id"] for r in records]
    oof = np.zeros(len(records))
    t0 = time.perf_counter()
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    for k, (tri, vai) in enumerate(cv.split(np.zeros(len(y)), y, groups)):
        torch.manual_seed(cfg.seed + k)
        model = create_model(cfg.model, len(classes), spatial_dims=2)
        train_ds = build_dataset([records[i] for i in tri], tr, cache, cfg.data.cache)
        val_ds = build_dataset([records[i] for i in vai], tr, cache, cfg.data.cache)
        res = fit(cfg, model, train_ds, val_ds, workdir=work / f"fold_{k}", resume=False)
        oof[vai] = res.val_probs[:, 1]
    return time.perf_counter() - t0, float(roc_auc_score(y, oof))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the naive frozen arm")
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()

    from medtl.config import build_config
    from medtl.demo_data import make_demo_data
    from medtl.models import create_model

    tmp = Path(tempfile.mkdtemp(prefix="medtl_bench_fe_"))
    try:
        demo = make_demo_data(
            tmp / "demo", n_patients=a.patients, image_size=max(96, a.size), seed=0
        )
        base = {
            "model": {"backbone": a.backbone},
            "transforms": {"spatial_size": [a.size, a.size], "augment": "none"},
            "train": {
                "device": a.device,
                "batch_size": a.batch_size,
                "progress": False,
                "early_stopping_patience": None,
                "loss": "weighted_ce",
            },
            "tracking": {"enabled": False},
        }
        cfg = build_config(base, ["strategy.name=feature_extraction"])
        cache = tmp / "cache"
        cfg.data.cache_dir = str(cache)
        records, classes, tr = build(demo.manifest_csv, cfg, cache)
        n_stages = len(create_model(cfg.model, len(classes)).stage_groups())
        naive = build_config(
            base,
            [
                "strategy.name=fine_tune",
                f"strategy.freeze_stages={n_stages - 1}",
                f"train.epochs={a.epochs}",
                "train.lr=0.003",
            ],
        )
        naive.data.cache_dir, naive.data.task = str(cache), cfg.data.task

        t_fast, auc_fast = run_cv(cfg, records, classes, tr, cache, tmp / "fast", a.folds)
        t_naive, auc_naive = run_cv(naive, records, classes, tr, cache, tmp / "naive", a.folds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table = "\n".join(
        [
            f"Feature extraction vs naive frozen training: {a.backbone}, {a.size}px, "
            f"{len(records)} images / {a.patients} patients, {a.folds}-fold CV, device {a.device}, "
            f"naive arm {a.epochs} epochs",
            "",
            "| arm | wall time (s) | pooled OOF AUROC |",
            "|---|---:|---:|",
            f"| feature cache + logistic head | {t_fast:.1f} | {auc_fast:.3f} |",
            f"| fine_tune, all backbone stages frozen | {t_naive:.1f} | {auc_naive:.3f} |",
            f"| **ratio / difference** | **{t_naive / t_fast:.1f}x faster** | "
            f"**{auc_fast - auc_naive:+.3f}** |",
        ]
    )
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feature_extraction.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
