"""What a logged medtl model carries, so it loads and serves where medtl was never installed.

- code: a copy of the running medtl package as the model's ``code/medtl`` (no bytecode, which
  holds this machine's source paths), with a ``_build_info.py`` naming the medtl version and
  commit that made the model. MLflow puts ``code/`` on ``sys.path`` when it loads the model.
- requirements: medtl's own dependencies and everything prediction imports (the DICOM decoder
  plugins included), pinned to this environment's versions, local build labels (``+cpu``)
  dropped; never ``medtl`` itself, which no package index has.
- MLmodel: no path of this machine. MLflow records the model code file, the bundle's staging
  folder and the artifact store's location as absolute paths; they are written relative here.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import medtl
from medtl.tracking.lineage import medtl_code_state
from medtl.tracking.store import import_mlflow

__all__ = [
    "MODEL_CODE",
    "SERVING_PACKAGES",
    "log_pyfunc",
    "model_requirements",
    "model_signature",
    "stage_code",
]

#: Distributions the pyfunc imports to load and predict, beside medtl's declared dependencies
#: (kept here too so a medtl run from a source tree, without its metadata, logs them).
SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "monai",
    "timm",
    "safetensors",
    "pydantic",
    "PyYAML",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "nibabel",
    "pillow",
)

MODEL_CODE = '''"""medtl pyfunc entry point (MLflow "models from code": nothing is pickled)."""
import mlflow
from medtl.tracking.pyfunc import MedtlPyfunc

mlflow.models.set_model(MedtlPyfunc())
'''
MODEL_CODE_FILE = "medtl_pyfunc.py"
_PYFUNC = "python_function"


def _declared_dependencies() -> list[str]:
    """Names of medtl's runtime dependencies from its installed metadata (none if absent)."""
    from packaging.requirements import Requirement

    try:
        declared = importlib.metadata.requires("medtl") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    names = []
    for line in declared:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def model_requirements() -> list[str]:
    """Pinned pip requirements of a logged model: ``name==version`` from this environment.

    A package missing here is listed unpinned (pip picks a version where the model is served).
    """
    from packaging.utils import canonicalize_name

    seen: dict[str, str] = {}
    for name in (*SERVING_PACKAGES, *_declared_dependencies()):
        key = canonicalize_name(name)
        if key in seen or key == "medtl":
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            seen[key] = name
            continue
        public = dist.version.split("+", 1)[0]  # "2.4.1+cpu" -> "2.4.1": PyPI has no local labels
        seen[key] = f"{dist.metadata['Name']}=={public}"
    return sorted(seen.values(), key=str.lower)


def _build_info_text() -> str:
    code = medtl_code_state()
    return (
        '"""Written when this medtl code was logged with a model; do not edit."""\n\n'
        f"VERSION = {code.version!r}\nCOMMIT = {code.commit!r}\nDIRTY = {code.dirty!r}\n"
    )


def stage_code(dst: str | Path) -> Path:
    """Copy the running medtl package to ``dst/medtl`` (no bytecode) with its build info."""
    src = Path(medtl.__file__).resolve().parent
    out = Path(dst) / "medtl"
    # demo_data.py writes the demo's fake identifiers (names, MRNs, stations) as test PHI: a
    # served model never needs it, and the store's PHI search must find none of them.
    ignore = shutil.ignore_patterns(
        "__pycache__", "*.pyc", "*.pyo", "_build_info.py", "demo_data.py", "demo.py"
    )
    shutil.copytree(src, out, ignore=ignore)
    (out / "_build_info.py").write_text(_build_info_text())
    return out


def model_signature(classes: list[str]) -> Any:
    """pyfunc signature: optional ``path``/``image``/``b64`` strings or ``array`` (any) per row
    in; ``image``, ``prob_<class>`` doubles, ``pred``, ``error`` out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from mlflow.types.schema import AnyType

    inputs: list[ColSpec | TensorSpec] = [
        ColSpec("string", c, required=False) for c in ("path", "image", "b64")
    ]
    inputs.append(ColSpec(AnyType(), "array", required=False))
    outputs: list[ColSpec | TensorSpec] = [ColSpec("double", f"prob_{c}") for c in classes]
    outputs += [ColSpec("string", "image"), ColSpec("string", "pred"), ColSpec("string", "error")]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


class _PortablePyfunc:
    """``mlflow.pyfunc`` as a ``Model.log`` flavour that writes MLmodel without local paths."""

    @staticmethod
    def save_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
        mlflow = import_mlflow()
        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        conf = mlflow_model.flavors[_PYFUNC]
        # Loading joins the model folder with the file's base name: the base name suffices.
        conf["model_code_path"] = Path(conf["model_code_path"]).name
        for artifact in (conf.get("artifacts") or {}).values():
            artifact["uri"] = artifact["path"]  # was the staging folder of this machine
        mlflow_model.artifact_path = "model"  # was the artifact store's absolute location
        mlflow_model.save(str(Path(path) / "MLmodel"))


def log_pyfunc(
    run_id: str, bundle_dir: str | Path, classes: list[str], tags: Mapping[str, str]
) -> Any:
    """Log the bundle as a self-contained pyfunc model linked to ``run_id``; MLflow ModelInfo.

    The caller sets the process-wide tracking URI and experiment (``Model.log`` reads them).
    """
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="medtl-pyfunc-") as tmp:
        code = Path(tmp) / MODEL_CODE_FILE
        code.write_text(MODEL_CODE)
        package = stage_code(Path(tmp) / "code")
        staged = shutil.copytree(bundle_dir, Path(tmp) / "bundle")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            return Model.log(
                artifact_path=None,
                name="model",
                flavor=_PortablePyfunc,
                flavor_name="mlflow.pyfunc",
                run_id=run_id,
                python_model=str(code),
                artifacts={"bundle": str(staged)},
                code_paths=[str(package)],
                signature=model_signature(classes),
                pip_requirements=model_requirements(),
                tags=dict(tags),
            )
