"""medtl: transfer learning for medical image classification.

The public API re-exported here is small and lazy (importing ``medtl`` does not import torch,
MONAI or MLflow); each name lives in the module of its pipeline stage.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "medtl.config",
    "build_config": "medtl.config",
    "PipelineConfig": "medtl.config",
    "read_manifest": "medtl.manifest",
    "validate_manifest": "medtl.manifest",
    "load_image": "medtl.io",
    "create_model": "medtl.models",
    "list_backbones": "medtl.models",
    "run_train": "medtl.jobs",
    "resolve_model": "medtl.inference",
    "predict": "medtl.inference",
    "make_demo_data": "medtl.demo_data",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medtl' has no attribute '{name}'")
