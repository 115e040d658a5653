"""Support/query mode, after embedding: fit the classifier on the support images, write the
query's clinical report, save the model bundle and publish it to MLflow.

The bundle is the configured backbone with a cosine head holding the classifier, so the
network computes exactly the probabilities reported here. Its decision rule is fixed by
the classifier (binary: probability >= 0.5, i.e. the nearer prototype or the logistic
decision; multiclass: argmax); nothing is tuned on the query patients, who are only scored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medtl.config import PipelineConfig
from medtl.errors import ConfigError
from medtl.fewshot.classifiers import get_classifier
from medtl.fewshot.embed import PRETRAINED, EmbeddedSet
from medtl.models.model import MedtlModel

__all__ = ["FitOutcome", "fit_and_save", "operating_threshold"]


@dataclass
class FitOutcome:
    """What the support/query mode wrote: the bundle, the query report and its headline."""

    out_dir: Path
    bundle_dir: Path
    report_html: Path
    metrics: dict[str, Any]
    headline: dict[str, float]
    query_probs: np.ndarray
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    model_uri: str | None = None
    registered: dict[str, Any] | None = None


def operating_threshold(task: str, n_classes: int) -> float | list[float]:
    """The classifier's own rule: 0.5 on the positive class (binary), 0.5 per class for the
    one-vs-rest tables of a multiclass report (its prediction is the argmax)."""
    return 0.5 if task == "binary" else [0.5] * n_classes


def _check_support(support: EmbeddedSet) -> None:
    """Every class needs support images, or the model could never predict it."""
    classes = support.inputs.classes
    n = np.bincount(support.labels, minlength=len(classes))
    empty = [c for c, k in zip(classes, n, strict=True) if k == 0]
    if empty:
        raise ConfigError(
            f"class(es) {empty} have no image in the support manifest (images per class: "
            + ", ".join(f"{c}={k}" for c, k in zip(classes, n, strict=True))
            + "); add at least one patient of each class to the support set"
        )


def _query_report(cfg: PipelineConfig, query: EmbeddedSet, probs: np.ndarray, out: Path) -> Any:
    """The query patients' clinical report (the held-out report of `medtl train`)."""
    from medtl.evaluation.report import write_evaluation_report
    from medtl.jobs.pooling import oof_frame

    inputs = query.inputs
    study = cfg.data.study_column
    cols = [*inputs.subgroups, *([study] if study in inputs.manifest.df.columns else [])]
    df = oof_frame(query.records, probs, -1, inputs.classes, inputs.task, list(dict.fromkeys(cols)))
    threshold = operating_threshold(inputs.task, len(inputs.classes))
    source = {"source": "few-shot query patients (none of them in the support set)"}
    paths = write_evaluation_report(
        out / "query", df, inputs.classes, inputs.task, threshold, cfg, source
    )
    return df, paths, json.loads((out / "query" / "metrics.json").read_text())


def _run_info(
    cfg: PipelineConfig,
    support: EmbeddedSet,
    query: EmbeddedSet,
    counts: Mapping[str, int],
    tracking_ids: Mapping[str, str | None],
) -> dict[str, Any]:
    clf = get_classifier(cfg.strategy.fewshot_classifier)
    inputs = support.inputs
    return {
        "name": cfg.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "kind": "fewshot",
        "classes": inputs.classes,
        "task": inputs.task,
        "classifier": clf.name,
        "classifier_description": clf.description,
        "final_threshold": operating_threshold(inputs.task, len(inputs.classes)),
        "threshold_method": "fixed by the classifier (0.5 / argmax); not tuned on the query",
        "operating_rule": "probability >= 0.5 (binary) or argmax (multiclass)",
        "support_manifest_hash": inputs.manifest_hash,
        "query_manifest_hash": query.inputs.manifest_hash,
        "support_images": len(support.records),
        "support_patients": len(set(support.patient_ids)),
        "support_patients_per_class": dict(counts),
        "query_images": len(query.records),
        "query_patients": len(set(query.patient_ids)),
        "quarantine": [
            {"path": q.path, "reason": q.reason} for q in [*support.quarantine, *query.quarantine]
        ],
        "bundle": "model/",
        "mlflow": dict(tracking_ids),
    }


def fit_and_save(
    cfg: PipelineConfig,
    support: EmbeddedSet,
    query: EmbeddedSet,
    model: MedtlModel,
    out: Path,
    counts: Mapping[str, int],
    say: Callable[..., None],
) -> FitOutcome:
    """Fit on ``support``, report on ``query``, save ``out/model`` and publish (see module)."""
    from medtl.bundle import save_bundle
    from medtl.evaluation.leakage import optional_salt, training_fingerprint
    from medtl.fewshot.report import write_fit_summary
    from medtl.jobs.tracking import headline, start_tracking
    from medtl.tracking.lineage import collect_lineage
    from medtl.training.features import set_linear_head

    _check_support(support)
    inputs = support.inputs
    clf = get_classifier(cfg.strategy.fewshot_classifier)
    n_classes = len(inputs.classes)
    head = clf.fit(support.features[PRETRAINED], support.labels, n_classes, cfg.strategy, cfg.seed)
    set_linear_head(model, head.weight, head.bias)
    probs = head.proba(query.features[PRETRAINED])
    df, paths, metrics = _query_report(cfg, query, probs, out)
    top = headline(metrics.get("pooled", {}))
    lineage = collect_lineage(
        cfg, inputs.manifest_hash, inputs.validation.summary, model.weights_info
    )
    tracking = start_tracking(cfg, lineage, inputs.validation, inputs.manifest_hash, True, say)
    status = "FAILED"
    try:
        bundle = save_bundle(
            out / "model",
            model,
            cfg,
            inputs.classes,
            inputs.task,
            operating_threshold(inputs.task, n_classes),
            lineage,
            top,
            calibration=None,
            # Salted hashes of the support patients and pixels: `medtl evaluate` refuses them.
            training_set=training_fingerprint(support.records, optional_salt()),
        )
        info = _run_info(cfg, support, query, counts, tracking.ids)
        (out / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
        write_fit_summary(out, info, top)
        model_uri, registered = tracking.publish(out, bundle, df, metrics)
        status = "FINISHED"
    finally:
        tracking.end(status)
    ids = tracking.ids
    return FitOutcome(
        out,
        bundle,
        paths.html,
        metrics,
        top,
        probs,
        ids["tracking_uri"],
        ids["parent_run_id"],
        model_uri,
        registered,
    )
