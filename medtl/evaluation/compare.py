"""`medtl compare A B`: two binary models scored on the same patients, compared in pairs.

A source is a run folder (its ``oof_predictions.csv`` and ``run_info.json``) or a model
(``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a bundle folder; a run folder stands for
its ``model/`` bundle). Without a manifest, two runs are compared on the out-of-fold
predictions of the images they share; with one, both models predict it and are compared on its
labels. The statistics are :mod:`medtl.evaluation.paired`: the AUROC difference A - B with a
paired patient-bootstrap CI and the clustered DeLong test, and McNemar's exact test on
sensitivity and specificity, each model at its own operating threshold.

Written: ``comparison.md``, a standalone ``comparison.html`` and ``comparison.json`` (every
number). With a tracking URI (``tracking_uri`` or ``$MLFLOW_TRACKING_URI``) an MLflow run
holds the headline metrics and those three files. Sources are named by their reference or
their folder name only, so no local path reaches the files or the store.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtl.errors import ConfigError, MedtlError
from medtl.evaluation.paired import McNemarResult, PairedAUCResult, compare_aurocs, mcnemar
from medtl.spreadsheet import read_csv

__all__ = [
    "DEFAULT_EXPERIMENT",
    "ComparisonResult",
    "SourceSummary",
    "compare_sources",
    "headline_table",
]

DEFAULT_EXPERIMENT = "medtl-compare"
OOF_FILE = "oof_predictions.csv"
RUN_INFO_FILE = "run_info.json"
_MODEL_PREFIXES = ("models:/", "runs:/")


@dataclass(frozen=True)
class SourceSummary:
    """One side of a comparison: its name, what it scored and its operating threshold."""

    name: str  # the reference, or a local folder's name (never its path)
    kind: str  # "run" (out-of-fold predictions) or "model" (predicted the manifest)
    n_images: int  # images with a prediction (OOF rows, or manifest rows read without error)
    n_patients: int
    n_unreadable: int  # manifest rows the model could not read (dropped)
    threshold: float | None  # None: one threshold per fold (the run's pred column)
    threshold_note: str


@dataclass(frozen=True)
class ComparisonResult:
    """A paired comparison of A and B on the same images, with the files it wrote."""

    a: SourceSummary
    b: SourceSummary
    data: str  # what was compared: shared OOF predictions, or the manifest's file name
    classes: list[str]
    positive_class: str
    n_images: int  # compared (shared) images
    n_patients: int
    n_positive: int
    n_negative: int
    auroc: PairedAUCResult
    sensitivity: McNemarResult  # on the positives
    specificity: McNemarResult  # on the negatives
    n_boot: int
    ci: float
    seed: int
    out_dir: Path | None = None
    markdown_path: Path | None = None
    html_path: Path | None = None
    json_path: Path | None = None
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every number as plain JSON values (no local paths), as ``comparison.json`` holds."""
        return {
            "a": asdict(self.a),
            "b": asdict(self.b),
            "data": self.data,
            "classes": list(self.classes),
            "positive_class": self.positive_class,
            "counts": {
                "images": self.n_images,
                "patients": self.n_patients,
                "positive_images": self.n_positive,
                "negative_images": self.n_negative,
            },
            "auroc": _plain(asdict(self.auroc)),
            "sensitivity": _plain(asdict(self.sensitivity)),
            "specificity": _plain(asdict(self.specificity)),
            "settings": {"n_boot": self.n_boot, "ci": self.ci, "seed": self.seed},
        }

    def metrics(self) -> dict[str, float]:
        """The headline numbers as flat MLflow metrics (undefined values left out)."""
        au, se, sp = self.auroc, self.sensitivity, self.specificity
        values: dict[str, Any] = {
            "auroc_a": au.auc_a,
            "auroc_b": au.auc_b,
            "auroc_diff": au.diff,
            "auroc_diff_boot_ci_low": au.bootstrap_ci[0],
            "auroc_diff_boot_ci_high": au.bootstrap_ci[1],
            "auroc_diff_delong_ci_low": au.delong_ci[0],
            "auroc_diff_delong_ci_high": au.delong_ci[1],
            "delong_z": au.delong_z,
            "delong_p": au.delong_p,
            "sensitivity_a": se.rate_a,
            "sensitivity_b": se.rate_b,
            "mcnemar_sensitivity_p": se.p_value,
            "specificity_a": sp.rate_a,
            "specificity_b": sp.rate_b,
            "mcnemar_specificity_p": sp.p_value,
            "n_images": self.n_images,
            "n_patients": self.n_patients,
        }
        return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def _plain(obj: Any) -> Any:
    """Tuples as lists and numpy scalars as Python numbers, for JSON."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------- sources
@dataclass(frozen=True)
class _Scored:
    """One source's scores: one row per image (image, patient_id, label, prob, called)."""

    summary: SourceSummary
    table: pd.DataFrame
    classes: list[str]


def _display_name(ref: str) -> str:
    """A reference as logged: ``models:/...`` as given, a local folder by its name only."""
    if ref.startswith(_MODEL_PREFIXES):
        return ref
    p = Path(ref).expanduser().resolve()
    return f"{p.parent.name}/{p.name}" if p.name == "model" and p.parent.name else p.name


def _is_run_folder(ref: str) -> bool:
    p = Path(ref)
    return p.is_dir() and (p / OOF_FILE).is_file() and (p / RUN_INFO_FILE).is_file()


def _require_binary(task: str, classes: list[str], name: str) -> None:
    """Refuse a multiclass/multilabel source (only binary comparisons exist so far)."""
    if task != "binary" or len(classes) != 2:
        raise ConfigError(
            f"'{name}' is a {task} model with classes {classes}; medtl compare supports binary "
            "tasks only for now (compare one class against the rest in binary runs)"
        )


def _check_labels(labels: pd.Series, classes: list[str], where: str) -> None:
    bad = sorted(set(labels.astype(str)) - set(classes))
    if bad:
        raise MedtlError(
            f"{where} has labels {bad[:5]} outside the model's classes {classes}; "
            "compare on data labelled with the same classes"
        )


def _read_run(ref: str) -> _Scored:
    """A run folder's out-of-fold predictions, thresholded per fold by its ``pred`` column."""
    folder = Path(ref)
    name = _display_name(ref)
    info = json.loads((folder / RUN_INFO_FILE).read_text())
    classes = [str(c) for c in info.get("classes") or []]
    _require_binary(str(info.get("task")), classes, name)
    head = read_csv(folder / OOF_FILE, nrows=0).columns
    text = {c: str for c in head if not c.startswith("prob_") and c != "fold"}
    df = read_csv(folder / OOF_FILE, dtype=text, keep_default_na=False)  # written by write_csv
    prob = f"prob_{classes[1]}"
    missing = [c for c in ("image", "patient_id", "label", prob, "pred") if c not in df.columns]
    if missing:
        raise MedtlError(
            f"{name}/{OOF_FILE} lacks columns {missing} (it has {list(df.columns)}); "
            f"rebuild it with `medtl report {name}`"
        )
    if df["image"].duplicated().any():
        raise MedtlError(
            f"{name}/{OOF_FILE} lists {int(df['image'].duplicated().sum())} image(s) twice; "
            "an out-of-fold table has one row per image"
        )
    _check_labels(df["label"], classes, f"{name}/{OOF_FILE}")
    table = pd.DataFrame(
        {
            "image": df["image"].astype(str),
            "patient_id": df["patient_id"].astype(str),
            "label": df["label"].astype(str),
            "prob": df[prob].astype(float),
            "called": df["pred"].astype(str) == classes[1],
        }
    )
    summary = SourceSummary(
        name=name,
        kind="run",
        n_images=len(table),
        n_patients=int(table["patient_id"].nunique()),
        n_unreadable=0,
        threshold=None,
        threshold_note="each fold's own threshold (the run's pred column)",
    )
    return _Scored(summary, table, classes)


def _bundle_ref(ref: str) -> str:
    """What to load as a model: a run folder stands for its ``model/`` bundle."""
    if _is_run_folder(ref):
        model = Path(ref) / "model"
        if not model.is_dir():
            raise MedtlError(
                f"run '{_display_name(ref)}' has no model/ bundle to predict the manifest with; "
                "give its registered model (models:/NAME@ALIAS) instead"
            )
        return str(model)
    return ref


def _predict_manifest(ref: str, manifest_path: str, tracking_uri: str | None) -> _Scored:
    """Predict the manifest with one model: its scores on every row (``ok``: read)."""
    from medtl.config import TrackingConfig
    from medtl.inference import predict, resolve_model
    from medtl.manifest import read_manifest

    name = _display_name(ref)
    bundle = resolve_model(_bundle_ref(ref), TrackingConfig(uri=tracking_uri))
    classes = [str(c) for c in bundle.classes]
    _require_binary(bundle.task, classes, name)
    dcfg = bundle.cfg.data
    manifest = read_manifest(
        manifest_path, label_column=dcfg.label_column, patient_column=dcfg.patient_column
    )
    df = manifest.df
    if df[dcfg.label_column].isna().any():
        raise MedtlError(
            f"{int(df[dcfg.label_column].isna().sum())} row(s) of {Path(manifest_path).name} "
            "have no label; drop or label them before comparing"
        )
    _check_labels(df[dcfg.label_column], classes, Path(manifest_path).name)
    preds = predict(bundle, manifest_path)
    if len(preds) != len(df):  # predict keeps one row per manifest row, in order
        raise MedtlError(
            f"{name} returned {len(preds)} predictions for {len(df)} rows of "
            f"{Path(manifest_path).name}; check the manifest's image column"
        )
    thr = bundle.threshold
    threshold = float(thr[1] if isinstance(thr, list) else thr)
    ok = preds["error"].isna().to_numpy() if "error" in preds.columns else np.ones(len(df), bool)
    prob = preds[f"prob_{classes[1]}"].to_numpy(dtype=float)
    table = pd.DataFrame(
        {
            "image": df["image"].astype(str).to_numpy(),
            "patient_id": df[dcfg.patient_column].astype(str).to_numpy(),
            "label": df[dcfg.label_column].astype(str).to_numpy(),
            "prob": prob,
            "called": prob >= threshold,
            "ok": ok,
        }
    )
    good = table[table["ok"]]
    summary = SourceSummary(
        name=name,
        kind="model",
        n_images=len(good),
        n_patients=int(good["patient_id"].nunique()),
        n_unreadable=int((~ok).sum()),
        threshold=threshold,
        threshold_note="the model's operating threshold",
    )
    return _Scored(summary, table, classes)


def _same_classes(a: _Scored, b: _Scored) -> None:
    if a.classes != b.classes:
        raise MedtlError(
            f"'{a.summary.name}' has classes {a.classes} and '{b.summary.name}' {b.classes}; "
            "a paired comparison needs the same classes in the same order"
        )


def _join_oof(a: _Scored, b: _Scored) -> pd.DataFrame:
    """Shared images of two runs; their patient and label must agree."""
    m = a.table.merge(b.table, on="image", suffixes=("_a", "_b"))
    if m.empty:
        raise MedtlError(
            f"'{a.summary.name}' ({a.summary.n_images} images) and '{b.summary.name}' "
            f"({b.summary.n_images} images) share no images; compare runs of the same manifest, "
            "or score both models on one manifest with --manifest"
        )
    bad = (m["patient_id_a"] != m["patient_id_b"]) | (m["label_a"] != m["label_b"])
    if bad.any():
        raise MedtlError(
            f"{int(bad.sum())} of {len(m)} shared images have a different patient_id or label in "
            f"'{a.summary.name}' and '{b.summary.name}'; they are not the same data (compare "
            "runs trained on one manifest)"
        )
    return m.rename(columns={"patient_id_a": "patient_id", "label_a": "label"})


def _join_manifest(a: _Scored, b: _Scored) -> pd.DataFrame:
    """Manifest rows both models read, side by side."""
    keep = (a.table["ok"] & b.table["ok"]).to_numpy()
    ta, tb = a.table[keep].reset_index(drop=True), b.table[keep].reset_index(drop=True)
    if not keep.any():
        raise MedtlError("neither model could read any row of the manifest in common")
    return pd.DataFrame(
        {
            "image": ta["image"],
            "patient_id": ta["patient_id"],
            "label": ta["label"],
            "prob_a": ta["prob"],
            "prob_b": tb["prob"],
            "called_a": ta["called"],
            "called_b": tb["called"],
        }
    )


# ---------------------------------------------------------------- report
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{float(v):.{digits}f}"


def _fmt_p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _interval(lo: float | None, hi: float | None) -> str:
    return f"{_fmt(lo)} to {_fmt(hi)}" if lo is not None and hi is not None else "n/a"


def headline_table(result: ComparisonResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the headline table (AUROC, sensitivity, specificity)."""
    pct = f"{result.ci:.0%}"
    au = result.auroc
    header = ["metric", "A", "B", "A − B", f"{pct} CI of A − B", "test", "p"]
    rows = [
        [
            f"AUROC ({result.n_images} images)",
            _fmt(au.auc_a),
            _fmt(au.auc_b),
            _fmt(au.diff),
            f"bootstrap {_interval(*au.bootstrap_ci)}; DeLong {_interval(*au.delong_ci)}",
            f"clustered DeLong z = {au.delong_z:.2f}",
            _fmt_p(au.delong_p),
        ]
    ]
    for label, r in (("Sensitivity", result.sensitivity), ("Specificity", result.specificity)):
        diff = None if r.rate_a is None or r.rate_b is None else r.rate_a - r.rate_b
        rows.append(
            [
                f"{label} ({r.n} images)",
                _fmt(r.rate_a),
                _fmt(r.rate_b),
                _fmt(diff),
                "",
                f"McNemar exact ({r.a_only} A only, {r.b_only} B only)",
                _fmt_p(r.p_value),
            ]
        )
    return header, rows


def _blocks(result: ComparisonResult) -> list[Any]:
    from medtl.evaluation.report.blocks import BulletList, Heading, Paragraph, Table

    a, b = result.a, result.b
    header, rows = headline_table(result)
    sources = [
        [
            side,
            s.name,
            s.kind,
            s.n_images,
            s.n_patients,
            s.n_unreadable,
            _fmt(s.threshold) if s.threshold is not None else "per fold",
        ]
        for side, s in (("A", a), ("B", b))
    ]
    au = result.auroc
    return [
        Heading(1, f"medtl compare: {a.name} vs {b.name}"),
        Paragraph(
            f"Data: {result.data}. Compared on {result.n_images} images of {result.n_patients} "
            f"patients ({result.n_positive} {result.positive_class}, {result.n_negative} "
            f"{result.classes[0]}); positive class: {result.positive_class}."
        ),
        Heading(2, "Results"),
        Table(header, rows),
        Heading(2, "Sources"),
        Table(["side", "source", "kind", "images", "patients", "unreadable", "threshold"], sources),
        Heading(2, "What the tests assume"),
        BulletList(
            [
                f"AUROC difference: patients are resampled. The paired bootstrap draws patients "
                f"with replacement ({au.n_boot_used} of {result.n_boot} resamples usable, "
                f"seed {result.seed}) and scores A and B on the same draw; the DeLong test uses "
                "Obuchowski's clustered variance, so a patient's images count as one correlated "
                "unit.",
                "McNemar's exact test (sensitivity on the positive images, specificity on the "
                "negative ones) treats images as independent; with several images per patient "
                "its p-values are approximate.",
                f"Each model is scored at its own operating threshold: A at {a.threshold_note}, "
                f"B at {b.threshold_note}.",
                "p-values are two-sided and not adjusted for the three comparisons.",
                *_oof_note(result),
            ]
        ),
    ]


def _oof_note(result: ComparisonResult) -> list[str]:
    """What out-of-fold predictions of two runs mean, when those are compared."""
    if result.a.kind != "run":
        return []
    return [
        "Out-of-fold predictions: each image was scored by a fold model that never saw its "
        "patient; when the two runs split patients into folds differently, the difference "
        "also holds that of the splits."
    ]


def _write_files(result: ComparisonResult, out_dir: Path) -> tuple[Path, Path, Path]:
    from medtl.evaluation.report.blocks import render_html, render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(result)
    md, html, js = (out_dir / f"comparison.{s}" for s in ("md", "html", "json"))
    md.write_text(render_markdown(blocks), encoding="utf-8")
    title = f"medtl compare: {result.a.name} vs {result.b.name}"
    html.write_text(render_html(blocks, out_dir, title), encoding="utf-8")
    js.write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return md, html, js


# ---------------------------------------------------------------- tracking
def _log_run(result: ComparisonResult, uri: str, experiment: str) -> str:
    """An MLflow run with both sources as tags, the headline metrics and the three files."""
    from mlflow.entities import Metric

    from medtl.tracking.runs import metric_key
    from medtl.tracking.store import ensure_experiment, make_client, resolve_artifact_location

    client = make_client(uri)
    exp_id = ensure_experiment(client, experiment, resolve_artifact_location(None, uri))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run = client.create_run(
        exp_id,
        run_name=f"compare-{stamp}",
        tags={
            "medtl.compare.a": result.a.name,
            "medtl.compare.b": result.b.name,
            "medtl.compare.data": result.data,
            "medtl.run_kind": "comparison",
        },
    )
    run_id = run.info.run_id
    try:
        ts = int(time.time() * 1000)
        metrics = [Metric(metric_key(k), v, ts, 0) for k, v in result.metrics().items()]
        client.log_batch(run_id, metrics=metrics)
        for path in (result.markdown_path, result.html_path, result.json_path):
            if path is not None:
                client.log_artifact(run_id, str(path))
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return str(run_id)


# ---------------------------------------------------------------- the job
def _score(
    a: str, b: str, manifest: str | None, tracking_uri: str | None
) -> tuple[_Scored, _Scored, pd.DataFrame, str]:
    """Both sources' scores and their paired table, and what data it is."""
    if manifest is None:
        for ref in (a, b):
            if not _is_run_folder(ref):
                raise ConfigError(
                    f"'{_display_name(ref)}' is not a run folder (with {OOF_FILE} and "
                    f"{RUN_INFO_FILE}); to compare models give --manifest M to score both on"
                )
        sa, sb = _read_run(a), _read_run(b)
        _same_classes(sa, sb)
        paired = _join_oof(sa, sb)
        return sa, sb, paired, "out-of-fold predictions of both runs on their shared images"
    sa = _predict_manifest(a, manifest, tracking_uri)
    sb = _predict_manifest(b, manifest, tracking_uri)
    _same_classes(sa, sb)
    paired = _join_manifest(sa, sb)
    return sa, sb, paired, f"manifest {Path(manifest).name}, predicted by both models"


def compare_sources(
    a: str,
    b: str,
    manifest: str | None = None,
    out: str | Path | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> ComparisonResult:
    """Compare A and B on the same patients; write the report and (with a URI) an MLflow run."""
    if not 0 < ci < 1:
        raise ConfigError(f"ci={ci} must lie between 0 and 1 (e.g. 0.95)")
    if n_boot < 0:
        raise ConfigError(f"n_boot={n_boot} must be 0 (no bootstrap) or more (e.g. 1000)")
    sa, sb, paired, data = _score(str(a), str(b), manifest, tracking_uri)
    classes = sa.classes
    y = (paired["label"] == classes[1]).to_numpy().astype(int)
    patients = paired["patient_id"].to_numpy()
    n_pat = int(pd.Series(patients).nunique())
    if y.min() == y.max() or n_pat < 2:
        raise MedtlError(
            f"the {len(y)} shared images ({n_pat} patients) are all '{classes[y[0]]}'; an "
            "AUROC comparison needs both classes and two or more patients"
        )
    auroc = compare_aurocs(
        y,
        paired["prob_a"].to_numpy(dtype=float),
        paired["prob_b"].to_numpy(dtype=float),
        patients,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
    )
    called_a = paired["called_a"].to_numpy(dtype=bool)
    called_b = paired["called_b"].to_numpy(dtype=bool)
    pos, neg = y == 1, y == 0
    result = ComparisonResult(
        a=sa.summary,
        b=sb.summary,
        data=data,
        classes=classes,
        positive_class=classes[1],
        n_images=len(y),
        n_patients=n_pat,
        n_positive=int(pos.sum()),
        n_negative=int(neg.sum()),
        auroc=auroc,
        sensitivity=mcnemar(called_a[pos], called_b[pos]),
        specificity=mcnemar(~called_a[neg], ~called_b[neg]),
        n_boot=n_boot,
        ci=ci,
        seed=seed,
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out) if out is not None else Path("runs") / f"compare-{stamp}"
    md, html, js = _write_files(result, out_dir)
    result = replace(result, out_dir=out_dir, markdown_path=md, html_path=html, json_path=js)
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        from medtl.config import TrackingConfig
        from medtl.tracking.store import resolve_tracking_uri

        uri = resolve_tracking_uri(TrackingConfig(uri=tracking_uri))
        result = replace(result, mlflow_run_id=_log_run(result, uri, experiment))
    return result
