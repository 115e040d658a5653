"""A manifest's images as embeddings: read and checked, decoded once into the image cache,
then pushed once per backbone variant through the feature cache
(``medtl.training.features``), so every episode and every later run reuses them.

Variants: ``pretrained`` (the configured weights) and ``random_init`` (the same network,
randomly initialised from ``seed``; the baseline that shows what pretraining adds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtl.config import PipelineConfig
from medtl.data import QuarantineEntry
from medtl.errors import ConfigError
from medtl.jobs.prepare import TrainInputs, read_inputs
from medtl.models.model import MedtlModel
from medtl.transforms import TransformPair

__all__ = [
    "PRETRAINED",
    "RANDOM_INIT",
    "EmbeddedSet",
    "backbone_variants",
    "decode",
    "embed_manifest",
    "embed_records",
    "eval_transforms",
    "read_labelled",
]

PRETRAINED = "pretrained"
RANDOM_INIT = "random_init"


@dataclass
class EmbeddedSet:
    """The readable images of one manifest with their embeddings per backbone variant."""

    inputs: TrainInputs  # the manifest, its validation, hash, classes and task
    records: list[dict[str, Any]]  # readable images, manifest order (with ``image_rel``)
    quarantine: list[QuarantineEntry]
    features: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> (N, F)

    @property
    def labels(self) -> np.ndarray:
        """(N,) class indices."""
        return np.array([int(r["label"]) for r in self.records], dtype=int)

    @property
    def patient_ids(self) -> list[str]:
        return [str(r["patient_id"]) for r in self.records]


def read_labelled(cfg: PipelineConfig, manifest_path: str | Path) -> TrainInputs:
    """The manifest as records (``read_inputs``: validated, classes and task resolved into
    ``cfg.data``), each with its manifest path (``image_rel``) and subgroup values.

    Raises:
        ConfigError: a multi-label manifest (a shot is a patient of one class).
    """
    inputs = read_inputs(cfg, manifest_path)
    if inputs.task == "multilabel":
        raise ConfigError(
            f"few-shot needs one class per image, but {manifest_path} is multi-label; "
            "give single-label manifests (one finding vs normal, or several exclusive classes)"
        )
    df = inputs.manifest.df
    cols = [*inputs.subgroups, cfg.data.study_column]
    values = {c: df[c].to_numpy() for c in dict.fromkeys(cols) if c in df.columns}
    image = df["image"].to_numpy()
    for r in inputs.records:
        i = r["row"]
        r["image_rel"] = str(image[i])
        for c, v in values.items():
            r[c] = None if v[i] is None or v[i] != v[i] else str(v[i])  # NaN != NaN
    return inputs


def backbone_variants(
    cfg: PipelineConfig, num_classes: int, random_init: bool
) -> dict[str, MedtlModel]:
    """The configured backbone with its pretrained weights and, with ``random_init``, a copy
    initialised from ``cfg.seed`` (deterministic, so its embeddings are cached too).

    Raises:
        ConfigError: the pretrained weights are missing (``allow_random_init`` fell back to
            random weights): the comparison would be random against random.
    """
    import torch

    from medtl.models import create_model

    torch.manual_seed(cfg.seed)
    models = {PRETRAINED: create_model(cfg.model, num_classes, spatial_dims=cfg.spatial_dims)}
    source = models[PRETRAINED].weights_info.get("source")
    if source in ("random_init", "none"):
        raise ConfigError(
            f"backbone '{cfg.model.backbone}' has no pretrained weights here (source: {source}); "
            "few-shot needs them: set model.weights to an available tag or file "
            "(`medtl weights list`) and model.allow_random_init: false"
        )
    if random_init:
        rcfg = cfg.model.model_copy(
            update={"weights": None, "weights_path": None, "allow_random_init": True}
        )
        torch.manual_seed(cfg.seed)
        models[RANDOM_INIT] = create_model(rcfg, num_classes, spatial_dims=cfg.spatial_dims)
    return models


def eval_transforms(cfg: PipelineConfig, model: MedtlModel) -> TransformPair:
    """The deterministic transforms from the model's preprocessing contract."""
    from medtl.transforms import build_transforms, read_policy

    m = cfg.model
    return build_transforms(
        cfg.transforms, model.preprocess, m.in_channels, m.channel_adapt, False,
        read_policy(cfg.data),
    )  # fmt: skip


def decode(
    cfg: PipelineConfig, inputs: TrainInputs, transforms: TransformPair, cache_dir: Path
) -> tuple[list[dict[str, Any]], list[QuarantineEntry]]:
    """Every image decoded once into the cache; the readable records and the quarantine."""
    from medtl.jobs.prepare import decode_into_cache
    from medtl.training.distributed import DistContext

    return decode_into_cache(
        inputs.records, transforms, cache_dir, cfg.data, DistContext(), cfg.train.progress
    )


def embed_records(
    cfg: PipelineConfig,
    model: MedtlModel,
    records: list[dict[str, Any]],
    transforms: TransformPair,
    cache_dir: Path,
) -> np.ndarray:
    """(N, F) embeddings of ``records`` in order: read from the feature cache under
    ``cache_dir/features``, computed (and cached) where missing."""
    from medtl.data import build_dataset
    from medtl.training.engine import Engine
    from medtl.training.features import extract_features
    from medtl.training.strategies import BaseStrategy

    if not records:
        return np.zeros((0, model.num_features), np.float32)
    ecfg = cfg.model_copy(deep=True)
    ecfg.data.cache_dir = str(cache_dir)
    ds = build_dataset(records, transforms, cache_dir, cfg.data.cache)
    # The engine only runs inference here: the strategy is never asked to train.
    engine = Engine(ecfg, model, ds, None, BaseStrategy(ecfg), workdir=cache_dir, resume=False)
    return extract_features(engine, ds)


def embed_manifest(
    cfg: PipelineConfig,
    inputs: TrainInputs,
    models: dict[str, MedtlModel],
    cache_dir: Path,
) -> EmbeddedSet:
    """Decode ``inputs`` once and embed the readable images with every model in ``models``."""
    transforms = eval_transforms(cfg, models[PRETRAINED])
    records, quarantine = decode(cfg, inputs, transforms, cache_dir)
    out = EmbeddedSet(inputs, records, quarantine)
    for name, model in models.items():
        out.features[name] = embed_records(cfg, model, records, transforms, cache_dir)
    return out
