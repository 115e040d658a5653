"""The site-shift fixture shared by the adaptation tests and ``benchmarks/site_shift.py``.

A model fine-tuned on the demo's source sites (A+B) with :data:`DEMO_ADAPT_TEST_CONFIG` (its
BatchNorm statistics then re-estimated on its own training images, so the unadapted baseline
carries source statistics), its AUROC on a patient-grouped source validation split and on the
shifted site C, and the datasets to adapt with. The shift, this config and the seed were
calibrated together (``python benchmarks/site_shift.py``; numbers in
``benchmarks/results/site_shift.md``): without adaptation site C scores well below the source
validation AUROC, and AdaBN on site C's unlabelled images closes part of the gap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# fine_tune of the default backbone (tf_efficientnet_lite0, its ImageNet weights), CPU-sized.
DEMO_ADAPT_TEST_CONFIG: dict[str, Any] = {
    "seed": 0,
    # No augmentation: BatchNorm statistics of training batches then match evaluation's.
    "transforms": {"spatial_size": [64, 64], "augment": "none"},
    "strategy": {"name": "fine_tune"},
    # 5 epochs rather than 3: a better-trained source model shows the gap (and the AdaBN gain)
    # for most seeds, not just a lucky one (benchmarks/results/site_shift.md).
    "train": {
        "epochs": 5,
        "batch_size": 16,
        "lr": 1e-3,
        "progress": False,
        "device": "cpu",
        "early_stopping_patience": None,
    },
    "data": {"num_workers": 0},
    "cv": {"folds": 3},  # the source validation split is fold 0 of a patient-grouped 3-fold CV
    "tracking": {"enabled": False},
}
# make_demo_data arguments of the calibrated site-shift data set.
DEMO_ADAPT_DATA: dict[str, Any] = {
    "n_patients": 120,
    "image_size": 96,
    "seed": 0,
    "with_3d": False,
    "n_holdout": 2,
    "target_patients": 60,
}
UNLABELLED = -1  # the label of target records read from the unlabelled manifest


@dataclass
class SourceModel:
    """A model trained on the source sites, and what the adaptation tests score it on."""

    cfg: Any  # the resolved PipelineConfig it was trained with
    model: Any  # MedtlModel, best epoch's weights (copy it before adapting)
    classes: list[str]
    source_val: Any  # MedtlDataset: held-out source patients (sites A and B)
    target: Any  # MedtlDataset: site C, labelled (for scoring only)
    target_unlabelled: Any  # MedtlDataset: site C images, label UNLABELLED (for adapting)
    source_train: Any  # MedtlDataset: the source patients it trained on
    source_auroc: float  # on source_val
    target_auroc: float  # on target, no adaptation

    def target_batches(self, batch_size: int | None = None) -> Any:
        """A loader over site C's unlabelled images, in file order (what AdaBN reads)."""
        from medtl.data import make_loader

        bs = batch_size or self.cfg.train.batch_size
        return make_loader(self.target_unlabelled, bs, num_workers=0)

    def fresh_model(self) -> Any:
        """A deep copy of the source model, so one test's adaptation never leaks into another."""
        return copy.deepcopy(self.model)


def adapt_config(overrides: list[str] | None = None, cache_dir: str | Path | None = None) -> Any:
    """:data:`DEMO_ADAPT_TEST_CONFIG` as a ``PipelineConfig`` plus ``key=value`` overrides."""
    from medtl.config import build_config

    cfg = build_config(DEMO_ADAPT_TEST_CONFIG, overrides or [])
    if cache_dir is not None:
        cfg.data.cache_dir = str(cache_dir)
    return cfg


def scores(model: Any, dataset: Any, cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, positive-class probabilities, patient ids) of ``model`` on a labelled dataset."""
    from medtl.training import predict_proba

    probs = predict_proba(model, dataset, cfg)
    y = np.asarray([r["label"] for r in dataset.records])
    patients = np.asarray([str(r["patient_id"]) for r in dataset.records])
    return y, probs[:, 1], patients


def auroc(model: Any, dataset: Any, cfg: Any) -> float:
    """Binary AUROC of ``model`` on a labelled dataset (positive class = column 1)."""
    from sklearn.metrics import roc_auc_score

    y, p, _ = scores(model, dataset, cfg)
    return float(roc_auc_score(y, p))


def _unlabelled_records(csv: Path, patient_col: str) -> list[dict[str, Any]]:
    """Records of an unlabelled manifest: the image and patient, label :data:`UNLABELLED`."""
    import pandas as pd

    df = pd.read_csv(csv)
    assert "label" not in df.columns, f"{csv} should have no label column"
    return [
        {"image": str(csv.parent / row.image), "label": UNLABELLED, "patient_id": pid, "row": i}
        for i, (row, pid) in enumerate(zip(df.itertuples(), df[patient_col], strict=True))
    ]


def _datasets(demo: Any, cfg: Any, cache_dir: Path) -> dict[str, Any]:
    """Source train/validation (fold 0 of a patient-grouped CV), site C labelled and not."""
    from medtl.cv import make_splits
    from medtl.data import build_dataset, prepare_records, records_from_manifest
    from medtl.manifest import read_manifest
    from medtl.models import get_backbone_spec
    from medtl.transforms import build_transforms

    manifest = read_manifest(demo.manifest_csv)
    records, classes = records_from_manifest(manifest, cfg)
    cfg.data.task, cfg.data.classes = "binary", list(classes)
    folds = make_splits(manifest.df, cfg.cv, seed=cfg.seed)["fold"].to_numpy()
    spec = get_backbone_spec(cfg.model.backbone)
    args = (cfg.transforms, spec.preprocess, cfg.model.in_channels, cfg.model.channel_adapt)
    tr_train, tr_eval = build_transforms(*args, train=True), build_transforms(*args, train=False)
    target, _ = records_from_manifest(read_manifest(demo.target_manifest_csv), cfg)
    unlabelled = _unlabelled_records(demo.target_unlabelled_csv, cfg.data.patient_column)

    def ready(recs: list[dict[str, Any]], tfm: Any) -> Any:
        recs = prepare_records(recs, tr_eval, cache_dir, 0.0, progress=False).records
        return build_dataset(recs, tfm, cache_dir, cfg.data.cache)

    return {
        "classes": classes,
        "source_train": ready([r for r in records if folds[r["row"]] != 0], tr_train),
        "source_val": ready([r for r in records if folds[r["row"]] == 0], tr_eval),
        "target": ready(target, tr_eval),
        "target_unlabelled": ready(unlabelled, tr_eval),
    }


def train_source_model(
    demo: Any, workdir: str | Path, overrides: list[str] | None = None
) -> SourceModel:
    """Fine-tune on the source sites of ``demo`` and score source validation and site C.

    ``demo`` is a :class:`medtl.demo_data.DemoData` with a target site (made with
    :data:`DEMO_ADAPT_DATA` for the calibrated numbers). Seeded: the same data and config give
    the same model on the same machine.
    """
    import torch

    from medtl.data import make_loader
    from medtl.models import create_model
    from medtl.training import fit
    from medtl.training.adaptation import adabn

    workdir = Path(workdir)
    cfg = adapt_config(overrides, workdir / "cache")
    sets = _datasets(demo, cfg, workdir / "cache")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = create_model(cfg.model, len(sets["classes"]), spatial_dims=2)
    result = fit(cfg, model, sets["source_train"], None, workdir=workdir / "fit", resume=False)
    # BatchNorm statistics re-estimated on the source training images (eval transforms) once
    # training ends: the running averages of a few dozen steps lag the weights and saw
    # augmented, class-balanced batches. Without this, AdaBN on site C would also be credited
    # with repairing stale statistics, which has nothing to do with the site shift.
    loader = make_loader(
        sets["source_train"].deterministic_view(), cfg.train.batch_size, num_workers=0
    )
    model = adabn(result.model, loader)
    return SourceModel(
        cfg=cfg,
        model=model,
        classes=list(sets["classes"]),
        source_val=sets["source_val"],
        target=sets["target"],
        target_unlabelled=sets["target_unlabelled"],
        source_train=sets["source_train"],
        source_auroc=auroc(model, sets["source_val"], cfg),
        target_auroc=auroc(model, sets["target"], cfg),
    )


def adabn_model(source: SourceModel) -> Any:
    """A copy of the source model after AdaBN on site C's unlabelled images."""
    from medtl.training.adaptation import adabn

    return adabn(source.fresh_model(), source.target_batches())


def adabn_target_auroc(source: SourceModel) -> float:
    """Site C AUROC after AdaBN on site C's unlabelled images (on a copy of the model)."""
    return auroc(adabn_model(source), source.target, source.cfg)
