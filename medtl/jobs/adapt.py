"""The `medtl adapt` job: a registered model adapted to a new site without retraining (TENT or
AdaBN on the target site's unlabelled images), saved as a new bundle, scored before/after when
the target is labelled, and registered as a ``candidate`` whose lineage names its parent.

Stages: resolve the parent model -> read and decode the target (refused if it shares patients
or images with the parent's training set) -> adapt a copy -> score -> write the run folder ->
log and register.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medtl.config import PipelineConfig, TrackingConfig
from medtl.errors import ConfigError, ManifestError
from medtl.evaluation.calibrators import Calibration
from medtl.jobs.selection import OperatingPoint
from medtl.jobs.target import (
    SOURCE_NOTE,
    ArmSet,
    TargetData,
    post_hoc_adapt,
    read_target_records,
    score_target,
    target_lineage,
)
from medtl.training.adaptation import ADAPTATION_METHODS

POST_HOC = tuple(n for n, m in ADAPTATION_METHODS.items() if m.kind == "post_hoc")


@dataclass
class AdaptOutcome:
    """Where the adapted model went, and what it scored on the target (when labelled)."""

    run_dir: Path
    bundle_dir: Path
    target: dict[str, Any]
    registered: dict[str, Any] | None = None
    model_uri: str | None = None


def run_adapt(
    model_ref: str,
    target_manifest: str | Path,
    *,
    method: str = "tent",
    out_dir: str | Path | None = None,
    register_name: str | None = None,
    tcfg: TrackingConfig | None = None,
) -> AdaptOutcome:
    """Adapt ``model_ref`` to the images of ``target_manifest`` and (optionally) register it."""
    from medtl.inference import resolve_reference

    if method not in POST_HOC:
        raise ConfigError(
            f"medtl adapt --method '{method}' is not a post-hoc method; valid: {', '.join(POST_HOC)} "
            "(coral and dann train jointly: set domain_adaptation in the pipeline and train)"
        )
    resolved = resolve_reference(model_ref, tcfg)
    bundle = resolved.bundle
    cfg = _adapt_config(bundle.cfg, method, target_manifest, tcfg, register_name)
    run_dir = Path(out_dir or f"runs/adapt-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    target, dataset = read_target_for(bundle, cfg, target_manifest, run_dir)
    adapted = post_hoc_adapt(bundle.model, cfg, dataset, bundle.task)
    arms = _score_arms(bundle, adapted, dataset, cfg)
    section = score_target(cfg, target, arms, run_dir / "target_predictions.csv")
    lineage = _adapt_lineage(bundle, resolved, target, method)
    bundle_dir = _save_adapted(run_dir, adapted, cfg, bundle, lineage)
    _write_run_files(run_dir, cfg, bundle, section, lineage)
    outcome = AdaptOutcome(run_dir, bundle_dir, section)
    if cfg.tracking.enabled and register_name:
        outcome.model_uri, outcome.registered = _publish(run_dir, bundle_dir, cfg, lineage)
    return outcome


def _adapt_config(
    parent: PipelineConfig,
    method: str,
    target: str | Path,
    tcfg: TrackingConfig | None,
    register_name: str | None,
) -> PipelineConfig:
    """The parent's config with the adaptation set, and this job's tracking settings."""
    cfg = parent.model_copy(deep=True)
    cfg.domain_adaptation.method = method  # type: ignore[assignment]
    cfg.domain_adaptation.target_manifest = str(target)
    cfg.tracking = (tcfg or TrackingConfig()).model_copy(deep=True)
    cfg.tracking.register_name = register_name
    cfg.train.device = "cpu"
    return cfg


def read_target_for(
    bundle: Any, cfg: PipelineConfig, path: str | Path, run_dir: Path
) -> tuple[TargetData, Any]:
    """The target images decoded with the bundle's own preprocessing, after the check that no
    target patient or image is in the bundle's training set."""
    from medtl.data import build_dataset, prepare_records, write_quarantine
    from medtl.transforms import build_transforms, read_policy

    records, labelled, digest = read_target_records(cfg, path, [])
    _refuse_overlap(bundle, records, str(path))
    m = cfg.model
    tfm = build_transforms(
        cfg.transforms, bundle.model.preprocess, m.in_channels, m.channel_adapt, False,
        read_policy(cfg.data),
    )  # fmt: skip
    cache = run_dir / ".cache"
    prepared = prepare_records(
        records, tfm, cache, cfg.data.max_bad_fraction, False, "disk",
        workers=cfg.data.prepare_workers, decode_timeout_s=cfg.data.decode_timeout_s,
    )  # fmt: skip
    write_quarantine(prepared.quarantine, run_dir / "quarantine.csv")
    if not prepared.records:
        raise ManifestError(f"no image of target manifest {path} could be read (see quarantine)")
    target = TargetData(
        str(path), prepared.records, labelled, digest, len(records), list(prepared.quarantine)
    )
    return target, build_dataset(target.records, tfm, cache, "disk")


def _refuse_overlap(bundle: Any, records: list[dict[str, Any]], where: str) -> None:
    from medtl.evaluation.leakage import check_overlap, optional_salt

    fingerprint = bundle.meta.get("training_set")
    if not fingerprint:
        return
    report = check_overlap(fingerprint, records, optional_salt())
    if report.overlaps:
        raise ManifestError(
            f"target manifest {where} overlaps the model's training set: {report.describe()}; "
            "an adaptation target must be another site's patients"
        )


def _score_arms(bundle: Any, adapted: Any, dataset: Any, cfg: PipelineConfig) -> ArmSet:
    from medtl.training import predict_proba

    point = OperatingPoint(
        Calibration.from_dict(bundle.meta.get("calibration")), bundle.threshold, 0
    )
    raw = {
        "before": predict_proba(bundle.model, dataset, cfg),
        "after": predict_proba(adapted, dataset, cfg),
    }
    extra = list(cfg.evaluation.subgroups)
    return ArmSet(bundle.classes, bundle.task, extra, raw, {"before": point, "after": point})


def _adapt_lineage(bundle: Any, resolved: Any, target: TargetData, method: str) -> dict[str, str]:
    lineage = {str(k): str(v) for k, v in (bundle.meta.get("lineage") or {}).items()}
    lineage.update(target_lineage(target, method))
    lineage["medtl.adaptation.parent_model"] = resolved.reference
    if resolved.name:
        lineage["medtl.adaptation.parent_name"] = resolved.name
        lineage["medtl.adaptation.parent_version"] = str(resolved.version)
    if bundle.sha256:
        lineage["medtl.adaptation.parent_sha256"] = bundle.sha256
    return lineage


def _save_adapted(
    run_dir: Path, model: Any, cfg: PipelineConfig, parent: Any, lineage: dict[str, str]
) -> Path:
    from medtl.bundle import save_bundle

    meta = parent.meta
    return save_bundle(
        run_dir / "model",
        model,
        cfg,
        parent.classes,
        parent.task,
        parent.threshold,
        lineage,
        meta.get("metrics"),
        calibration=meta.get("calibration"),
        training_set=meta.get("training_set"),
        input_profile=meta.get("input_profile"),
    )


def _write_run_files(
    run_dir: Path,
    cfg: PipelineConfig,
    parent: Any,
    section: dict[str, Any],
    lineage: dict[str, str],
) -> None:
    """config.yaml, metrics.json (the target section), run_info.json and adapt_report.md."""
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    metrics = {"target": section, "source_metrics": parent.meta.get("metrics") or {}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    info = {
        "name": cfg.name,
        "kind": "adaptation",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": parent.classes,
        "task": parent.task,
        "final_threshold": parent.threshold,
        "threshold_source": "the parent model's source-site selection (not the target)",
        "lineage": lineage,
        "target": section,
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    (run_dir / "adapt_report.md").write_text(render_adapt_report(section, lineage))


def render_adapt_report(section: dict[str, Any], lineage: dict[str, str]) -> str:
    """A short Markdown report: parent, target, before/after (when labelled), and the warning."""
    from medtl.evaluation.report.formatting import format_ci

    lines = [
        "# medtl adaptation report",
        "",
        f"- Method: {section['method']} (no retraining; no target label is used)",
        f"- Parent model: {lineage.get('medtl.adaptation.parent_model')}",
        f"- Target manifest: {section['manifest']} (sha256 {section['manifest_sha256']}), "
        f"{section['n_images']} images of {section['n_patients']} patients, "
        f"{section['n_quarantined']} quarantined",
        "",
        f"**{SOURCE_NOTE}**",
        "",
    ]
    if section.get("labelled"):
        lines += ["| | AUROC | sensitivity | specificity |", "|---|---|---|---|"]
        for arm in ("before", "after"):
            s = section[arm]["summary"]
            lines.append(
                f"| {arm} | {format_ci(s.get('auroc'))} | {format_ci(s.get('sensitivity'))} | "
                f"{format_ci(s.get('specificity'))} |"
            )
        diff = section.get("difference") or {}
        if "auroc_after_minus_before" in diff:
            low, high = diff["bootstrap_ci"]
            lines += [
                "",
                f"AUROC after - before: {diff['auroc_after_minus_before']:.3f} (paired patient "
                f"bootstrap CI {low:.3f} to {high:.3f})",
            ]
    else:
        lines.append(section.get("unlabelled_note", ""))
    return "\n".join(lines) + "\n"


def _publish(
    run_dir: Path, bundle_dir: Path, cfg: PipelineConfig, lineage: dict[str, str]
) -> tuple[str | None, dict[str, Any] | None]:
    """Log the adaptation as an MLflow run with its model and register it (alias candidate)."""
    from medtl.jobs.tracking import JobTracking
    from medtl.spreadsheet import read_csv
    from medtl.tracking.runs import TrainTracker

    tracker = TrainTracker(cfg.tracking, cfg, lineage)
    tracker.start()
    tracking = JobTracking(tracker)
    status = "FAILED"
    try:
        preds = read_csv(run_dir / "target_predictions.csv")  # written by write_csv
        out = tracking.publish(run_dir, bundle_dir, preds, {})
        status = "FINISHED"
        return out
    finally:
        tracking.end(status)
