"""Batch prediction with a trained model and its own preprocessing; the MLflow pyfunc wrapper.

``resolve_model`` turns ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/m-<id>``,
``runs:/RUN_ID/model`` or a local bundle folder into a loaded :class:`~medtl.bundle.Bundle`
(artifacts downloaded from the configured MLflow store; weights read from safetensors only).
``predict`` runs the bundle's deterministic transforms (never augmentation) and returns one
row per input: ``image, prob_<class>..., pred, error``. An input that cannot be read keeps its
row with the reason in ``error`` and empty probabilities: nothing is dropped silently.

``predict_for_use`` is `medtl predict`: the same rows behind two guards, with provenance.

- Approval gate: only a registered version whose verified review chain ends in an approval
  of exactly the bytes loaded (``medtl.tracking.registry.approval_status``) runs; anything
  else (rejected, not reviewed, a broken chain, other bytes, a bundle folder or run that was
  never registered) needs ``allow_unapproved`` and then every row says ``approved=False``.
  A bundle folder counts as unreviewed even when it is a copy of an approved version: a
  folder carries no proof of which review it passed.
- Intended-use guard: each input's header facts against the bundle's training input
  profile (``medtl.intended_use``); the reason goes to ``out_of_profile``; ``strict``
  refuses those inputs (their row stays, with the refusal in ``error``), and the run goes on.
- Provenance on every row: ``model_name, model_version, model_sha256, approved,
  predicted_at`` (UTC, the run's start).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from medtl.bundle import Bundle, load_bundle
from medtl.config import TrackingConfig
from medtl.errors import ConfigError, MedtlError
from medtl.evaluation.calibrators import apply_calibration
from medtl.tracking.store import import_mlflow

__all__ = [
    "IMAGE_SUFFIXES",
    "PROVENANCE_COLUMNS",
    "GatedPrediction",
    "Provenance",
    "ResolvedModel",
    "collect_inputs",
    "labels_from_probs",
    "predict",
    "predict_for_use",
    "probabilities",
    "profile_flags",
    "resolve_model",
    "resolve_reference",
]

IMAGE_SUFFIXES = (".dcm", ".dicom", ".nii", ".nii.gz", ".hdr", ".mgz", ".png", ".jpg", ".jpeg")
# Files that sit beside images in exports and are not inputs.
_SIDECAR_SUFFIXES = (".txt", ".csv", ".json", ".md", ".xml", ".html", ".img", ".parquet", ".yaml")
_VOLUME_PRESETS = ("ct_2p5d", "ct_3d")


# ---------------------------------------------------------------- model resolution
def _download(mlflow: Any, artifact_uri: str, uri: str, dst: str) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=dst, tracking_uri=uri
        )
    )


def _version_for(client: Any, ref: str) -> Any:
    """The ModelVersion named by ``NAME@ALIAS`` or ``NAME/VERSION`` (errors list what exists)."""
    from mlflow.exceptions import MlflowException

    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException:
            try:
                aliases = sorted(client.get_registered_model(name).aliases)
            except MlflowException:
                raise MedtlError(f"no registered model '{name}' in this MLflow store") from None
            raise ConfigError(
                f"model '{name}' has no alias '{alias}'. Valid aliases: {', '.join(aliases) or 'none'}"
                f" (or use models:/{name}/VERSION)"
            ) from None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        try:
            return client.get_model_version(name, version)
        except MlflowException:
            raise MedtlError(
                f"model '{name}' has no version '{version}' in this MLflow store "
                f"(list them with `medtl audit {name}`)"
            ) from None
    raise ConfigError(f"'models:/{ref}' needs an alias or version: models:/{ref}@approved")


def _model_artifact_uri(client: Any, ref: str) -> tuple[str, Any | None]:
    """The artifact URI of a ``models:/`` or ``runs:/`` reference, and the registered
    ModelVersion it names (None for a logged model or run)."""
    if ref.startswith("models:/m-"):
        return client.get_logged_model(ref.removeprefix("models:/")).artifact_location, None
    if ref.startswith("models:/"):
        mv = _version_for(client, ref.removeprefix("models:/"))
        if getattr(mv, "model_id", None):
            return client.get_logged_model(mv.model_id).artifact_location, mv
        return client.get_model_version_download_uri(mv.name, mv.version), mv
    # runs:/RUN_ID[/path]: medtl logs the model as an MLflow 3 logged model linked to the run.
    run_id = ref.removeprefix("runs:/").split("/", 1)[0]
    model_id = client.get_run(run_id).data.tags.get("medtl.model_id")
    if model_id:
        return client.get_logged_model(model_id).artifact_location, None
    return ref, None


@dataclass
class ResolvedModel:
    """A loaded bundle and the registered version it came from (None: not from the registry)."""

    bundle: Bundle
    reference: str
    name: str | None = None
    version: str | None = None


def resolve_model(
    model_ref: str | Path,
    tcfg: TrackingConfig | None = None,
    *,
    model_factory: Callable[..., Any] | None = None,
) -> Bundle:
    """Load a bundle from a local folder or an MLflow model reference.

    Raises MedtlError/ConfigError naming the reference and what exists instead.
    """
    return resolve_reference(model_ref, tcfg, model_factory=model_factory).bundle


def resolve_reference(
    model_ref: str | Path,
    tcfg: TrackingConfig | None = None,
    *,
    model_factory: Callable[..., Any] | None = None,
) -> ResolvedModel:
    """:func:`resolve_model`, keeping the registered name and version of a ``models:/`` ref."""
    ref = str(model_ref)
    if Path(ref).exists():
        return ResolvedModel(load_bundle(ref, model_factory=model_factory), ref)
    if not ref.startswith(("models:/", "runs:/")):
        raise ConfigError(
            f"model '{ref}' is neither a bundle folder nor an MLflow reference. Valid forms: "
            "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a run's model/ folder"
        )
    from medtl.tracking.store import make_client, resolve_tracking_uri

    mlflow = import_mlflow()
    uri = resolve_tracking_uri(tcfg)
    client = make_client(uri)
    artifact_uri, mv = _model_artifact_uri(client, ref)
    with tempfile.TemporaryDirectory(prefix="medtl-model-") as tmp:
        local = _download(mlflow, artifact_uri, uri, tmp)
        bundle = load_bundle(local, model_factory=model_factory)
    if mv is None:
        return ResolvedModel(bundle, ref)
    return ResolvedModel(bundle, ref, str(mv.name), str(mv.version))


# ---------------------------------------------------------------- inputs
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def collect_inputs(folder: str | Path, volumes: bool = False) -> list[tuple[str, Path]]:
    """Image inputs under ``folder`` as ``(display, path)``, sorted; unknown files included.

    With ``volumes=True`` a folder of several DICOM files is one input (a series). Sidecar
    files (txt, csv, json, ...) and hidden files are skipped; any other file is returned so
    that ``predict`` reports it as unreadable instead of dropping it.
    """
    from medtl.io import is_dicom

    root = Path(folder)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    dicom_dirs: dict[Path, list[Path]] = {}
    singles: list[Path] = []
    for p in files:
        suf = _suffix(p)
        if suf in _SIDECAR_SUFFIXES:
            continue
        if suf in (".dcm", ".dicom") or (suf not in IMAGE_SUFFIXES and is_dicom(p)):
            dicom_dirs.setdefault(p.parent, []).append(p)
        else:
            singles.append(p)
    items: list[Path] = list(singles)
    for d, members in dicom_dirs.items():
        if volumes and len(members) > 1:
            items.append(d)
        else:
            items.extend(members)
    return [(str(p.relative_to(root)) if p != root else ".", p) for p in sorted(items)]


def _manifest_inputs(path: Path) -> list[tuple[str, Path]]:
    df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    if "image" not in df.columns:
        raise ConfigError(
            f"manifest {path} has no 'image' column (columns: {list(df.columns)}); "
            "prediction reads image paths from 'image', relative to the manifest's folder"
        )
    out = []
    for value in df["image"].astype(str):
        p = Path(value)
        out.append((value, p if p.is_absolute() else path.parent / p))
    return out


def _inputs(
    inputs: str | Path | pd.DataFrame | Iterable[str], volumes: bool
) -> list[tuple[str, Path]]:
    if isinstance(inputs, pd.DataFrame):
        if "image" not in inputs.columns:
            raise ConfigError(f"input table needs an 'image' column, has {list(inputs.columns)}")
        return [(str(v), Path(str(v))) for v in inputs["image"]]
    if isinstance(inputs, str | Path):
        p = Path(inputs)
        if p.is_dir():
            return collect_inputs(p, volumes=volumes)
        if p.suffix.lower() in (".csv", ".parquet"):
            return _manifest_inputs(p)
        if p.is_file():
            return [(str(p), p)]
        raise ConfigError(f"input '{p}' does not exist (give a manifest CSV/Parquet or a folder)")
    return [(str(v), Path(str(v))) for v in inputs]


# ---------------------------------------------------------------- outputs
def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    """``(N, C)`` probabilities: sigmoid per label for multi-label, softmax otherwise."""
    logits = np.asarray(logits, dtype=np.float64)
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-logits))
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def labels_from_probs(
    probs: np.ndarray, task: str, threshold: float | list[float], classes: list[str]
) -> list[str]:
    """Predicted label strings: binary by the operating threshold on the positive class,
    multiclass by argmax, multi-label as ``a|b`` of classes at or above their thresholds."""
    if task == "binary":
        thr = float(threshold[1] if isinstance(threshold, list) else threshold)
        return [classes[1] if p >= thr else classes[0] for p in probs[:, 1]]
    if task == "multiclass":
        return [classes[i] for i in probs.argmax(1)]
    thrs = np.broadcast_to(np.asarray(threshold, dtype=float), (len(classes),))
    return [
        "|".join(c for c, hit in zip(classes, row >= thrs, strict=True) if hit) for row in probs
    ]


def _default_transform(bundle: Bundle, allow_burned_in: bool = False) -> Callable[[dict], dict]:
    """The bundle's deterministic transforms. Burned-in annotation is refused unless this call
    allows it: a training run's own choice does not carry over to where a model is used."""
    from medtl.io.base import ReadPolicy
    from medtl.transforms import build_transforms

    preprocess = getattr(bundle.model, "preprocess", None)
    if preprocess is None:
        from medtl.models import get_backbone_spec

        preprocess = get_backbone_spec(bundle.cfg.model.backbone).preprocess
    mcfg = bundle.cfg.model
    policy = ReadPolicy(
        bundle.cfg.data.max_image_bytes, "allow" if allow_burned_in else "quarantine"
    )
    pair = build_transforms(
        bundle.cfg.transforms, preprocess, mcfg.in_channels, mcfg.channel_adapt, False, policy
    )
    return pair.deterministic


def predict(
    bundle: Bundle,
    inputs: str | Path | pd.DataFrame | Iterable[str],
    *,
    transform: Callable[[dict], dict] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    workers: int | Literal["auto"] = 0,
    progress: bool = False,
    gradcam_dir: str | Path | None = None,
    on_item: Callable[[int, Mapping[Hashable, Any]], None] | None = None,
) -> pd.DataFrame:
    """Predict every input; returns ``image, prob_<class>..., pred, error`` (error None if ok).

    ``inputs`` is a manifest (CSV/Parquet with an ``image`` column), a folder (walked for
    DICOM/NIfTI/PNG/JPEG; DICOM series folders are one input for 2.5D/3D models), one file,
    or a table/list of paths. ``transform`` defaults to the bundle's deterministic transforms.
    Inputs are decoded by ``workers`` crash-isolated processes (:mod:`medtl.prediction`; 0, the
    default for library callers such as the MLflow pyfunc: in this process, as a script without
    an ``if __name__ == "__main__"`` guard needs; `medtl predict` uses one per core) and
    run in batches of ``batch_size`` on ``device`` (autocast on CUDA); ``gradcam_dir`` also
    writes Grad-CAM overlays from the same decoded tensors. ``on_item(i, data)`` sees each
    readable input's transformed dict (``pixel_sha256`` included), so a caller can use what
    the decode gave without decoding again.
    """
    from medtl.prediction import PassOptions

    items = _inputs(inputs, _volumes(bundle))
    opts = PassOptions(
        device, batch_size, workers, progress, Path(gradcam_dir) if gradcam_dir else None
    )
    return _predict_items(bundle, items, transform=transform, options=opts, on_item=on_item)


def predict_serial(
    bundle: Bundle,
    inputs: str | Path | pd.DataFrame | Iterable[str],
    *,
    transform: Callable[[dict], dict] | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """The reference path: every input decoded and predicted one after another in this
    process, on the CPU. Kept so tests can check :func:`predict` against it."""
    import torch

    from medtl.preparation.quarantine import quarantine_reason

    items = _inputs(inputs, _volumes(bundle))
    tf = transform or _default_transform(bundle)
    model = bundle.model.cpu().eval()
    logits = np.full((len(items), len(bundle.classes)), np.nan)
    errors: list[str | None] = [None] * len(items)
    for start in range(0, len(items), batch_size):
        for i in range(start, min(start + batch_size, len(items))):
            try:
                x = torch.as_tensor(np.asarray(tf({"image": str(items[i][1])})["image"]))
            except Exception as err:  # any failure is reported for this input, not fatal
                errors[i] = quarantine_reason(err)  # the reason the pool path gives
                continue
            with torch.inference_mode():
                logits[i] = model(x[None].float()).float().numpy()[0]
    return _prediction_frame(bundle, items, logits, errors)


def write_gradcam_pngs(
    bundle: Bundle,
    inputs: str | Path | pd.DataFrame | Iterable[str],
    out_dir: str | Path,
    class_name: str | None = None,
    transform: Any = None,
) -> list[Path]:
    """One PNG per readable input (image | Grad-CAM overlay) for ``class_name``, decoded and
    run like a prediction (without the table). ``inputs`` is what :func:`predict`
    takes, in the same order, so ``<index>`` in ``<index>_<class>.png`` is the prediction CSV's
    row (never the input path, which may carry identifiers). Unreadable inputs are skipped.
    ``class_name`` defaults to the positive class for binary models, else the predicted one."""
    from medtl.prediction import PassOptions, run_pass

    items = _inputs(inputs, _volumes(bundle))
    opts = PassOptions(
        device="cpu",
        workers=0,
        progress=False,
        gradcam_dir=Path(out_dir),
        gradcam_class=class_name,
    )
    return run_pass(bundle, items, transform or _default_transform(bundle), opts).gradcams


def _volumes(bundle: Bundle) -> bool:
    """Whether a folder of DICOM files is one input (a series) for this model."""
    return bundle.cfg.transforms.preset in _VOLUME_PRESETS


def _predict_items(
    bundle: Bundle,
    items: list[tuple[str, Path]],
    *,
    options: Any = None,
    refused: Mapping[int, str] | None = None,
    transform: Callable[[dict], dict] | None = None,
    on_item: Callable[[int, Mapping[Hashable, Any]], None] | None = None,
) -> pd.DataFrame:
    """:func:`predict` over ``(display, path)`` items; ``refused`` rows (index -> reason) are
    not read and keep the reason in ``error``."""
    from medtl.prediction import PassOptions, run_pass

    options = options or PassOptions()
    tf = transform or _default_transform(bundle, options.allow_burned_in)
    res = run_pass(bundle, items, tf, options, refused=refused, on_item=on_item)
    out = _prediction_frame(bundle, items, res.logits, res.errors)
    out.attrs["gradcams"] = [str(p) for p in res.gradcams]
    return out


def _prediction_frame(
    bundle: Bundle, items: list[tuple[str, Path]], logits: np.ndarray, errors: list[str | None]
) -> pd.DataFrame:
    """``image, prob_<class>..., pred, error`` rows; probabilities through the bundle's
    calibrator (fitted where its threshold was chosen) before thresholding."""
    n = len(items)
    ok = ~np.isnan(logits).any(axis=1)
    probs = np.full(logits.shape, np.nan)
    if ok.any():
        raw = probabilities(logits[ok], bundle.task)
        probs[ok] = apply_calibration(bundle.meta.get("calibration"), raw, bundle.task)
    out = pd.DataFrame({"image": [d for d, _ in items]})
    for j, cls in enumerate(bundle.classes):
        out[f"prob_{cls}"] = probs[:, j]
    preds: list[str | None] = [None] * n
    if ok.any():
        labels = labels_from_probs(probs[ok], bundle.task, bundle.threshold, bundle.classes)
        for row, lab in zip(np.flatnonzero(ok).tolist(), labels, strict=True):
            preds[row] = lab
    out["pred"] = preds
    out["error"] = errors
    return out


def group_predictions(
    preds: pd.DataFrame, groups: pd.Series, bundle: Bundle, how: str | None = None
) -> pd.DataFrame:
    """Study- or patient-level rows: each group's images' probabilities aggregated
    (``evaluation.aggregate`` of the model, unless ``how``) and thresholded like one image.

    ``groups`` gives each prediction row its study or patient id (same index as ``preds``);
    unreadable images are left out of their group and counted in ``n_unreadable``.
    """
    from medtl.evaluation.levels import AGGREGATES

    how = how or bundle.cfg.evaluation.aggregate
    if how not in AGGREGATES:
        raise ConfigError(f"aggregate '{how}' is not one of {list(AGGREGATES)}")
    prob_cols = [f"prob_{c}" for c in bundle.classes]
    ok = preds["error"].isna() if "error" in preds.columns else pd.Series(True, preds.index)
    g = groups.astype(str)
    table = preds.loc[ok, prob_cols].groupby(g[ok], sort=True).agg(how)
    counts = pd.DataFrame(
        {"n_images": g[ok].value_counts(), "n_unreadable": g[~ok].value_counts()}
    ).fillna(0)
    table = table.join(counts, how="outer").fillna({"n_images": 0, "n_unreadable": 0})
    has = table[prob_cols].notna().all(axis=1).to_numpy()
    pred: list[str | None] = [None] * len(table)
    if has.any():
        labels = labels_from_probs(
            table.loc[has, prob_cols].to_numpy(), bundle.task, bundle.threshold, bundle.classes
        )
        for row, lab in zip(np.flatnonzero(has).tolist(), labels, strict=True):
            pred[row] = lab
    table["pred"] = pred
    table[["n_images", "n_unreadable"]] = table[["n_images", "n_unreadable"]].astype(int)
    table.index.name = "group"
    return table.reset_index()


# ---------------------------------------------------------------- gated prediction (medtl predict)
#: Columns `medtl predict` adds to every row, after ``error``.
PROVENANCE_COLUMNS = (
    "out_of_profile",
    "model_name",
    "model_version",
    "model_sha256",
    "approved",
    "predicted_at",
)


@dataclass(frozen=True)
class Provenance:
    """Which model made the predictions, whether it was approved, and when."""

    model_name: str  # "" for a model that is not a registered version
    model_version: str
    model_sha256: str  # medtl.bundle.bundle_sha256 of the bytes loaded
    approved: bool
    approval: str  # the approval gate's one-line answer
    predicted_at: str  # UTC, ISO 8601: when this prediction run started


@dataclass
class GatedPrediction:
    """What :func:`predict_for_use` returns: the rows and what they rest on."""

    rows: pd.DataFrame
    bundle: Bundle
    provenance: Provenance
    n_out_of_profile: int
    n_refused: int
    profile_checked: bool  # False: the bundle has no input profile, inputs were not checked


def _approval(resolved: ResolvedModel, tcfg: TrackingConfig | None) -> tuple[bool, str]:
    if resolved.name is None or resolved.version is None:
        return False, (
            f"'{resolved.reference}' is not a registered model version (a bundle folder, run or "
            "logged model carries no review); predict from the registry, e.g. "
            "models:/NAME@approved"
        )
    from medtl.tracking.registry import approval_status

    status = approval_status(resolved.name, resolved.version, resolved.bundle.sha256, tcfg)
    return status.approved, status.reason


def profile_flags(bundle: Bundle, items: Iterable[tuple[str, Path]]) -> dict[int, str]:
    """Index -> why each input is outside the bundle's training input profile (header facts
    only; an input whose header cannot be read is left to prediction to report)."""
    from medtl.errors import UnreadableImageError
    from medtl.intended_use import check_profile, read_image_facts

    profile = bundle.meta.get("input_profile")
    if not profile:
        return {}
    out = {}
    for i, (_, path) in enumerate(items):
        try:
            facts = read_image_facts(path)
        except UnreadableImageError:
            continue
        reason = check_profile(profile, facts)
        if reason:
            out[i] = reason
    return out


def predict_for_use(
    model_ref: str | Path,
    inputs: str | Path | pd.DataFrame | Iterable[str],
    *,
    tcfg: TrackingConfig | None = None,
    allow_unapproved: bool = False,
    strict: bool = False,
    transform: Callable[[dict], dict] | None = None,
    model_factory: Callable[..., Any] | None = None,
    options: Any = None,
) -> GatedPrediction:
    """`medtl predict`: the approval gate, the intended-use guard, then :func:`predict` with
    the provenance columns (see the module docstring).

    Raises MedtlError when the model is not approved (without ``allow_unapproved``), or
    ``strict`` is asked of a bundle that has no input profile.
    """
    started = datetime.now(UTC).isoformat(timespec="seconds")
    resolved = resolve_reference(model_ref, tcfg, model_factory=model_factory)
    bundle = resolved.bundle
    approved, why = _approval(resolved, tcfg)
    if not approved and not allow_unapproved:
        raise MedtlError(
            f"predict refuses this model: {why}. To predict anyway, pass --allow-unapproved "
            "(every row is then marked approved=false)"
        )
    has_profile = bool(bundle.meta.get("input_profile"))
    if strict and not has_profile:
        raise MedtlError(
            "--strict checks inputs against the model's training input profile, and this "
            "bundle has none (made before medtl recorded it); retrain it, or drop --strict"
        )
    items = _inputs(inputs, _volumes(bundle))
    flags = profile_flags(bundle, items)
    refused = (
        {i: f"refused (--strict): outside the model's intended use: {r}" for i, r in flags.items()}
        if strict
        else {}
    )
    rows = _predict_items(bundle, items, refused=refused, transform=transform, options=options)
    prov = Provenance(
        resolved.name or "",
        resolved.version or "",
        bundle.sha256 or "",
        approved,
        why,
        started,
    )
    rows["out_of_profile"] = [flags.get(i) for i in range(len(rows))]
    rows["model_name"] = prov.model_name
    rows["model_version"] = prov.model_version
    rows["model_sha256"] = prov.model_sha256
    rows["approved"] = prov.approved
    rows["predicted_at"] = prov.predicted_at
    return GatedPrediction(rows, bundle, prov, len(flags), len(refused), has_profile)
