"""Target-site stages of `medtl train` (``domain_adaptation``): the target manifest read and
decoded, the final model adapted, and the model scored on the target before and after.

Target images train only through a joint method's unlabelled batches (coral, dann) or a post-hoc
method's statistics (adabn, tent). Target labels, when the manifest has them, are read only by
:func:`evaluate_target`. A target patient also present in the source manifest is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtl.config import PipelineConfig
from medtl.data import QuarantineEntry
from medtl.errors import ConfigError, ManifestError
from medtl.jobs.prepare import TrainData, TrainInputs, decode_into_cache
from medtl.jobs.selection import OperatingPoint
from medtl.models.model import MedtlModel
from medtl.training.adaptation import ADAPTATION_METHODS
from medtl.training.distributed import DistContext

UNLABELLED = -1  # the label of a target record whose manifest has no label column

SOURCE_NOTE = (
    "Calibration and the decision threshold were fitted on the source site's patients; they "
    "are not validated on the target site. Check them on labelled target patients before use."
)


@dataclass
class TargetData:
    """The target site's decoded images, with labels only when its manifest has them."""

    path: str
    records: list[dict[str, Any]]
    labelled: bool
    manifest_hash: str
    n_listed: int
    quarantine: list[QuarantineEntry] = field(default_factory=list)

    @property
    def n_patients(self) -> int:
        return len({str(r["patient_id"]) for r in self.records})

    def summary(self) -> dict[str, Any]:
        """Counts and identity for lineage, metrics.json and the model card (no identifiers)."""
        return {
            "manifest": Path(self.path).name,
            "manifest_sha256": self.manifest_hash,
            "labelled": self.labelled,
            "n_images": len(self.records),
            "n_patients": self.n_patients,
            "n_quarantined": len(self.quarantine),
        }


def read_target_records(
    cfg: PipelineConfig, path: str | Path, source_records: Sequence[Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], bool, str]:
    """The target manifest as records (labels in the source's class order when present), its
    content hash, and whether it is labelled; ManifestError when it shares patients or image
    files with the source."""
    from medtl.data import records_from_manifest
    from medtl.manifest import read_manifest, validate_manifest

    dcfg = cfg.data
    manifest = read_manifest(
        path,
        label_column=dcfg.label_column,
        patient_column=dcfg.patient_column,
        require_label=False,
    )
    labelled = dcfg.label_column in manifest.df.columns
    report = validate_manifest(manifest, deep=False, classes=dcfg.classes if labelled else None)
    if not report.ok or report.content_hash is None:
        raise ManifestError(
            f"target manifest {path} has {len(report.errors)} error(s): "
            + "; ".join(str(e) for e in report.errors[:5])
        )
    if labelled:
        records, _ = records_from_manifest(manifest, cfg)
    else:
        df = manifest.df
        records = [
            {"image": p, "label": UNLABELLED, "patient_id": str(pid), "row": i}
            for i, (p, pid) in enumerate(zip(df["path"], df[dcfg.patient_column], strict=True))
        ]
    df = manifest.df
    image_of = df["image"].to_numpy()
    site_col = cfg.cv.group_by or "site"
    # Whole columns once; a per-record .iloc builds a pandas Series each time.
    site_of = df[site_col].to_numpy() if site_col in df.columns else None
    for r in records:
        r["image_rel"] = str(image_of[r["row"]])
        r["fold"], r["split"] = -1, "target"
        if site_of is not None:
            r[site_col] = str(site_of[r["row"]])
    check_disjoint(source_records, records, str(path))
    return records, labelled, report.content_hash


def check_disjoint(
    source: Sequence[Mapping[str, Any]], target: Sequence[Mapping[str, Any]], where: str
) -> None:
    """Refuse a target that shares patients or image files with the source (names the count)."""
    shared = {str(r["patient_id"]) for r in source} & {str(r["patient_id"]) for r in target}
    if shared:
        raise ManifestError(
            f"target manifest {where} shares {len(shared)} patient(s) with the source manifest "
            f"(e.g. '{sorted(shared)[0]}'); target patients must never appear in source folds: "
            "remove them from one of the two manifests"
        )
    files = {str(Path(r["image"]).resolve()) for r in source}
    same = [r for r in target if str(Path(r["image"]).resolve()) in files]
    if same:
        raise ManifestError(
            f"target manifest {where} lists {len(same)} image file(s) of the source manifest "
            f"(e.g. '{same[0]['image']}'); the target must be another site's images"
        )


def prepare_target(
    cfg: PipelineConfig, inputs: TrainInputs, data: TrainData, dist: DistContext
) -> TargetData | None:
    """Read, check and decode ``domain_adaptation.target_manifest`` (None when not set)."""
    path, method = cfg.domain_adaptation.target_manifest, cfg.domain_adaptation.method
    if not path and method != "none":
        raise ConfigError(
            f"domain_adaptation.method '{method}' needs domain_adaptation.target_manifest (a "
            "manifest of the target site's images; labels optional, used only to evaluate): "
            "--set domain_adaptation.target_manifest=site_c.csv"
        )
    if not path:
        return None
    records, labelled, digest = read_target_records(cfg, path, inputs.records)
    decoded, quarantine = decode_into_cache(
        records, data.transforms.eval, data.cache_dir, cfg.data, dist, cfg.train.progress
    )
    if not decoded:
        raise ManifestError(f"no image of target manifest {path} could be read (see quarantine)")
    return TargetData(str(path), decoded, labelled, digest, len(records), quarantine)


def target_dataset(cfg: PipelineConfig, data: TrainData, target: TargetData, train: bool) -> Any:
    """The target images with the training (augmented) or evaluation transforms."""
    from medtl.data import build_dataset

    tfm = data.transforms.train if train else data.transforms.eval
    return build_dataset(target.records, tfm, data.cache_dir, cfg.data.cache)


def joint_target(cfg: PipelineConfig, data: TrainData, target: TargetData | None) -> Any:
    """The target dataset a joint method (coral, dann) trains beside the source; else None."""
    if target is None or ADAPTATION_METHODS[cfg.domain_adaptation.method].kind != "joint":
        return None
    return target_dataset(cfg, data, target, train=True)


def post_hoc_adapt(
    model: MedtlModel, cfg: PipelineConfig, target_ds: Any, task: str, device: str = "cpu"
) -> MedtlModel:
    """A copy of ``model`` adapted by adabn or tent on ``target_ds`` (``model`` is unchanged)."""
    from torch.utils.data import DataLoader

    from medtl.training.adaptation import adabn, tent

    da = cfg.domain_adaptation
    adapted = copy.deepcopy(model).to(device)
    loader = DataLoader(target_ds, batch_size=cfg.train.batch_size, shuffle=False)
    if da.method == "adabn":
        return adabn(adapted, loader, device)
    if da.method == "tent":
        multilabel = task == "multilabel"
        return tent(
            adapted,
            loader,
            epochs=da.tent_epochs,
            lr=da.tent_lr,
            multilabel=multilabel,
            device=device,
        )
    raise ValueError(f"{da.method} is not a post-hoc adaptation method (adabn, tent)")


@dataclass
class TargetModels:
    """The model without adaptation ("before") and with it ("after"; None for method none)."""

    before: MedtlModel
    after: MedtlModel | None
    before_point: OperatingPoint | None = None  # the baseline's own point (joint methods)


def adapt_final(
    cfg: PipelineConfig,
    data: TrainData,
    target: TargetData,
    refit_model: MedtlModel,
    folds: Sequence[Any],
    run_dir: Path,
    dist: DistContext,
) -> TargetModels:
    """Before/after models for the target: post-hoc methods adapt a copy of the refit model;
    joint methods compare with the same recipe refit without adaptation (one more training)."""
    method = ADAPTATION_METHODS[cfg.domain_adaptation.method]
    if method.kind == "none":
        return TargetModels(refit_model, None)
    if method.kind == "post_hoc":
        ds = target_dataset(cfg, data, target, train=False)
        return TargetModels(refit_model, post_hoc_adapt(refit_model, cfg, ds, data.task))
    from medtl.jobs.refit import refit_final

    plain = cfg.model_copy(deep=True)
    plain.domain_adaptation.method = "none"
    baseline = refit_final(plain, data, folds, run_dir, dist, workdir_name="final_no_adaptation")
    return TargetModels(baseline.model, refit_model, baseline.point)


def evaluate_target(
    cfg: PipelineConfig,
    data: TrainData,
    target: TargetData,
    models: TargetModels,
    deployed: OperatingPoint,
    run_dir: Path,
) -> dict[str, Any]:
    """``metrics.json["target"]``: target metrics before and after adaptation with patient-
    bootstrap CIs, their paired difference (binary), and ``target_predictions.csv``."""
    from medtl.training import predict_proba

    ds = target_dataset(cfg, data, target, train=False)
    arms = {"before": (models.before, models.before_point or deployed)}
    if models.after is not None:
        arms["after"] = (models.after, deployed)
    raw = {arm: predict_proba(m, ds, cfg) for arm, (m, _) in arms.items()}
    points = {arm: point for arm, (_, point) in arms.items()}
    arm_set = ArmSet(data.classes, data.task, data.subgroups, raw, points)
    return score_target(cfg, target, arm_set, run_dir / "target_predictions.csv")


@dataclass
class ArmSet:
    """Raw target probabilities of each arm ("before", "after") and the operating point each
    is deployed with."""

    classes: list[str]
    task: str
    extra_cols: list[str]
    raw: dict[str, np.ndarray]
    points: dict[str, OperatingPoint]


def score_target(
    cfg: PipelineConfig, target: TargetData, arms: ArmSet, predictions_csv: Path
) -> dict[str, Any]:
    """The target section from each arm's probabilities (calibrated by its own point): metrics
    with CIs when labelled, positive-prediction rates when not; writes ``predictions_csv``."""
    import pandas as pd

    from medtl.spreadsheet import write_csv

    probs = {a: _calibrated(r, arms.points[a], arms.task) for a, r in arms.raw.items()}
    frames = {a: _frame(target, p, arms, a) for a, p in probs.items()}
    write_csv(pd.concat(frames.values()), predictions_csv)  # no spreadsheet formulas
    out: dict[str, Any] = {
        "method": cfg.domain_adaptation.method,
        "method_kind": ADAPTATION_METHODS[cfg.domain_adaptation.method].kind,
        **target.summary(),
        "note": SOURCE_NOTE,
    }
    if not target.labelled:
        out["predicted_positive_rate"] = {
            a: float(np.mean(p[:, -1] >= _scalar(arms.points[a].threshold)))
            for a, p in probs.items()
        }
        out["unlabelled_note"] = (
            "the target manifest has no labels: target discrimination is unknown; only the "
            "share of positive predictions before and after is shown"
        )
        return out
    for a, frame in frames.items():
        out[a] = _arm_metrics(frame, arms, arms.points[a], cfg)
    if "after" in probs and arms.task == "binary":
        out["difference"] = _paired_difference(target, probs["after"], probs["before"], cfg)
    return out


def _calibrated(raw: np.ndarray, point: OperatingPoint, task: str) -> np.ndarray:
    from medtl.evaluation.calibrators import apply_calibration

    return apply_calibration(point.calibration, raw, task)


def _scalar(threshold: Any) -> float:
    return float(threshold[-1]) if isinstance(threshold, list | tuple) else float(threshold)


def _frame(target: TargetData, probs: np.ndarray, arms: ArmSet, arm: str) -> Any:
    from medtl.jobs.pooling import oof_frame

    df = oof_frame(target.records, probs, -1, arms.classes, arms.task, arms.extra_cols)
    df.insert(0, "adaptation", arm)
    return df


def _arm_metrics(
    frame: Any, arms: ArmSet, point: OperatingPoint, cfg: PipelineConfig
) -> dict[str, Any]:
    """The pooled block (summary with CIs, counts) of one arm on the target patients."""
    from medtl.evaluation.metrics import evaluate

    res = evaluate(
        frame.drop(columns=["fold", "adaptation"]),
        arms.classes,
        arms.task,
        point.threshold,
        n_boot=cfg.evaluation.bootstrap,
        ci=cfg.evaluation.ci,
        seed=cfg.seed,
        n_bins=cfg.evaluation.calibration_bins,
    )
    pooled = res["pooled"]
    return {"summary": pooled["summary"], "counts": pooled.get("counts"), "n": pooled["n"]}


def _paired_difference(
    target: TargetData, after: np.ndarray, before: np.ndarray, cfg: PipelineConfig
) -> dict[str, Any]:
    """AUROC after - before on the same target patients: clustered DeLong and paired bootstrap."""
    from medtl.evaluation.paired import compare_aurocs

    y = np.asarray([r["label"] for r in target.records]).astype(int)
    patients = np.asarray([str(r["patient_id"]) for r in target.records])
    if len(np.unique(y)) < 2:
        return {"note": "the target patients have one class only: AUROC is undefined"}
    res = compare_aurocs(
        y,
        after[:, 1],
        before[:, 1],
        patients,
        cfg.evaluation.bootstrap,
        cfg.evaluation.ci,
        cfg.seed,
    )
    return {
        "auroc_after_minus_before": res.diff,
        "bootstrap_ci": list(res.bootstrap_ci),
        "delong_ci": list(res.delong_ci),
        "delong_p": res.delong_p,
        "n_patients": res.n_patients,
    }


def target_lineage(target: TargetData | None, method: str) -> dict[str, str]:
    """Lineage tags naming the adaptation method and the target manifest (hash and counts)."""
    if target is None:
        return {}
    s = target.summary()
    return {
        "medtl.adaptation.method": method,
        "medtl.adaptation.target_manifest_sha256": str(s["manifest_sha256"]),
        "medtl.adaptation.target_images": str(s["n_images"]),
        "medtl.adaptation.target_patients": str(s["n_patients"]),
        "medtl.adaptation.target_labelled": str(s["labelled"]).lower(),
    }


def run_target_stage(
    cfg: PipelineConfig,
    data: TrainData,
    target: TargetData | None,
    refit_model: MedtlModel,
    deployed: OperatingPoint,
    folds: Sequence[Any],
    run_dir: Path,
    dist: DistContext,
) -> tuple[MedtlModel, dict[str, Any] | None]:
    """The model to deploy (adapted when a method is set) and the target section (rank 0)."""
    if target is None:
        return refit_model, None
    models = adapt_final(cfg, data, target, refit_model, folds, run_dir, dist)
    info = evaluate_target(cfg, data, target, models, deployed, run_dir) if dist.is_main else None
    return (models.after if models.after is not None else models.before), info
