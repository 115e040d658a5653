"""``MedtlModel``: one interface over every backbone (features, head, ordered stages).

``create_model`` builds the registry entry, loads its local pretrained weights strictly,
adapts the input channels (2D) or inflates/uses a 3D network, and adds a new head.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from medtl.config import ModelConfig
from medtl.errors import ConfigError, WeightsError
from medtl.models.adapt import network_in_chans
from medtl.models.heads import ClassifierHead, build_head
from medtl.models.registry import BackboneSpec, PreprocessSpec, get_backbone_spec, list_backbones
from medtl.models.weights import load_weights_file, resolve_weights

log = logging.getLogger(__name__)


def backbone_features(backbone: nn.Module) -> int:
    """The pooled feature width every registry backbone exposes as ``num_features``."""
    n = getattr(backbone, "num_features", None)
    if n is None or isinstance(n, torch.Tensor | nn.Module):
        raise ConfigError(f"backbone {type(backbone).__name__} has no integer num_features")
    return int(n)


class MedtlModel(nn.Module):
    """A pretrained feature network plus a new head.

    ``forward_features(x) -> (B, num_features)`` pooled; ``forward_head(f) -> logits``;
    ``stage_groups()`` lists ``[("stem", params), ("stage1", ...), ..., ("head", params)]``
    with every parameter exactly once (transfer strategies freeze/unfreeze by stage).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: ClassifierHead,
        spec: BackboneSpec,
        preprocess: PreprocessSpec,
        weights_info: dict[str, Any],
        spatial_dims: int = 2,
        in_chans: int = 3,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.preprocess = preprocess
        self.weights_info = weights_info
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.num_features = backbone_features(backbone)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def head_kind(self) -> str:
        return self.head.kind

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, num_features)``."""
        return self.backbone(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from pooled features."""
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def reset_head(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one of the same kind."""
        old = self.head
        hidden = old.fc1.out_features if isinstance(old.fc1, nn.Linear) else 256  # mlp head
        self.head = build_head(self.num_features, num_classes, old.kind, hidden, old.drop.p)

    def stage_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Parameters grouped stem -> stage1..N -> head, each parameter exactly once."""
        from timm.models._manipulate import group_parameters

        matcher = self.spec.group_matcher
        if not matcher:  # timm networks (and RadImageNet's) group their own stages
            timm_matcher = getattr(self.backbone, "group_matcher", None)
            if not callable(timm_matcher):
                raise ConfigError(
                    f"backbone '{self.spec.name}' has no stage grouping: its registry entry "
                    "sets no group_matcher and the network has no group_matcher()"
                )
            matcher = timm_matcher(coarse=True)
        groups = group_parameters(self.backbone, matcher)
        named = dict(self.backbone.named_parameters())
        out: list[tuple[str, list[nn.Parameter]]] = []
        for i, gid in enumerate(sorted(groups)):
            name = "stem" if i == 0 else f"stage{i}"
            out.append((name, [named[n] for n in groups[gid]]))
        out.append(("head", list(self.head.parameters())))
        return out


def _check_dims(spec: BackboneSpec, spatial_dims: int, inflate_3d: bool) -> bool:
    """Whether the 2D network must be inflated; ConfigError when the combination is invalid."""
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims not in spec.spatial_dims:
        valid = ", ".join(list_backbones(spatial_dims))
        raise ConfigError(
            f"backbone '{spec.name}' does not support {spatial_dims}D inputs; "
            f"{spatial_dims}D backbones: {valid}"
        )
    native_3d = spec.spatial_dims == (3,)
    if spatial_dims == 3 and not native_3d:
        if not inflate_3d:
            raise ConfigError(
                f"backbone '{spec.name}' is a 2D network: set model.inflate_3d: true to inflate "
                "its ImageNet kernels to 3D (I3D), or choose a 3D backbone: "
                + ", ".join(
                    n for n in list_backbones(3) if get_backbone_spec(n).spatial_dims == (3,)
                )
            )
        return True
    return False


def create_model(
    mcfg: ModelConfig,
    num_classes: int,
    spatial_dims: int = 2,
    pretrained: bool = True,
    *,
    keep_pretrained_head: bool = False,
    weights_dir: str | None = None,
    allow_partial: bool = False,
) -> MedtlModel:
    """Build ``mcfg.backbone`` with its local pretrained weights and a new head.

    Args:
        mcfg: the ``model`` config section.
        num_classes: head outputs (binary tasks use 2).
        spatial_dims: 2 (2D / 2.5D) or 3.
        pretrained: load pretrained weights. ``False`` only when a trained bundle's full state
            dict is loaded next (``medtl.bundle.load_bundle``): the network then starts random.
        keep_pretrained_head: load the checkpoint's original classifier into the head (needs
            ``num_classes`` equal to its classes, e.g. 1000; known-answer checks).
        weights_dir: weights directory (default ``$MEDTL_WEIGHTS_DIR``).
        allow_partial: accept a checkpoint that does not cover every tensor (listed in
            ``weights_info["load"]``).

    Raises:
        WeightsError: weights missing/tampered/not fitting and ``allow_random_init`` is false.
        ConfigError: unknown backbone/tag or an unsupported dimension/channel combination.
    """
    spec = get_backbone_spec(mcfg.backbone)
    if mcfg.weights == "default" and spec.default_tag:
        mcfg = mcfg.model_copy(update={"weights": spec.default_tag})
    inflate = _check_dims(spec, spatial_dims, mcfg.inflate_3d)
    tag = mcfg.weights if mcfg.weights in spec.weights else None
    preprocess = spec.preprocess_for(tag or spec.default_tag)
    try:
        in_chans = network_in_chans(mcfg.in_channels, mcfg.channel_adapt, preprocess.in_chans)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    backbone = spec.builder(in_chans=in_chans, spatial_dims=2 if inflate else spatial_dims)

    info: dict[str, Any] = {"source": "none", "path": None, "sha256": None, "tag": None}
    classifier: dict[str, torch.Tensor] = {}
    want = pretrained and (mcfg.weights is not None or mcfg.weights_path is not None)
    if pretrained and not want and not mcfg.allow_random_init:
        raise WeightsError(
            f"model.weights is null for backbone '{spec.name}': set model.weights (e.g. "
            f"'{spec.default_tag or 'a file path'}') or model.allow_random_init: true to "
            "train from random initialisation"
        )
    if want:
        try:
            resolved = resolve_weights(spec, mcfg.weights, weights_dir, mcfg.weights_path)
            report = load_weights_file(
                backbone, resolved, spec, mcfg.channel_adapt, allow_partial=allow_partial
            )
            info = {**resolved.info(), "load": report.summary()}
            classifier = report.classifier
        except WeightsError as err:
            if not mcfg.allow_random_init:
                raise
            log.warning("model.allow_random_init: RANDOM weights for %s (%s)", spec.name, err)
            info = {**info, "source": "random_init", "error": str(err)}
    elif pretrained:
        log.warning("model.allow_random_init: training %s from RANDOM weights", spec.name)
        info["source"] = "random_init"
    elif not pretrained:
        info["source"] = "none (state dict loaded next)"

    if inflate:
        from medtl.models.inflate import inflate_to_3d

        backbone = inflate_to_3d(backbone)
    head = build_head(
        backbone_features(backbone), num_classes, mcfg.head, mcfg.head_hidden, mcfg.dropout
    )
    if keep_pretrained_head:
        _load_classifier(head, classifier, spec)
    return MedtlModel(backbone, head, spec, preprocess, info, spatial_dims, in_chans)


@torch.no_grad()
def _load_classifier(head: ClassifierHead, classifier: dict[str, torch.Tensor], spec: BackboneSpec):
    w, b = classifier.get("weight"), classifier.get("bias")
    if w is None or b is None:
        raise WeightsError(f"the weights of '{spec.name}' hold no classifier to keep")
    if head.kind != "linear" or tuple(w.shape) != tuple(head.fc.weight.shape):
        raise WeightsError(
            f"pretrained classifier {tuple(w.shape)} does not fit the head "
            f"{tuple(head.fc.weight.shape)} ({head.kind}); use model.head=linear and "
            f"num_classes={w.shape[0]}"
        )
    head.fc.weight.copy_(w)
    head.fc.bias.copy_(b)
