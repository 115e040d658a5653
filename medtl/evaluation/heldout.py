"""`medtl evaluate`: the clinical report for a trained model on held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def evaluate_model(model_ref: str, manifest_path: str | Path, out: str | Path | None = None) -> Any:
    """Predict a held-out manifest with a trained model and write the same report as CV."""
    from medtl.evaluation.report import write_evaluation_report
    from medtl.inference import predict, resolve_model
    from medtl.manifest import read_manifest

    bundle = resolve_model(model_ref)
    manifest = read_manifest(manifest_path)
    preds = predict(bundle, manifest_path)
    df = manifest.df.drop(columns=["path"], errors="ignore").copy()
    df["image"] = df["image"].astype(str)
    merged = preds.merge(df, on="image", how="left", suffixes=("", "_manifest"))
    if "error" in merged.columns:
        merged = merged[merged["error"].isna()]
    out_dir = Path(out) if out else Path("runs") / "evaluation"
    info = {"source": str(manifest_path), "model": model_ref}
    return write_evaluation_report(
        out_dir, merged, bundle.classes, bundle.task, bundle.threshold, bundle.cfg, info
    )
