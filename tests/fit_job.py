"""Helpers for the training tests: real demo files -> real datasets, and a `fit` job script.

As a script (``python tests/fit_job.py ...`` or under ``torchrun``) it trains one split of the
demo data and writes the result to ``--out`` (rank 0); the kill-and-resume and DDP tests start
it as a real subprocess.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import numpy as np

TINY = {
    "transforms": {"spatial_size": [48, 48], "augment": "light"},
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "progress": False,
        "device": "cpu",
        "early_stopping_patience": None,
    },
    "data": {"num_workers": 0},
    "tracking": {"enabled": False},
}


def tiny_config(overrides: list[str] | None = None, cache_dir: str | Path | None = None):
    """Small, CPU-fast pipeline config (48 px, 2 epochs) plus ``key=value`` overrides."""
    from medtl.config import build_config

    cfg = build_config(TINY, overrides or [])
    if cache_dir is not None:
        cfg.data.cache_dir = str(cache_dir)
    return cfg


def demo_split(manifest_csv: str | Path, cfg, cache_dir: str | Path, val_every: int = 2):
    """(train_ds, val_ds, classes) over the demo manifest, split by patient (every
    ``val_every``-th patient to validation), through the real transforms and data stages."""
    from medtl.data import build_dataset, prepare_records, records_from_manifest
    from medtl.manifest import read_manifest
    from medtl.models import get_backbone_spec
    from medtl.transforms import build_transforms

    manifest = read_manifest(manifest_csv)
    records, classes = records_from_manifest(manifest, cfg)
    cfg.data.task = "binary" if len(classes) == 2 else "multiclass"
    cfg.data.classes = list(classes)
    spec = get_backbone_spec(cfg.model.backbone)
    args = (cfg.transforms, spec.preprocess, cfg.model.in_channels, cfg.model.channel_adapt)
    tr_train = build_transforms(*args, train=True)
    tr_eval = build_transforms(*args, train=False)
    records = prepare_records(records, tr_eval, Path(cache_dir), 1.0, progress=False).records
    patients = sorted({r["patient_id"] for r in records})
    val_p = set(patients[::val_every])
    tr = [r for r in records if r["patient_id"] not in val_p]
    va = [r for r in records if r["patient_id"] in val_p]
    return (
        build_dataset(tr, tr_train, Path(cache_dir), cfg.data.cache),
        build_dataset(va, tr_eval, Path(cache_dir), cfg.data.cache),
        classes,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--kill-after-epoch", type=int, default=None)
    a = ap.parse_args(argv)

    import torch

    from medtl.models import create_model
    from medtl.training import fit, init_distributed, predict_proba

    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    cfg = tiny_config(a.set, a.cache)
    train_ds, val_ds, classes = demo_split(a.manifest, cfg, a.cache)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, len(classes), spatial_dims=2)

    epochs_run: list[int] = []

    def log_fn(metrics: dict, epoch: int) -> None:
        epochs_run.append(epoch)
        # Called after last.pt is written: a real SIGKILL at a known point of the run.
        if a.kill_after_epoch is not None and epoch == a.kill_after_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    res = fit(cfg, model, train_ds, val_ds, workdir=Path(a.workdir), log_fn=log_fn, dist=dist)
    if dist.is_main:
        ref = predict_proba(res.model, val_ds, cfg)  # single-process, plain dataset order
        state = {k: v.detach().cpu().numpy() for k, v in res.model.state_dict().items()}
        keep = ("train_loss", "val_loss", "val_auroc", "lr")
        hist = np.array([[float(h.get(k, np.nan)) for k in keep] for h in res.history])
        np.savez(
            a.out,
            val_probs=res.val_probs,
            ref_probs=ref,
            history=hist,
            best_epoch=res.best_epoch,
            world_size=dist.world_size,
            epochs_run=np.array(epochs_run, dtype=int),
            val_labels=np.array([r["label"] for r in val_ds.records]),
            **{f"w/{k}": v for k, v in state.items()},
        )
    dist.barrier()
    if dist.distributed:
        import torch.distributed as tdist

        tdist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
