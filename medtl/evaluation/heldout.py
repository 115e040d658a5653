"""`medtl evaluate`: the clinical report for a trained model on held-out data.

Before any report is written the evaluation manifest is checked against the model's
training-set fingerprint (``medtl.evaluation.leakage``): a patient or an image (identical
pixels) the model was trained on makes held-out metrics optimistic, so it is refused unless
``allow_overlap``, and then the report records the overlap.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

from medtl.errors import ManifestError

log = logging.getLogger(__name__)

NOT_CHECKED = (
    "not checked: the model bundle has no training-set fingerprint (saved by an older medtl); "
    "make sure no evaluation patient or image was in its training data"
)


def _overlap_info(
    bundle: Any,
    manifest: Any,
    digests: Mapping[int, str],
    unreadable: set[int],
    allow_overlap: bool,
) -> dict[str, Any]:
    """Check the manifest against the bundle's training set; the report rows it gives.

    ``digests``: pixel sha256 per manifest row, from prediction; rows without one are
    decoded here, except the ``unreadable`` rows prediction could not read (not compared).

    Raises:
        ManifestError: the manifest shares patients or images with the training set and
            ``allow_overlap`` is False.
    """
    from medtl.evaluation.leakage import check_overlap, optional_salt
    from medtl.io import PIXEL_HASH_KEY
    from medtl.manifest.table import IMAGE_COLUMN, PATH_COLUMN

    fingerprint = bundle.meta.get("training_set")
    if not fingerprint:
        log.warning("training-set overlap %s", NOT_CHECKED)
        return {"training-set overlap": NOT_CHECKED}
    df = manifest.df
    records = [
        {
            "patient_id": p,
            "image": None if i in unreadable else path or None,
            PIXEL_HASH_KEY: digests.get(i),
        }
        for i, (p, path) in enumerate(
            zip(df[manifest.patient_column].tolist(), df[PATH_COLUMN].tolist(), strict=True)
        )
    ]
    report = check_overlap(fingerprint, records, optional_salt())
    if report.note:
        log.warning("training-set overlap: %s", report.note)
    if report.overlaps and not allow_overlap:
        patients = _first(f"'{p}'" for p in report.shared_patient_ids)
        images = _first((f"'{df[IMAGE_COLUMN].iat[i]}'" for i in report.shared_rows), 3)
        shared = [f"{report.shared_images} image(s){images} (identical pixels)"]
        if report.patients_compared:
            shared.insert(0, f"{report.shared_patients} patient(s){patients}")
        raise ManifestError(
            f"the evaluation manifest shares {' and '.join(shared)} with the model's training "
            "set, so its metrics would be optimistic"
            + ("" if report.patients_compared else f" (patients not compared: {report.note})")
            + ". Remove them from the manifest, or pass --allow-overlap (allow_overlap=True) "
            "to evaluate anyway; the report then records the overlap"
        )
    counts = report.summary()
    verdict = "present, evaluated anyway (--allow-overlap), so metrics are optimistic: "
    info: dict[str, Any] = {
        "training-set overlap": (verdict if report.overlaps else "none: ") + report.describe(),
        "patients shared with training": counts["shared_patients"]
        if report.patients_compared
        else "not compared",
        "images shared with training": counts["shared_images"],
    }
    if report.note:
        info["training-set overlap note"] = report.note
    if report.overlaps:
        log.warning("evaluating despite the overlap (allow_overlap): %s", report.describe())
    return info


def _first(items: Iterable[str], n: int = 5) -> str:
    """`` (a, b, ...)``: the first ``n`` items for a message, or nothing."""
    items = list(items)
    if not items:
        return ""
    return f" ({', '.join(items[:n])}{', ...' if len(items) > n else ''})"


def evaluate_model(
    model_ref: str,
    manifest_path: str | Path,
    out: str | Path | None = None,
    *,
    allow_overlap: bool = False,
    options: Any = None,
) -> Any:
    """Predict a held-out manifest with a trained model and write the same report as CV.

    The manifest is first checked against the model's training set (patients, and images by
    decoded pixels, hashed during prediction: no second decode); see the module docstring.

    Raises:
        ManifestError: the manifest overlaps the training set and ``allow_overlap`` is False.
    """
    from medtl.evaluation.report import write_evaluation_report
    from medtl.inference import predict, resolve_model
    from medtl.manifest import read_manifest
    from medtl.prediction import PassOptions
    from medtl.transforms import PIXEL_HASH_DATA_KEY

    bundle = resolve_model(model_ref)
    manifest = read_manifest(manifest_path)
    digests: dict[int, str] = {}

    def keep_digest(i: int, data: Mapping[Hashable, Any]) -> None:
        if data.get(PIXEL_HASH_DATA_KEY):
            digests[i] = str(data[PIXEL_HASH_DATA_KEY])

    opts = options or PassOptions(progress=False)
    preds = predict(
        bundle,
        manifest_path,
        on_item=keep_digest,
        device=opts.device,
        batch_size=opts.batch_size,
        workers=opts.workers,
        progress=opts.progress,
    )
    info: dict[str, Any] = {"source": str(manifest_path), "model": model_ref}
    unreadable = set(preds.index[preds["error"].notna()].tolist())
    info.update(_overlap_info(bundle, manifest, digests, unreadable, allow_overlap))
    df = manifest.df.drop(columns=["path"], errors="ignore").copy()
    df["image"] = df["image"].astype(str)
    merged = preds.merge(df, on="image", how="left", suffixes=("", "_manifest"))
    bad = merged[merged["error"].notna()] if "error" in merged.columns else merged.iloc[:0]
    quarantine = [{"path": p, "reason": r} for p, r in zip(bad["image"], bad["error"], strict=True)]
    if "error" in merged.columns:
        merged = merged[merged["error"].isna()]
    out_dir = Path(out) if out else Path("runs") / "evaluation"
    return write_evaluation_report(
        out_dir, merged, bundle.classes, bundle.task, bundle.threshold, bundle.cfg, info,
        quarantine,
    )  # fmt: skip
