"""MONAI preprocessing presets (2D radiographs, 2.5D and 3D CT) split into a cacheable part.

``build_transforms`` returns a ``TransformPair``: ``deterministic`` (load, windowing, resize,
channels, normalisation: computed once per image and cached on disk by ``medtl.data``) and
``random`` (augmentation, train only; applied after the cache on every epoch). Normalisation
comes from the backbone's ``PreprocessSpec``, never guessed. Dictionary keys: ``image`` (a
path on input, a float32 tensor on output) and ``pixel_sha256`` (``PIXEL_HASH_DATA_KEY``:
the decoded pixels' sha256, set at load); any other key (``label``...) passes through.

Augmentation never flips left-right: in chest radiographs and CT the heart side, situs and
laterality markers are anatomy, and a mirrored image is a different (abnormal) patient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
    ResizeWithPadOrCropd,
    Spacingd,
    SpatialPadd,
)

from medtl.config import DataConfig, TransformConfig, WindowConfig
from medtl.errors import ConfigError, UnreadableImageError, look_up_option
from medtl.io.base import ReadPolicy

log = logging.getLogger(__name__)

# Bump when a change here alters the deterministic output for the same config: it is part
# of the on-disk cache key, so old caches are not reused.
# "2": the deterministic output also holds PIXEL_HASH_DATA_KEY (caches without it are not reused).
TRANSFORMS_VERSION = "2"
# The decoded pixels' ``medtl.io.pixel_sha256`` (hex) in the data dict. Not "image_...": MONAI
# spatial transforms (Spacingd, ...) treat every "<key>_..." entry as that key's meta dict.
PIXEL_HASH_DATA_KEY = "pixel_sha256"

# (center, width) in HU, the usual radiology presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (50.0, 400.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
}
FILE_WINDOW = "file"
PRESETS = ("cxr_2d", "ct_2p5d", "ct_3d")
AUGMENTS = ("none", "light", "standard")

# ITU-R BT.601 luma weights: an RGB export of a grey radiograph back to one channel.
_LUMA = (0.299, 0.587, 0.114)
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class TransformPair:
    """Deterministic (cacheable) and random (per-epoch) halves of one preprocessing chain."""

    deterministic: Compose
    random: Compose
    cache_key: str
    out_channels: int


# --------------------------------------------------------------------------- transforms
def resolve_window(window: str | WindowConfig | Mapping | None) -> tuple[float, float] | str | None:
    """``(center, width)`` for a preset name or ``{center, width}``; ``"file"`` or None as is."""
    if window is None:
        return None
    if isinstance(window, WindowConfig):
        return (float(window.center), float(window.width))
    if isinstance(window, Mapping):
        return resolve_window(WindowConfig(**window))
    if window == FILE_WINDOW:
        return FILE_WINDOW
    name = look_up_option(str(window), [*WINDOW_PRESETS, FILE_WINDOW], "transforms.window")
    return WINDOW_PRESETS[name]


def window_to_unit(x: torch.Tensor | np.ndarray, center: float, width: float):
    """Linear VOI window: ``center - width/2`` -> 0, ``center + width/2`` -> 1, clipped."""
    lo = center - width / 2.0
    return ((x - lo) / width).clip(0.0, 1.0)


class Windowd(MapTransform):
    """Intensity to [0, 1]: a fixed window, the file's own VOI window, or percentile clip.

    ``window="file"`` reads ``window_center``/``window_width`` from the MetaTensor meta
    (set by ``MedtlReader``); files without a VOI window fall back to the percentile clip
    (or min-max when ``percentiles`` is None), and that fallback is logged.
    """

    def __init__(
        self,
        keys: Any,
        window: tuple[float, float] | str | None,
        percentiles: tuple[float, float] | None,
    ):
        super().__init__(keys)
        self.window = window
        self.percentiles = percentiles

    def _fallback(self, img: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(img, dtype=torch.float32)
        arr = x.detach().cpu().numpy()
        if self.percentiles is not None:
            # Percentiles of a regular spatial grid of <= ~1M pixels: within a grey level of
            # the full-image value on radiographs, and 10x cheaper on a 2500x2048 image.
            step = max(1, math.ceil((arr.size / 2**20) ** (1 / max(arr.ndim - 1, 1))))
            grid = arr[(slice(None),) + (slice(None, None, step),) * (arr.ndim - 1)]
            lo, hi = (float(v) for v in np.percentile(grid, self.percentiles))
        else:
            lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return x * 0.0
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            win = self.window
            if win == FILE_WINDOW:
                meta = getattr(img, "meta", {}) or {}
                c, w = meta.get("window_center"), meta.get("window_width")
                if c is not None and w is not None and np.isfinite(float(c)) and float(w) > 0:
                    win = (float(c), float(w))
                else:
                    log.info("no VOI window in %s; using the percentile clip", meta.get("source"))
                    win = None
            if win is None:
                out = self._fallback(img)
            else:
                out = window_to_unit(torch.as_tensor(img, dtype=torch.float32), *win)
            d[key] = out
        return d


class ToChannelsd(MapTransform):
    """Grey/RGB to the channel count the network expects.

    3 -> 1: BT.601 luminance (RGB exports of grey radiographs); 1 -> n: repeat (pretrained
    RGB stems with ``channel_adapt=repeat``); n -> n: kept, reversed for BGR networks.
    """

    def __init__(self, keys: Any, channels: int, channel_order: str = "RGB"):
        super().__init__(keys)
        self.channels = channels
        self.bgr = channel_order == "BGR"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            c = img.shape[0]
            if c == self.channels:
                if self.bgr and c == 3:
                    img = img.flip(0)
            elif c == 3 and self.channels == 1:
                w = torch.tensor(_LUMA, dtype=img.dtype).view(3, *([1] * (img.ndim - 1)))
                img = (img * w).sum(0, keepdim=True)
            elif c == 1:
                img = img.repeat(self.channels, *([1] * (img.ndim - 1)))
            else:
                raise UnreadableImageError(
                    _source(d[key]),
                    f"image has {c} channels; the network expects {self.channels} "
                    "(1 = grey, 3 = RGB)",
                )
            d[key] = img
        return d


class FitResized(MapTransform):
    """Resize so the whole image fits ``spatial_size`` keeping its aspect ratio.

    Downsampling uses area averaging (anti-aliased, unlike bilinear on 10x reductions);
    upsampling uses ``mode``. Pad afterwards (``SpatialPadd``) to the exact size.
    """

    def __init__(self, keys: Any, spatial_size: tuple[int, ...], mode: str = "bilinear"):
        super().__init__(keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            shape = img.shape[1:]
            scale = min(t / s for t, s in zip(self.spatial_size, shape, strict=True))
            size = tuple(
                max(1, min(t, round(s * scale)))
                for t, s in zip(self.spatial_size, shape, strict=True)
            )
            if size == tuple(shape):
                d[key] = img
                continue
            mode = "area" if scale < 1 else self.mode
            resize = Resize(size, mode=mode, align_corners=None if mode == "area" else False)
            d[key] = torch.as_tensor(resize(img))
        return d


class SelectSlicesd(MapTransform):
    """A 3D volume -> ``k`` adjacent axial slices as channels (2.5D input).

    The axial axis is the array axis closest to world S/I in the affine; without an affine
    (frame stacks) it is the first spatial axis, as ``medtl.io`` lays out frames. The center
    slice is ``data["slice"]`` (manifest column ``slice``: an index along that axis of the
    loaded, reoriented volume) when the record has one, else the middle; slices past the
    ends repeat the edge slice.
    """

    def __init__(self, keys: Any, k: int, slice_key: str = "slice"):
        super().__init__(keys)
        self.k = k
        self.slice_key = slice_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = torch.as_tensor(img)
            if arr.ndim != 4:
                raise UnreadableImageError(
                    _source(img),
                    f"preset ct_2p5d needs a 3D volume, got an array of shape {tuple(arr.shape)} "
                    "(use preset cxr_2d for 2D images)",
                )
            if arr.shape[0] != 1:
                raise UnreadableImageError(
                    _source(img), f"ct_2p5d needs a one-channel volume, got {arr.shape[0]} channels"
                )
            axis = _axial_axis(img)
            n = arr.shape[1 + axis]
            centre = d.get(self.slice_key)
            centre = n // 2 if centre is None or _isnan(centre) else int(centre)
            if not 0 <= centre < n:
                raise UnreadableImageError(
                    _source(img), f"slice {centre} is outside the volume's {n} axial slices"
                )
            idx = [
                min(max(centre + o, 0), n - 1) for o in range(-(self.k // 2), self.k - self.k // 2)
            ]
            vol = arr[0].movedim(axis, 0)  # (slices, a, b)
            d[key] = vol[idx].clone()
        return d


def _isnan(v: Any) -> bool:
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def _source(img: Any) -> str:
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("source") or meta.get("filename_or_obj") or "<image>")


def _axial_axis(img: Any) -> int:
    """Spatial axis (0-based, channels excluded) along world S/I, from the image affine."""
    meta = getattr(img, "meta", None) or {}
    affine = meta.get("affine")
    if affine is None or not meta.get("has_affine", True):
        return 0
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine, dtype=float)[:4, :4])
    for axis, (world, _) in enumerate(ornt):
        if int(world) == 2:
            return axis
    return 0


# --------------------------------------------------------------------------- building
def _percentiles(tcfg: TransformConfig) -> tuple[float, float] | None:
    p = tcfg.percentile_clip
    if p is None:
        return None
    if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
        raise ConfigError(
            f"transforms.percentile_clip must be [low, high] with 0 <= low < high <= 100, got {p}"
        )
    return (float(p[0]), float(p[1]))


def network_channels(preprocess: Any, in_channels: int, channel_adapt: str) -> int:
    """Channels the network's first conv takes (``repeat`` keeps the pretrained count)."""
    from medtl.models.adapt import network_in_chans

    look_up_option(channel_adapt, ("fold_sum", "fold_mean", "repeat"), "model.channel_adapt")
    try:
        return network_in_chans(in_channels, channel_adapt, int(getattr(preprocess, "in_chans", 3)))
    except ValueError as err:
        raise ConfigError(f"model.{err} (model.in_channels)") from None


def _normalise(preprocess: Any, channels: int) -> list:
    """Mean/std from the weights' contract: per channel when the counts match, else the
    mean of means / mean of stds (a folded stem sums the RGB kernels over one input)."""
    if getattr(preprocess, "normalization", "mean_std") == "zscore":
        return [NormalizeIntensityd(keys="image", channel_wise=True)]
    mean = [float(m) for m in preprocess.mean]
    std = [float(s) for s in preprocess.std]
    if len(mean) == channels:
        sub, div = mean, std
    else:
        sub, div = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
    # MONAI annotates NormalizeIntensityd's subtrahend/divisor as arrays only, but forwards
    # them to NormalizeIntensity, which declares and accepts per-channel sequences.
    return [
        NormalizeIntensityd(keys="image", subtrahend=sub, divisor=div, channel_wise=True)  # type: ignore[arg-type]
    ]


def _augment_2d(level: str) -> list:
    if level == "none":
        return []
    strong = level == "standard"
    rot = math.radians(15 if strong else 10)
    scale = 0.15 if strong else 0.10
    ops: list = [
        RandAffined(
            keys="image",
            prob=0.8,
            rotate_range=(rot,),
            scale_range=(scale, scale),
            translate_range=(0.05 if strong else 0.0, 0.05 if strong else 0.0),
            mode="bilinear",
            padding_mode="border",
            spatial_size=None,
        ),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),  # contrast
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),  # brightness
    ]
    if strong:
        ops += [
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
            RandGaussianNoised(keys="image", prob=0.3, std=0.05),
        ]
    return ops


def _augment_3d(level: str) -> list:
    if level == "none":
        return []
    strong = level == "standard"
    rot = math.radians(10 if strong else 5)
    scale = 0.1 if strong else 0.05
    ops: list = [
        RandAffined(
            keys="image",
            prob=0.5,
            rotate_range=(rot, rot, rot),
            scale_range=(scale, scale, scale),
            mode="bilinear",
            padding_mode="border",
        ),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ]
    if strong:
        ops.append(RandGaussianNoised(keys="image", prob=0.3, std=0.05))
    return ops


class LoadMedtld(MapTransform):
    """Path -> MetaTensor through ``medtl.io.load_image`` (MONOCHROME1 inverted, modality LUT
    applied, channel-first); meta as ``MedtlReader`` gives it. Lighter than ``LoadImaged``,
    which builds every default MONAI reader per instance.

    With ``hash_key`` the decoded pixels' ``medtl.io.pixel_sha256`` (before reorientation or
    any other transform) is stored under ``data[hash_key]``: it travels through the cache, so
    the leakage checks get every image's content hash without decoding it again.
    """

    def __init__(
        self,
        keys: Any,
        reorient: str | None = None,
        hash_key: str | None = None,
        policy: ReadPolicy | None = None,
    ):
        super().__init__(keys)
        self.reorient = reorient
        self.hash_key = hash_key
        self.policy = policy or ReadPolicy()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        from medtl.io import load_image, pixel_sha256, reorient
        from medtl.io.monai_reader import monai_meta

        d = dict(data)
        for key in self.key_iterator(d):
            img = load_image(d[key], policy=self.policy)
            if self.hash_key is not None:
                d[self.hash_key] = pixel_sha256(img)
            if self.reorient:
                img = reorient(img, self.reorient)
            meta = monai_meta(img)
            meta["filename_or_obj"] = str(d[key])
            meta["has_affine"] = img.meta.affine is not None  # monai_meta fills in a diagonal
            d[key] = MetaTensor(np.ascontiguousarray(img.array), meta=meta)
        return d


def read_policy(dcfg: DataConfig) -> ReadPolicy:
    """The readers' refusals from ``cfg.data`` (max_image_bytes, burned_in_annotation)."""
    return ReadPolicy(dcfg.max_image_bytes, dcfg.burned_in_annotation)


def _loader(policy: ReadPolicy, reorient: str | None = None) -> LoadMedtld:
    return LoadMedtld("image", reorient=reorient, hash_key=PIXEL_HASH_DATA_KEY, policy=policy)


def _size(tcfg: TransformConfig, dims: int) -> tuple[int, ...]:
    if len(tcfg.spatial_size) != dims:
        raise ConfigError(
            f"transforms.spatial_size has {len(tcfg.spatial_size)} values but preset "
            f"'{tcfg.preset}' needs {dims}, e.g. {[224, 224] if dims == 2 else [96, 96, 64]}"
        )
    return tuple(int(s) for s in tcfg.spatial_size)


def build_transforms(
    tcfg: TransformConfig,
    preprocess: Any,
    in_channels: int = 1,
    channel_adapt: str = "fold_sum",
    train: bool = False,
    read_policy: ReadPolicy | None = None,
) -> TransformPair:
    """The preset's deterministic (cached) and random (train-only) MONAI transforms.

    Args:
        tcfg: ``cfg.transforms``.
        preprocess: the backbone weights' ``PreprocessSpec`` (mean/std, channels, interpolation).
        in_channels: ``cfg.model.in_channels`` (grey = 1; 2.5D = ``transforms.slices``).
        channel_adapt: ``cfg.model.channel_adapt``; ``repeat`` repeats grey to the
            pretrained channel count, the ``fold_*`` modes feed ``in_channels`` as they are.
        train: include augmentation (``tcfg.augment``) in ``random``; eval gets an empty one.
        read_policy: what the reader refuses (``read_policy(cfg.data)``); default: 2 GiB
            images at most, burned-in annotation quarantined.

    Raises:
        ConfigError: an unknown preset/window, or channels that do not fit the preset.
    """
    policy = read_policy or ReadPolicy()
    preset = look_up_option(tcfg.preset, PRESETS, "transforms.preset")
    look_up_option(tcfg.augment, AUGMENTS, "transforms.augment")
    window = resolve_window(tcfg.window)
    pct = _percentiles(tcfg)
    chans = network_channels(preprocess, in_channels, channel_adapt)
    interp = str(getattr(preprocess, "interpolation", "bilinear"))
    interp = interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear"

    if preset == "cxr_2d":
        size = _size(tcfg, 2)
        det = [
            _loader(policy),
            ToChannelsd("image", 1 if in_channels == 1 else chans),
            Windowd("image", window, pct),
            FitResized("image", size, mode=interp),
            SpatialPadd("image", spatial_size=size, mode="constant"),
            ToChannelsd("image", chans, getattr(preprocess, "channel_order", "RGB")),
        ]
        rand = _augment_2d(tcfg.augment)
    elif preset == "ct_2p5d":
        size = _size(tcfg, 2)
        if in_channels != tcfg.slices:
            raise ConfigError(
                f"preset ct_2p5d with transforms.slices={tcfg.slices} gives {tcfg.slices}-channel "
                f"inputs but model.in_channels={in_channels}; set model.in_channels={tcfg.slices}"
            )
        det = [
            _loader(policy, reorient=tcfg.orientation),
            Windowd("image", window, pct),
            SelectSlicesd("image", tcfg.slices),
            FitResized("image", size, mode=interp),
            SpatialPadd("image", spatial_size=size, mode="constant"),
            ToChannelsd("image", chans),
        ]
        rand = _augment_2d(tcfg.augment)
    else:  # ct_3d
        size = _size(tcfg, 3)
        det = [_loader(policy)]
        if tcfg.orientation:
            det.append(Orientationd("image", axcodes=tcfg.orientation, labels=_RAS_LABELS))
        if tcfg.pixdim:
            if len(tcfg.pixdim) != 3:
                raise ConfigError(f"transforms.pixdim needs 3 values (mm), got {tcfg.pixdim}")
            det.append(Spacingd("image", pixdim=tuple(tcfg.pixdim), mode="bilinear"))
        det += [
            Windowd("image", window, pct),
            ResizeWithPadOrCropd("image", spatial_size=size, mode="constant"),
            ToChannelsd("image", chans),
        ]
        rand = _augment_3d(tcfg.augment)

    det += _normalise(preprocess, chans)
    det.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    random_ops = (
        rand + [EnsureTyped(keys="image", dtype=torch.float32, track_meta=False)]
        if train and rand
        else []
    )
    return TransformPair(
        deterministic=Compose(det),
        random=Compose(random_ops),
        cache_key=transform_cache_key(tcfg, preprocess, in_channels, channel_adapt, policy),
        out_channels=chans,
    )


def transform_cache_key(
    tcfg: TransformConfig,
    preprocess: Any,
    in_channels: int = 1,
    channel_adapt: str = "fold_sum",
    policy: ReadPolicy | None = None,
) -> str:
    """sha256 of everything that shapes the deterministic output (augmentation excluded),
    plus ``TRANSFORMS_VERSION``: the on-disk cache folder name. The burned-in policy is part
    of it: a cache filled while such images were allowed must not let them in once refused."""
    t = tcfg.model_dump(mode="json")
    t.pop("augment", None)
    pre: dict[str, Any] | str
    if dataclasses.is_dataclass(preprocess) and not isinstance(preprocess, type):
        pre = dataclasses.asdict(preprocess)
    elif hasattr(preprocess, "model_dump"):
        pre = preprocess.model_dump(mode="json")
    else:
        pre = repr(preprocess)
    blob = {
        "version": TRANSFORMS_VERSION,
        "transforms": t,
        "preprocess": pre,
        "in_channels": int(in_channels),
        "channel_adapt": channel_adapt,
    }
    if policy is not None and policy.burned_in_annotation != "quarantine":
        blob["burned_in_annotation"] = policy.burned_in_annotation
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
