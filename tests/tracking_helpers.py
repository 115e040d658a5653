"""Tiny real inputs for the tracking/bundle/inference tests: a small torch CNN and PNG files.

The stand-in network keeps these tests fast and independent of the backbone registry; it is a
real ``nn.Module`` saved and loaded through the real bundle format. ``tiny_transform`` is a
real MONAI pipeline (load PNG, channel first, resize, scale), the shape the bundle's own
deterministic transforms have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medtl.config import PipelineConfig


class TinyNet(torch.nn.Module):
    """Conv + BatchNorm + linear head: enough to exercise buffers and strict loading."""

    def __init__(self, num_classes: int = 2, in_chans: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_chans, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, num_classes)
        self.weights_info = {
            "source": "test-init",
            "path": "/somewhere/tiny.safetensors",
            "sha256": "0" * 64,
            "tag": None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def tiny_factory(mcfg, num_classes, spatial_dims=2, pretrained=False):
    """``create_model``-shaped factory for :class:`TinyNet`."""
    return TinyNet(num_classes, mcfg.in_channels)


def trained_tiny(num_classes: int = 2, seed: int = 0) -> TinyNet:
    """A TinyNet with non-default weights and BN statistics (as after training)."""
    torch.manual_seed(seed)
    net = TinyNet(num_classes)
    net.train()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        net(torch.randn(8, 1, 32, 32) * 3 + 1)  # moves BN running stats
    return net.eval()


def tiny_cfg(classes=("neg", "pos"), task="binary", **sections) -> PipelineConfig:
    cfg = PipelineConfig.model_validate({"transforms": {"spatial_size": [32, 32]}, **sections})
    cfg.data.classes = list(classes)
    cfg.data.task = task
    return cfg


def tiny_transform():
    """Real MONAI deterministic pipeline for PNG inputs -> (1, 32, 32) float tensors."""
    from monai.transforms import Compose, EnsureTyped, LoadImaged, Resized, ScaleIntensityd

    return Compose(
        [
            LoadImaged(
                keys="image", reader="PILReader", ensure_channel_first=True, image_only=True
            ),
            Resized(keys="image", spatial_size=(32, 32)),
            ScaleIntensityd(keys="image"),
            EnsureTyped(keys="image", track_meta=False),
        ]
    )


def write_pngs(folder: Path, n: int = 4, seed: int = 0) -> list[Path]:
    """``n`` grayscale PNG files with random content (random names, nothing identifying)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        arr = (rng.random((40 + 4 * i, 36)) * 255).astype(np.uint8)
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


IDENTIFYING_DIR = "PATIENT_DOE_JOHN_MRN12345678"  # a hospital export folder name that must not leak


def write_run_dir(root: Path, cfg: PipelineConfig) -> Path:
    """A run folder shaped like `medtl train`'s, with a trained tiny bundle in ``model/``."""
    import json

    import pandas as pd

    manifest_dir = root / IDENTIFYING_DIR
    write_pngs(manifest_dir / "images", n=4)
    pd.DataFrame(
        {"image": [f"images/img_{i:02d}.png" for i in range(4)], "label": ["neg", "pos"] * 2}
    ).to_csv(manifest_dir / "manifest.csv", index=False)
    cfg.data.manifest = str(manifest_dir / "manifest.csv")

    run = root / "run"
    (run / "plots").mkdir(parents=True, exist_ok=True)
    (run / "folds" / "fold_0" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "folds" / "fold_0" / "history.csv").write_text("epoch,loss\n1,0.5\n")
    (run / "folds" / "fold_0" / "checkpoints" / "last.pt").write_bytes(b"checkpoint")
    (run / "report.md").write_text(f"# Report\nmanifest: {manifest_dir / 'manifest.csv'}\n")
    (run / "config.yaml").write_text(cfg.to_yaml())
    metrics = {
        "pooled": {"auroc": 0.91, "auroc_ci_low": 0.82, "auroc_ci_high": 0.97},
        "subgroups": {"site": {"A": {"auroc": 0.9, "auroc_ci_low": 0.8, "auroc_ci_high": 0.95}}},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    write_pngs(run / "plots", n=1)
    return run


def tiny_tracked_run(tcfg, root: Path, *, concurrent_folds: bool = False, n_folds: int = 3):
    """The tracking calls of `medtl train` with a tiny model: returns (tracker, run_dir, uri).

    With ``concurrent_folds`` the fold runs log from worker threads at the same time.
    """
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from medtl.bundle import save_bundle
    from medtl.tracking.lineage import collect_lineage
    from medtl.tracking.runs import TrainTracker

    cfg = tiny_cfg()
    cfg.tracking = tcfg
    run_dir = write_run_dir(root, cfg)
    summary = {  # the shape medtl.manifest.validate_manifest writes
        "images": 4,
        "patients": 4,
        "class_counts": {"neg": 2, "pos": 2},
        "patients_per_class": {"neg": 2, "pos": 2},
        "sites": {"A": 4},
    }
    lineage = collect_lineage(cfg, "f" * 64, summary, {"source": "test-init", "sha256": "0" * 64})
    tracker = TrainTracker(tcfg, cfg, lineage)
    tracker.start()
    tracker.log_dataset("f" * 64, summary)

    barrier = threading.Barrier(n_folds) if concurrent_folds else None

    def fold(k: int) -> str:
        owner = tracker
        if concurrent_folds:  # as a worker process would: its own tracker on the parent run
            owner = TrainTracker(tcfg, cfg, lineage)
            owner.attach(tracker.parent_run_id)
            barrier.wait(timeout=60)  # all folds log at the same time
        fr = owner.fold_run(k)
        for epoch in range(1, 4):
            fr.log_epoch(
                {"epoch": epoch, "train_loss": 1.0 / epoch, "val_auroc": 0.5 + k / 10, "lr": 1e-3},
                epoch,
            )
        fr.log_metrics({"auroc": 0.8 + k / 100, "threshold": 0.4})
        fr.end()
        return fr.run_id

    if concurrent_folds:
        with ThreadPoolExecutor(n_folds) as pool:
            fold_ids = list(pool.map(fold, range(n_folds)))
    else:
        fold_ids = [fold(k) for k in range(n_folds)]

    save_bundle(
        run_dir / "model",
        trained_tiny(),
        cfg,
        ["neg", "pos"],
        "binary",
        0.42,
        lineage,
        {"auroc": 0.91},
    )
    info = {
        "threshold_method": "youden",
        "mlflow": {"tracking_uri": tracker.tracking_uri, "parent_run_id": tracker.parent_run_id},
    }
    (run_dir / "run_info.json").write_text(json.dumps(info))
    metrics = json.loads((run_dir / "metrics.json").read_text())["pooled"]
    tracker.log_metrics(metrics)
    tracker.log_artifacts(run_dir)
    model_uri = tracker.log_model(run_dir / "model", None)
    tracker.end("FINISHED")
    return tracker, run_dir, model_uri, fold_ids
