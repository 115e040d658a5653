"""The trained-model bundle: ``weights.safetensors`` + ``medtl_model.json``, no pickle anywhere.

A bundle is everything ``medtl predict`` needs: the trained state dict (safetensors, so
loading never executes code), and a JSON file with the model and transform config sections,
classes, task, operating threshold(s), backbone entry + preprocessing contract, the
pretrained weights record, lineage tags and the medtl version. The network is rebuilt from
config with ``create_model(..., pretrained=False)`` and the state dict is loaded strictly.

PHI rule: a bundle holds no image paths, patient identifiers or absolute paths. The stored
config drops ``data.manifest`` to its file name, ``data.cache_dir`` and the tracking URIs
(which may carry credentials).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import medtl
from medtl.config import PipelineConfig
from medtl.errors import MedtlError, WeightsError

__all__ = [
    "BUNDLE_FORMAT",
    "META_FILE",
    "WEIGHTS_FILE",
    "Bundle",
    "bundle_sha256",
    "find_bundle_dir",
    "load_bundle",
    "read_bundle_meta",
    "save_bundle",
]

BUNDLE_FORMAT = "medtl-bundle/1"
META_FILE = "medtl_model.json"
WEIGHTS_FILE = "weights.safetensors"

ModelFactory = Callable[..., Any]


@dataclasses.dataclass
class Bundle:
    """A loaded trained model (eval mode) with the config and decisions it was trained with."""

    model: Any  # torch.nn.Module, eval mode, on CPU
    cfg: PipelineConfig
    classes: list[str]
    task: str
    threshold: float | list[float]
    meta: dict[str, Any]
    path: Path | None = None
    sha256: str | None = None  # bundle_sha256 of the files it was loaded from

    @property
    def spatial_dims(self) -> int:
        return int(self.meta.get("spatial_dims", self.cfg.spatial_dims))


def _jsonable(obj: Any) -> Any:
    """Config/spec objects (pydantic, dataclass, tuple, numpy scalar) as plain JSON values."""
    if hasattr(obj, "model_dump"):
        return _jsonable(obj.model_dump(mode="json"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalar
        return obj.item()
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def portable_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The config to store in a bundle: no local paths, no credentials (see module doc)."""
    d = cfg.model_dump(mode="json")
    if d["data"].get("manifest"):
        d["data"]["manifest"] = Path(d["data"]["manifest"]).name
    d["data"]["cache_dir"] = None
    d["tracking"]["uri"] = None
    d["tracking"]["artifact_location"] = None
    if d["model"].get("weights_path"):
        d["model"]["weights_path"] = Path(d["model"]["weights_path"]).name
    return d


def save_bundle(
    bundle_dir: str | Path,
    model: Any,
    cfg: PipelineConfig,
    classes: list[str],
    task: str,
    threshold: float | list[float],
    lineage: Mapping[str, str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    training_set: Mapping[str, Any] | None = None,
    input_profile: Mapping[str, Any] | None = None,
) -> Path:
    """Write a trained model as a bundle folder and return the folder.

    ``calibration`` is the fitted calibrator (``medtl.evaluation.calibrators``, JSON form);
    ``training_set`` the salted fingerprint of the training patients and images that
    `medtl evaluate` checks an evaluation set against (hashes only, never identifiers);
    ``input_profile`` the training images' header facts that `medtl predict` checks inputs
    against (``medtl.intended_use``; modality, body part, view, photometric, sizes).

    Raises MedtlError when the class list or threshold does not fit the task.
    """
    from safetensors.torch import save_model

    classes = [str(c) for c in classes]
    if task not in ("binary", "multiclass", "multilabel"):
        raise MedtlError(f"task '{task}' is not one of binary, multiclass, multilabel")
    if task == "binary" and len(classes) != 2:
        raise MedtlError(f"a binary task needs 2 classes, got {classes}")
    if isinstance(threshold, list | tuple) and len(threshold) != len(classes):
        raise MedtlError(
            f"{len(threshold)} thresholds for {len(classes)} classes {classes}: "
            "give one per class (or a single float for binary)"
        )
    from medtl.models.weights import sha256_file
    from medtl.training.distributed import unwrap

    out = Path(bundle_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = unwrap(model)
    weights_path = out / WEIGHTS_FILE
    save_model(net, str(weights_path), metadata={"format": BUNDLE_FORMAT})

    winfo = dict(_jsonable(getattr(net, "weights_info", None) or {}))
    if winfo.get("path"):
        winfo["path"] = Path(str(winfo["path"])).name  # local file name only, no directories
    meta = {
        "format": BUNDLE_FORMAT,
        "medtl_version": medtl.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": task,
        "classes": classes,
        "threshold": _jsonable(threshold),
        "threshold_method": cfg.cv.threshold,
        "spatial_dims": cfg.spatial_dims,
        "backbone": cfg.model.backbone,
        "model": cfg.model.model_dump(mode="json"),
        "transforms": cfg.transforms.model_dump(mode="json"),
        "preprocess": _jsonable(getattr(net, "preprocess", None)),
        "weights_info": winfo,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(weights_path),
        "lineage": dict(lineage or {}),
        "metrics": _jsonable(dict(metrics or {})),
        "calibration": _jsonable(dict(calibration)) if calibration else None,
        "training_set": _jsonable(dict(training_set)) if training_set else None,
        "input_profile": _jsonable(dict(input_profile)) if input_profile else None,
        "config": portable_config(cfg),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False))
    return out


def read_bundle_meta(bundle_dir: str | Path) -> dict[str, Any]:
    """The parsed ``medtl_model.json`` of a bundle folder (no weights loaded)."""
    path = Path(bundle_dir) / META_FILE
    if not path.is_file():
        raise MedtlError(
            f"'{bundle_dir}' is not a medtl bundle: {META_FILE} is missing "
            "(a bundle is the model/ folder of a run, or a registered model: models:/NAME@ALIAS)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise MedtlError(
            f"'{path}' has format {meta.get('format')!r}; this medtl reads {BUNDLE_FORMAT!r}"
        )
    return meta


def bundle_sha256(bundle_dir: str | Path, weights_sha256: str | None = None) -> str:
    """The model's identity in reviews, audits and predictions: sha256 over the bundle's two
    files, ``"<file>:<sha256>\n"`` for the meta file then the weights file.

    Both count: the meta file holds the threshold and calibrator, the weights the network.
    ``weights_sha256`` skips re-hashing a weights file whose digest was just computed.
    """
    from medtl.models.weights import sha256_file

    root = Path(bundle_dir)
    meta = json.loads((root / META_FILE).read_text())
    weights = meta.get("weights_file", WEIGHTS_FILE)
    lines = [
        f"{META_FILE}:{sha256_file(root / META_FILE)}\n",
        f"{weights}:{weights_sha256 or sha256_file(root / weights)}\n",
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def find_bundle_dir(root: str | Path) -> Path:
    """The folder holding ``medtl_model.json`` at or below ``root`` (downloaded MLflow models)."""
    root = Path(root)
    if (root / META_FILE).is_file():
        return root
    hits = sorted(p.parent for p in root.rglob(META_FILE))
    if not hits:
        raise MedtlError(f"no {META_FILE} found under '{root}': not a medtl model")
    if len(hits) > 1:
        raise MedtlError(f"several bundles under '{root}': {[str(h) for h in hits]}; pick one")
    return hits[0]


def load_bundle(bundle_dir: str | Path, *, model_factory: ModelFactory | None = None) -> Bundle:
    """Rebuild the network from the bundle's config and load its safetensors weights strictly.

    ``model_factory(model_cfg, num_classes, spatial_dims=..., pretrained=False)`` defaults to
    ``medtl.models.create_model``. Raises WeightsError when the file was altered or does not
    fit the network.
    """
    from safetensors.torch import load_model

    from medtl.models.weights import sha256_file

    bundle_dir = find_bundle_dir(bundle_dir)
    meta = read_bundle_meta(bundle_dir)
    cfg = PipelineConfig.model_validate(meta["config"])
    classes = list(meta["classes"])
    weights_path = bundle_dir / meta.get("weights_file", WEIGHTS_FILE)
    if not weights_path.is_file():
        raise WeightsError(f"bundle '{bundle_dir}' has no {weights_path.name}")
    weights_sha256 = sha256_file(weights_path)
    if meta.get("weights_sha256") and weights_sha256 != meta["weights_sha256"]:
        raise WeightsError(
            f"{weights_path} does not match the sha256 recorded in {META_FILE}: the file was "
            "altered or truncated; re-download the model"
        )
    if model_factory is None:
        from medtl.models import create_model

        model_factory = create_model
    model = model_factory(
        cfg.model, len(classes), spatial_dims=int(meta["spatial_dims"]), pretrained=False
    )
    try:
        load_model(model, str(weights_path), strict=True, device="cpu")
    except RuntimeError as err:
        raise WeightsError(
            f"{weights_path} does not fit backbone '{cfg.model.backbone}' with "
            f"{len(classes)} classes: {str(err)[:500]}"
        ) from None
    model.eval()
    return Bundle(
        model=model,
        cfg=cfg,
        classes=classes,
        task=meta["task"],
        threshold=meta["threshold"],
        meta=meta,
        path=bundle_dir,
        sha256=bundle_sha256(bundle_dir, weights_sha256),
    )
