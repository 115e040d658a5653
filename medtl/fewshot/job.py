"""The `medtl fewshot` job: the file and MLflow edge of few-shot learning.

Two modes over the same stages (manifest -> images decoded once -> embeddings cached once per
image and backbone -> classifier on embeddings):

- ``run_fewshot_episodes``: N-way K-shot episodes drawn by patient from one manifest, scored
  for the pretrained backbone and a randomly initialised copy (``fewshot.json``/``.md``,
  ``episodes.csv``).
- ``run_fewshot_fit``: fit on a support manifest, score a query manifest of other patients
  (the clinical report in ``query/``), and save the classifier as an ordinary model bundle
  (``model/``; cosine head) that `medtl predict`, `register` and `review` take as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medtl.config import PipelineConfig
from medtl.errors import ConfigError
from medtl.fewshot.classifiers import get_classifier
from medtl.fewshot.embed import (
    PRETRAINED,
    EmbeddedSet,
    backbone_variants,
    embed_manifest,
    read_labelled,
)
from medtl.fewshot.episodes import patient_table
from medtl.fewshot.evaluate import EpisodicResult, evaluate_episodes
from medtl.fewshot.fit import FitOutcome, fit_and_save
from medtl.fewshot.report import write_episodic_report

log = logging.getLogger("medtl")

__all__ = [
    "EpisodicOutcome",
    "FitOutcome",
    "check_disjoint",
    "fewshot_config",
    "refuse_cross_validation",
    "run_fewshot_episodes",
    "run_fewshot_fit",
]


def fewshot_config(cfg: PipelineConfig) -> PipelineConfig:
    """A copy of ``cfg`` for the few-shot job, with ``model.head: cosine`` (both classifiers
    act on L2-normalised embeddings; that head holds them).

    Raises:
        ConfigError: ``strategy.name`` is not ``few_shot``, or ``model.head`` is ``mlp``.
    """
    if cfg.strategy.name != "few_shot":
        raise ConfigError(
            f"strategy.name is '{cfg.strategy.name}', but `medtl fewshot` runs strategy "
            "few_shot: use pipelines/cxr_2d_fewshot.yaml or --set strategy.name=few_shot"
        )
    if cfg.model.head == "mlp":
        raise ConfigError(
            "model.head=mlp: the few-shot classifiers are linear on L2-normalised embeddings "
            "and are stored in a cosine head; set model.head=cosine (or leave it out)"
        )
    out = cfg.model_copy(deep=True)
    out.model.head = "cosine"
    return out


def _out_dir(cfg: PipelineConfig, out_dir: str | Path | None, kind: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = Path(out_dir) if out_dir else Path("runs") / f"{cfg.name}-{kind}-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cache_dir(cfg: PipelineConfig, out_dir: Path) -> Path:
    """``data.cache_dir``, ``$MEDTL_CACHE_DIR`` or ``.cache`` beside the output folder (as
    `medtl train`), so decoded images and embeddings are shared with training runs."""
    from medtl.jobs.prepare import resolve_cache_dir

    cache = resolve_cache_dir(cfg.data, out_dir)
    cfg.data.cache_dir = str(cache)
    return cache


def _counts(emb: EmbeddedSet) -> dict[str, int]:
    table = patient_table(emb.patient_ids, emb.labels)
    return dict(zip(emb.inputs.classes, table.counts(len(emb.inputs.classes)), strict=True))


def _write_inputs(out_dir: Path, cfg: PipelineConfig, quarantine: Sequence[Any]) -> None:
    from medtl.data import write_quarantine

    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    write_quarantine(list(quarantine), out_dir / "quarantine.csv")


@dataclass
class EpisodicOutcome:
    """What an episodic evaluation wrote and found."""

    out_dir: Path
    result: EpisodicResult
    json_path: Path
    md_path: Path
    info: dict[str, Any] = field(default_factory=dict)


def run_fewshot_episodes(
    cfg: PipelineConfig,
    manifest_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    shots: Sequence[int] | None = None,
    episodes: int | None = None,
    say: Callable[..., None] | None = None,
) -> EpisodicOutcome:
    """Episodic evaluation on one manifest: mean AUROC and accuracy with CIs per k, for the
    pretrained backbone and a randomly initialised copy, on the same episodes.

    ``shots``/``episodes`` default to ``strategy.fewshot_shots``/``fewshot_episodes``.
    Raises ConfigError before any embedding when a class has too few patients for a k.
    """
    cfg = fewshot_config(cfg)
    if shots is not None:
        cfg.strategy.fewshot_shots = [int(k) for k in shots]
    if episodes is not None:
        cfg.strategy.fewshot_episodes = int(episodes)
    say = say or log.info
    scfg = cfg.strategy
    classifier = get_classifier(scfg.fewshot_classifier)
    out = _out_dir(cfg, out_dir, "fewshot")
    inputs = read_labelled(cfg, manifest_path)
    _check_all_shots(inputs.records, inputs.classes, scfg.fewshot_shots, cfg)
    models = backbone_variants(cfg, len(inputs.classes), random_init=True)
    say(f"few-shot: embedding {len(inputs.records)} images ({', '.join(models)})")
    emb = embed_manifest(cfg, inputs, models, _cache_dir(cfg, out))
    _write_inputs(out, cfg, emb.quarantine)
    table = patient_table(emb.patient_ids, emb.labels)
    result = evaluate_episodes(
        emb.features,
        emb.labels,
        table,
        inputs.classes,
        scfg.fewshot_shots,
        scfg.fewshot_episodes,
        classifier,
        scfg,
        cfg.seed,
        cfg.evaluation.ci,
    )
    info = _episodic_info(cfg, emb, models[PRETRAINED].weights_info)
    js, md = write_episodic_report(out, result, info)
    return EpisodicOutcome(out, result, js, md, info)


def _episodic_info(
    cfg: PipelineConfig, emb: EmbeddedSet, weights: dict[str, Any]
) -> dict[str, Any]:
    """What ``fewshot.json``/``.md`` say about the data, the backbone and the protocol."""
    scfg, inputs = cfg.strategy, emb.inputs
    classifier = get_classifier(scfg.fewshot_classifier)
    return {
        "name": cfg.name,
        "classes": inputs.classes,
        "n_images": len(emb.records),
        "n_patients": len(set(emb.patient_ids)),
        "patients_per_class": _counts(emb),
        "n_quarantined": len(emb.quarantine),
        "backbone": cfg.model.backbone,
        "weights": f"{weights.get('source')}, sha256 {str(weights.get('sha256'))[:12]}",
        "classifier": classifier.name,
        "classifier_description": classifier.description,
        "shots": list(scfg.fewshot_shots),
        "episodes": scfg.fewshot_episodes,
        "ways": scfg.fewshot_ways or len(inputs.classes),
        "query": f"{scfg.fewshot_query} patients per class"
        if scfg.fewshot_query
        else "every remaining patient of the episode's classes",
        "seed": cfg.seed,
        "ci": cfg.evaluation.ci,
        "manifest_hash": inputs.manifest_hash,
    }


def _check_all_shots(
    records: list[dict[str, Any]], classes: list[str], shots: Sequence[int], cfg: PipelineConfig
) -> None:
    """Every k must fit the manifest's patients (checked on the manifest, before decoding)."""
    from medtl.fewshot.episodes import check_shots

    if not shots:
        raise ConfigError("no shots given: pass --shots 1,5,10 or set strategy.fewshot_shots")
    table = patient_table([r["patient_id"] for r in records], [r["label"] for r in records])
    for k in shots:
        check_shots(table, classes, int(k), cfg.strategy.fewshot_ways, cfg.strategy.fewshot_query)


def check_disjoint(support: Sequence[dict[str, Any]], query: Sequence[dict[str, Any]]) -> None:
    """ConfigError when the support and query share a patient or an image file."""
    shared = sorted({str(r["patient_id"]) for r in support} & {str(r["patient_id"]) for r in query})
    if shared:
        raise ConfigError(
            f"{len(shared)} patient(s) are in both the support and the query manifest (first: "
            f"{', '.join(shared[:3])}); a patient's images must all be on one side, or the "
            "query scores are optimistic. Move them to one manifest"
        )
    images = sorted({str(r["image"]) for r in support} & {str(r["image"]) for r in query})
    if images:
        raise ConfigError(
            f"{len(images)} image file(s) are in both the support and the query manifest "
            f"(first: {images[0]}); remove them from one"
        )


def run_fewshot_fit(
    cfg: PipelineConfig,
    support_path: str | Path,
    query_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    register_name: str | None = None,
    say: Callable[..., None] | None = None,
) -> FitOutcome:
    """Fit the classifier on the support patients, report it on the query patients and save
    it as a model bundle under ``out_dir/model``; logged to MLflow (and registered with
    ``register_name``) when ``tracking.enabled``.

    Raises:
        ConfigError: support and query share a patient or image, or a class has no support
            patient.
    """
    cfg = fewshot_config(cfg)
    if register_name:
        cfg.tracking.register_name = register_name
    say = say or log.info
    out = _out_dir(cfg, out_dir, "fewshot-model")
    support_in = read_labelled(cfg, support_path)  # resolves data.classes for the query
    query_in = read_labelled(cfg, query_path)
    check_disjoint(support_in.records, query_in.records)
    models = backbone_variants(cfg, len(support_in.classes), random_init=False)
    cache = _cache_dir(cfg, out)
    say(f"few-shot: {len(support_in.records)} support, {len(query_in.records)} query images")
    support = embed_manifest(cfg, support_in, models, cache)
    query = embed_manifest(cfg, query_in, models, cache)
    _write_inputs(out, cfg, [*support.quarantine, *query.quarantine])
    return fit_and_save(cfg, support, query, models[PRETRAINED], out, _counts(support), say)


def refuse_cross_validation(cfg: PipelineConfig, pipeline: str | Path | None = None) -> None:
    """ConfigError for `medtl train` with strategy few_shot: with a handful of patients a
    k-fold CV leaves folds with one patient of a class or none; few-shot is estimated by
    patient-level episodes and fitted on a support set, by `medtl fewshot`."""
    if cfg.strategy.name != "few_shot":
        return
    p = pipeline or "PIPELINE"
    raise ConfigError(
        "strategy.name=few_shot is not trained by `medtl train` (k-fold CV over a handful of "
        "patients leaves folds without a patient of a class). Estimate it with "
        f"`medtl fewshot --pipeline {p} --manifest M.csv --shots 1,5,10 --episodes 200 --out DIR`"
        f" and build the model with `medtl fewshot --pipeline {p} --support S.csv --query Q.csv "
        "--out DIR`"
    )
