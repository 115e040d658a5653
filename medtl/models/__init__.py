"""Pretrained backbones: registry, local weights, input adaptation, heads and stages.

Public API: ``create_model``, ``MedtlModel``, ``list_backbones``, ``get_backbone_spec``,
``PreprocessSpec``, ``WeightsSpec``, ``BackboneSpec``, ``resolve_weights``.
"""

from medtl.models import radimagenet as _radimagenet
from medtl.models.heads import ClassifierHead, build_head, head_from_linear
from medtl.models.model import MedtlModel, create_model
from medtl.models.registry import (
    BackboneSpec,
    PreprocessSpec,
    WeightsSpec,
    get_backbone_spec,
    list_backbones,
    register,
)
from medtl.models.weights import (
    ResolvedWeights,
    convert_keras_h5,
    import_weights,
    list_weights,
    resolve_weights,
)

_radimagenet.register_all()

__all__ = [
    "BackboneSpec",
    "ClassifierHead",
    "MedtlModel",
    "PreprocessSpec",
    "ResolvedWeights",
    "WeightsSpec",
    "build_head",
    "convert_keras_h5",
    "create_model",
    "get_backbone_spec",
    "head_from_linear",
    "import_weights",
    "list_backbones",
    "list_weights",
    "register",
    "resolve_weights",
]
