"""Data stages of `medtl train`: the manifest read and checked, patients split into folds, and
every image decoded once into the cache (unreadable files quarantined).

``read_inputs`` -> ``split_patients`` -> ``prepare_data``: each takes the part of the job it
needs and returns a typed record the later stages read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from medtl.config import DataConfig, PipelineConfig
from medtl.data import (
    QuarantineEntry,
    check_bad_fraction,
    prepare_records,
    records_from_manifest,
    write_quarantine,
)
from medtl.errors import ManifestError, TooManyBadFilesError
from medtl.manifest import Manifest, ValidationReport, read_manifest, validate_manifest
from medtl.training.distributed import DistContext
from medtl.transforms import TransformPair

log = logging.getLogger("medtl")
Task = Literal["binary", "multiclass", "multilabel"]


@dataclass
class TrainInputs:
    """A validated manifest as training records: one dict per image, in manifest order."""

    manifest: Manifest
    validation: ValidationReport  # counts (no identifiers)
    manifest_hash: str  # the manifest's content hash: its identity in lineage and MLflow
    records: list[dict[str, Any]]
    classes: list[str]
    task: Task
    subgroups: list[str]  # the configured subgroup columns the manifest really has


@dataclass
class Preprocessing:
    """The transforms derived from the backbone's weights contract, and that contract."""

    train: TransformPair
    eval: TransformPair
    weights_info: dict[str, Any]


@dataclass
class TrainData:
    """What the fold runner, refit and report read: the images that decoded, and why others
    did not."""

    records: list[dict[str, Any]]  # each with fold, split, image_rel and subgroup values
    classes: list[str]
    task: Task
    subgroups: list[str]
    validation: ValidationReport
    manifest_hash: str
    split_df: pd.DataFrame  # fold_assignments.csv: every manifest row, quarantined ones too
    quarantine: list[QuarantineEntry]
    transforms: Preprocessing
    cache_dir: Path
    study_column: str | None = None  # the manifest's study column, when it has one
    quarantine_breakdown: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    @property
    def train_pool(self) -> list[dict[str, Any]]:
        """Every non-test record: cross-validated, then refit on."""
        return [r for r in self.records if r["split"] != "test"]

    @property
    def subgroup_and_study(self) -> list[str]:
        """Record columns the prediction tables carry: the subgroups, then the study."""
        study = self.study_column
        return [*self.subgroups, *([study] if study and study not in self.subgroups else [])]

    @property
    def test(self) -> list[dict[str, Any]]:
        """Held-out test records: scored once, by the final model."""
        return [r for r in self.records if r["split"] == "test"]


def read_inputs(cfg: PipelineConfig, manifest_path: str | Path) -> TrainInputs:
    """Read and validate the manifest (fast checks), then turn its rows into records.

    Resolves ``cfg.data.task`` and ``cfg.data.classes`` in place: every later stage and the saved
    config see the resolved values. Raises ManifestError listing the first errors.
    """
    dcfg = cfg.data
    manifest = read_manifest(
        manifest_path, label_column=dcfg.label_column, patient_column=dcfg.patient_column
    )
    report = validate_manifest(manifest, deep=False, classes=dcfg.classes)
    if not report.ok or report.content_hash is None:  # no hash only for an empty manifest
        raise ManifestError(
            f"manifest {manifest_path} has {len(report.errors)} error(s): "
            + "; ".join(str(e) for e in report.errors[:5])
            + " (run `medtl manifest validate` for the full list)"
        )
    for w in report.warnings:
        log.warning("manifest: %s", w)
    columns = manifest.df.columns
    missing_sub = [c for c in cfg.evaluation.subgroups if c not in columns]
    if missing_sub:
        log.warning("subgroup column(s) %s not in the manifest; skipped", missing_sub)
    records, classes = records_from_manifest(manifest, cfg)
    task = resolve_task(dcfg, records, classes)
    dcfg.task, dcfg.classes = task, list(classes)
    subgroups = [c for c in cfg.evaluation.subgroups if c in columns]
    return TrainInputs(manifest, report, report.content_hash, records, classes, task, subgroups)


def resolve_task(dcfg: DataConfig, records: list[dict], classes: list[str]) -> Task:
    """``data.task``, or when ``auto``: multilabel for list labels, binary for two classes."""
    if dcfg.task != "auto":
        return dcfg.task
    first = records[0]["label"] if records else 0
    if isinstance(first, list | tuple | np.ndarray):
        return "multilabel"
    return "binary" if len(classes) == 2 else "multiclass"


def split_patients(inputs: TrainInputs, cfg: PipelineConfig) -> pd.DataFrame:
    """Patient-grouped folds (and the test split) for every manifest row, attached to each
    record as ``fold``, ``split``, ``image_rel`` and its subgroup values."""
    from medtl.cv import make_splits

    df = inputs.manifest.df
    split_df = make_splits(
        df,
        cfg.cv,
        label_col=cfg.data.label_column,
        patient_col=cfg.data.patient_column,
        seed=cfg.seed,
    )
    if cfg.cv.group_by is not None:  # leave-one-group-out: resolved like data.task, in place
        cfg.cv.folds = int(split_df["fold"].max()) + 1
    # Whole columns once; a per-record .iloc builds a pandas Series each time.
    fold_of, split_of = split_df["fold"].to_numpy(), split_df["split"].to_numpy()
    image_of = df["image"].to_numpy()
    extra = [*inputs.subgroups, cfg.data.study_column]
    subgroup_of = {col: df[col].to_numpy() for col in dict.fromkeys(extra) if col in df.columns}
    for r in inputs.records:
        i = r["row"]
        r["fold"] = int(fold_of[i])
        r["split"] = str(split_of[i])
        r["image_rel"] = str(image_of[i])
        for col, values in subgroup_of.items():
            r[col] = None if pd.isna(values[i]) else str(values[i])
    return split_df


def build_preprocessing(cfg: PipelineConfig, num_classes: int) -> Preprocessing:
    """Train and eval transforms from the backbone's weights contract.

    Building the model here also fails fast on missing weights, before any decoding.
    """
    from medtl.models import create_model
    from medtl.transforms import build_transforms, read_policy

    probe = create_model(cfg.model, num_classes, spatial_dims=cfg.spatial_dims)
    weights_info, preprocess = dict(probe.weights_info), probe.preprocess
    del probe
    m, policy = cfg.model, read_policy(cfg.data)
    return Preprocessing(
        train=build_transforms(
            cfg.transforms, preprocess, m.in_channels, m.channel_adapt, True, policy
        ),
        eval=build_transforms(
            cfg.transforms, preprocess, m.in_channels, m.channel_adapt, False, policy
        ),
        weights_info=weights_info,
    )


def resolve_cache_dir(dcfg: DataConfig, run_dir: Path) -> Path:
    """``data.cache_dir``, else ``$MEDTL_CACHE_DIR``, else ``.cache`` beside the run folder."""
    if dcfg.cache_dir:
        return Path(dcfg.cache_dir)
    env = os.environ.get("MEDTL_CACHE_DIR")
    if env:
        return Path(env)
    # Shared by all runs under the same parent folder, so a second run reuses decoded images.
    return run_dir.parent / ".cache"


def decode_into_cache(
    records: list[dict],
    transforms: TransformPair,
    cache_dir: Path,
    dcfg: DataConfig,
    dist: DistContext,
    progress: bool,
) -> tuple[list[dict], list[QuarantineEntry]]:
    """Decode every image once into the cache; return the readable records and the quarantine.

    Under torchrun each rank decodes only its share (records[rank::world]) into the same cache
    (the packed store gives every writer its own shards); the quarantine lists are then
    gathered so every rank drops the same files and the bad-file limit applies to the whole
    manifest.
    """
    # The decoding pool and the store (data.prepare_workers, data.cache_store); under
    # torchrun, "auto" workers are this rank's share of the node's cores.
    pool: dict[str, Any] = {
        "workers": dcfg.prepare_workers,
        "store": dcfg.cache_store,
        "decode_timeout_s": dcfg.decode_timeout_s,
    }
    if dist.world_size == 1:
        prepared = prepare_records(
            records, transforms, cache_dir, dcfg.max_bad_fraction, progress, dcfg.cache, **pool
        )
        return prepared.records, list(prepared.quarantine)
    import torch.distributed as tdist

    share = records[dist.rank :: dist.world_size]
    mine = prepare_records(
        share, transforms, cache_dir, 1.0, progress=False, cache=dcfg.cache, **pool
    )
    parts: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(parts, [(q.path, q.reason) for q in mine.quarantine])
    quarantine = [QuarantineEntry(p, r) for part in parts for p, r in part]
    check_bad_fraction(quarantine, len(records), dcfg.max_bad_fraction)
    bad = {q.path for q in quarantine}
    return [r for r in records if str(r["image"]) not in bad], quarantine


def _listed(err: TooManyBadFilesError, run_dir: Path, dist: DistContext) -> TooManyBadFilesError:
    """``err`` with every unreadable file written to ``RUN/quarantine.csv`` (rank 0) and the
    message pointing there: its own text names only the first three."""
    path = run_dir / "quarantine.csv"
    if dist.is_main:
        write_quarantine(err.quarantine, path)
    return TooManyBadFilesError(
        f"{err}. The {len(err.quarantine)} unreadable file(s) are listed in {path}",
        err.quarantine,
    )


def quarantine_breakdown(
    inputs: TrainInputs, quarantine: list[QuarantineEntry]
) -> dict[str, dict[str, dict[str, int]]]:
    """Quarantined and total images per label and per subgroup value: a decoder failing at one
    site can drop a subgroup while staying under the bad-file limit."""
    bad = {q.path for q in quarantine}
    cols = {"label": lambda r: str(r["label"])} | {
        c: (lambda r, c=c: str(r.get(c))) for c in inputs.subgroups
    }
    out: dict[str, dict[str, dict[str, int]]] = {}
    for name, value_of in cols.items():
        table: dict[str, dict[str, int]] = {}
        for r in inputs.records:
            cell = table.setdefault(value_of(r), {"quarantined": 0, "total": 0})
            cell["total"] += 1
            cell["quarantined"] += int(str(r["image"]) in bad)
        out[name] = dict(sorted(table.items()))
    if "label" in out:  # class names, not indices
        names = {str(i): c for i, c in enumerate(inputs.classes)}
        out["label"] = {names.get(k, k): v for k, v in out["label"].items()}
    return out


def prepare_data(
    cfg: PipelineConfig,
    inputs: TrainInputs,
    split_df: pd.DataFrame,
    run_dir: Path,
    dist: DistContext,
) -> TrainData:
    """Preprocessing from the weights contract, then every image decoded into the cache.

    Sets ``cfg.data.cache_dir``: the feature cache of every fold and the refit lives there.
    """
    if cfg.data.prepare_workers != 0:
        from medtl.decoder_server import start_decoder_server

        start_decoder_server()  # its imports overlap with building the model below
    transforms = build_preprocessing(cfg, len(inputs.classes))
    cache_dir = resolve_cache_dir(cfg.data, run_dir)
    cfg.data.cache_dir = str(cache_dir)
    try:
        records, quarantine = decode_into_cache(
            inputs.records, transforms.eval, cache_dir, cfg.data, dist, cfg.train.progress
        )
    except TooManyBadFilesError as err:
        raise _listed(err, run_dir, dist) from err
    study = cfg.data.study_column
    return TrainData(
        study_column=study if study in inputs.manifest.df.columns else None,
        quarantine_breakdown=quarantine_breakdown(inputs, quarantine),
        records=records,
        classes=inputs.classes,
        task=inputs.task,
        subgroups=inputs.subgroups,
        validation=inputs.validation,
        manifest_hash=inputs.manifest_hash,
        split_df=split_df,
        quarantine=quarantine,
        transforms=transforms,
        cache_dir=cache_dir,
    )
