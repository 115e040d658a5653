"""Random augmentation as tensor ops on a whole batch: the GPU path of the MONAI presets.

``medtl.transforms`` builds each preset's augmentation as MONAI dictionary transforms that run
per image in the loader workers (the CPU path). ``BatchAugment.from_monai(compose)`` reads those
very transforms (probabilities, parameter ranges, interpolation) and applies them to a batch on
the training device after the host->device copy (``data.augment_device``), so the CPU only
loads and the GPU does not wait for per-image augmentation.

Randomness, written by hand instead of ``torch.Generator``: every draw is a counter-based hash
of (epoch key, dataset index, stream, element). The numbers are the same on CPU and CUDA, for a
sample whichever worker or batch it lands in, with no generator state to checkpoint and no
per-sample kernel launch. ``item_seed`` keys the CPU path's MONAI random state the same way.

Given the same sampled parameters (``monai_sampled_params`` reads the ones MONAI drew), the batch
ops reproduce the MONAI transforms to float32 rounding (tests/test_input_pipeline.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    EnsureTyped,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from medtl.errors import ConfigError, MedtlError, look_up_option

AUGMENT_DEVICES = ("auto", "cpu", "cuda")
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: the usual odd increment between counters
_INV_2_24 = 2.0**-24


# --------------------------------------------------------------------------- where it runs
def resolve_augment_device(setting: str, device: torch.device) -> Literal["cpu", "cuda"]:
    """``data.augment_device`` for a run on ``device``: auto = cuda when training on CUDA.

    Raises:
        ConfigError: ``cuda`` asked for while training elsewhere, or an unknown value.
    """
    look_up_option(setting, AUGMENT_DEVICES, "data.augment_device")
    if setting == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if setting == "cuda" and device.type != "cuda":
        raise ConfigError(
            f"data.augment_device=cuda but training runs on {device.type}; "
            "use data.augment_device=auto or cpu (augmentation then runs in the loader)"
        )
    return "cuda" if setting == "cuda" else "cpu"


# --------------------------------------------------------------------------- keyed randomness
def _mix32_int(x: int) -> int:
    """A 32-bit integer finaliser (lowbias32 shape; multipliers < 2^31 so the tensor version
    never overflows int64)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """``_mix32_int`` on an int64 tensor of values in [0, 2^32), elementwise, on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def _hash_ints(*values: int) -> int:
    h = 0x811C9DC5
    for v in values:
        h = _mix32_int(h ^ _mix32_int(int(v) & _M32))
    return h


def epoch_augment_seed(seed: int, epoch: int) -> int:
    """The augmentation key of one epoch: a 32-bit hash of (``seed``, ``epoch``)."""
    return _hash_ints(seed, epoch, 0xA06)


def item_seed(aug_seed: int, index: int) -> int:
    """The MONAI random state of dataset item ``index`` in the epoch keyed ``aug_seed`` (CPU
    path): the same whichever worker loads it and however many workers there are."""
    return _hash_ints(aug_seed, index, 0x5EED)


def seed_monai_item(compose: Any, rng: np.random.RandomState, aug_seed: int, index: int) -> None:
    """Key the CPU path for one item: every random transform of ``compose`` draws from ``rng``
    reseeded with ``item_seed(aug_seed, index)``. One shared generator reseeded in place, not
    ``Compose.set_random_state``, which builds a RandomState per transform (0.2 ms against
    9 ms per image for the standard preset, measured on this 2-core machine)."""
    rng.seed(item_seed(aug_seed, index))
    for t in compose.transforms:
        if isinstance(t, Randomizable):
            t.set_random_state(state=rng)


class CounterRNG:
    """Uniform and normal draws for a batch, each a pure function of (epoch key, sample index,
    stream, element): no state, the same numbers on every device."""

    def __init__(self, aug_seed: int, index: torch.Tensor):
        self.aug_seed = int(aug_seed) & _M32
        self.index = index.to(torch.int64).reshape(-1, 1)  # (B, 1), on the batch's device

    def bits(self, stream: int, n: int) -> torch.Tensor:
        """(B, n) int64 hashes in [0, 2^32)."""
        base = _mix32((self.index & _M32) ^ _hash_ints(self.aug_seed, stream))
        counter = torch.arange(n, device=self.index.device, dtype=torch.int64)
        return _mix32(_mix32((base + counter * _GOLDEN) & _M32) ^ base)

    def uniform(self, stream: int, n: int) -> torch.Tensor:
        """(B, n) float32 in [0, 1): the top 24 bits, exact in float32 on every device."""
        return (self.bits(stream, n) >> 8).to(torch.float32) * _INV_2_24

    def normal(self, stream: int, n: int) -> torch.Tensor:
        """(B, n) standard normal float32 (Box-Muller on two 24-bit uniforms)."""
        b = self.bits(stream, 2 * n)
        u1 = ((b[:, :n] >> 8) + 1).to(torch.float32) * _INV_2_24  # (0, 1]: log is finite
        u2 = (b[:, n:] >> 8).to(torch.float32) * _INV_2_24
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def _between(u: torch.Tensor, lo_hi: tuple[float, float]) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * u  # numpy's RandomState.uniform(lo, hi), as MONAI draws it


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(-1, *([1] * (ndim - 1)))


# --------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class AffineParams:
    """Per sample: whether the affine applies, and its (nd+1)^2 matrix in pixel units about the
    image centre, mapping output to input coordinates (MONAI's convention, array axis order)."""

    on: torch.Tensor  # (B,) bool
    matrix: torch.Tensor  # (B, nd+1, nd+1) float32


@dataclass(frozen=True)
class ValueParams:
    """Per sample: whether the op applies, and its one value (factor, offset or gamma)."""

    on: torch.Tensor  # (B,) bool
    value: torch.Tensor  # (B,) float32


@dataclass(frozen=True)
class NoiseParams:
    """Per sample: the additive noise field (zero where the op does not apply)."""

    on: torch.Tensor  # (B,) bool
    noise: torch.Tensor  # like the batch


OpParams = AffineParams | ValueParams | NoiseParams


def cat_params(items: Sequence[Sequence[OpParams]]) -> list[OpParams]:
    """Join per-sample (or per-batch) parameter lists of one chain into one batch's list."""
    out: list[OpParams] = []
    for parts in zip(*items, strict=True):
        kind = type(parts[0])
        fields = {
            f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(kind)
        }
        out.append(kind(**fields))
    return out


def affine_matrix(
    nd: int,
    angles: Sequence[torch.Tensor],
    shifts: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
) -> torch.Tensor:
    """(B, nd+1, nd+1) rotate @ translate @ scale, composed as MONAI's ``AffineGrid`` does
    (3D rotations intrinsic X, then Y, then Z; missing shifts 0, missing scales 1)."""
    ref = next(iter([*angles, *shifts, *scales]), None)
    if ref is None:
        raise ValueError("affine_matrix needs at least one per-sample parameter")
    b = ref.shape[0]
    eye = torch.eye(nd + 1, dtype=torch.float32, device=ref.device).expand(b, -1, -1)
    out = eye.clone()
    planes = {2: [(0, 1)], 3: [(1, 2), (2, 0), (0, 1)]}[nd]  # about x, y, z
    for (i, j), a in zip(planes, angles, strict=False):  # extra angles unused, as in MONAI
        r = eye.clone()
        c, s = torch.cos(a.float()), torch.sin(a.float())
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        out = out @ r
    if shifts:
        t = eye.clone()
        for axis, v in enumerate(shifts):
            t[:, axis, nd] = v.float()
        out = out @ t
    if scales:
        sc = eye.clone()
        for axis, v in enumerate(scales):
            sc[:, axis, axis] = v.float()
        out = out @ sc
    return out


def warp(x: torch.Tensor, matrix: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """Resample ``x`` (B, C, *spatial) at ``matrix`` @ output pixel, as MONAI's ``Resample``:
    offsets from the centre scaled by 2/size into ``grid_sample`` (align_corners=False), whose
    grid lists the last array axis first."""
    nd = x.ndim - 2
    rev = [*range(nd - 1, -1, -1), nd]
    m = matrix[:, rev][:, :, rev].to(x.dtype)
    s = torch.tensor(
        [2.0 / max(int(d), 2) for d in reversed(x.shape[2:])] + [1.0],
        dtype=x.dtype,
        device=x.device,
    )
    theta = m * s[None, :, None] / s[None, None, :]  # diag(s) @ m @ diag(1/s)
    grid = F.affine_grid(theta[:, :nd], list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


# --------------------------------------------------------------------------- the ops
Range = tuple[float, float]


@dataclass(frozen=True)
class AffineOp:
    """``RandAffined``: rotation (radians), translation (pixels) and scale (1 + u) per axis."""

    prob: float
    rotate: tuple[Range, ...]
    translate: tuple[Range, ...]
    scale: tuple[Range, ...]
    mode: str
    padding_mode: str

    def sample(self, rng: CounterRNG, stream: int, shape: Sequence[int]) -> AffineParams:
        nd = len(shape) - 2
        n_r, n_t = len(self.rotate), len(self.translate)
        u = rng.uniform(stream, 1 + n_r + n_t + len(self.scale))
        angles = [_between(u[:, 1 + k], r) for k, r in enumerate(self.rotate)]
        shifts = [_between(u[:, 1 + n_r + k], r) for k, r in enumerate(self.translate)]
        scales = [1.0 + _between(u[:, 1 + n_r + n_t + k], r) for k, r in enumerate(self.scale)]
        if angles or shifts or scales:
            matrix = affine_matrix(nd, angles, shifts, scales)
        else:
            matrix = torch.eye(nd + 1, device=u.device).expand(u.shape[0], -1, -1)
        return AffineParams(on=u[:, 0] < self.prob, matrix=matrix)

    def apply(self, x: torch.Tensor, p: OpParams) -> torch.Tensor:
        assert isinstance(p, AffineParams)
        moved = warp(x, p.matrix, self.mode, self.padding_mode)
        return torch.where(_per_sample(p.on, x.ndim), moved, x)


@dataclass(frozen=True)
class ScaleIntensityOp:
    """``RandScaleIntensityd``: ``x * (1 + factor)``."""

    prob: float
    factors: Range

    def sample(self, rng: CounterRNG, stream: int, shape: Sequence[int]) -> ValueParams:
        u = rng.uniform(stream, 2)
        return ValueParams(on=u[:, 0] < self.prob, value=_between(u[:, 1], self.factors))

    def apply(self, x: torch.Tensor, p: OpParams) -> torch.Tensor:
        assert isinstance(p, ValueParams)
        f = torch.where(p.on, 1.0 + p.value, torch.ones_like(p.value))
        return x * _per_sample(f, x.ndim).to(x.dtype)


@dataclass(frozen=True)
class ShiftIntensityOp:
    """``RandShiftIntensityd``: ``x + offset``."""

    prob: float
    offsets: Range

    def sample(self, rng: CounterRNG, stream: int, shape: Sequence[int]) -> ValueParams:
        u = rng.uniform(stream, 2)
        return ValueParams(on=u[:, 0] < self.prob, value=_between(u[:, 1], self.offsets))

    def apply(self, x: torch.Tensor, p: OpParams) -> torch.Tensor:
        assert isinstance(p, ValueParams)
        off = torch.where(p.on, p.value, torch.zeros_like(p.value))
        return x + _per_sample(off, x.ndim).to(x.dtype)


@dataclass(frozen=True)
class ContrastOp:
    """``RandAdjustContrastd``: gamma on each image's own [min, max] (MONAI's ``AdjustContrast``)."""

    prob: float
    gamma: Range

    def sample(self, rng: CounterRNG, stream: int, shape: Sequence[int]) -> ValueParams:
        u = rng.uniform(stream, 2)
        return ValueParams(on=u[:, 0] < self.prob, value=_between(u[:, 1], self.gamma))

    def apply(self, x: torch.Tensor, p: OpParams) -> torch.Tensor:
        assert isinstance(p, ValueParams)
        flat = x.flatten(1)
        lo = _per_sample(flat.amin(1), x.ndim)
        span = _per_sample(flat.amax(1), x.ndim) - lo
        g = _per_sample(p.value.to(x.dtype), x.ndim)
        adjusted = ((x - lo) / (span + 1e-7)) ** g * span + lo  # MONAI's epsilon
        return torch.where(_per_sample(p.on, x.ndim), adjusted, x)


@dataclass(frozen=True)
class NoiseOp:
    """``RandGaussianNoised``: additive N(mean, std), std drawn from [0, std) when sampled."""

    prob: float
    mean: float
    std: float
    sample_std: bool

    def sample(self, rng: CounterRNG, stream: int, shape: Sequence[int]) -> NoiseParams:
        u = rng.uniform(stream, 2)
        on = u[:, 0] < self.prob
        std = u[:, 1] * self.std if self.sample_std else torch.full_like(u[:, 1], self.std)
        z = rng.normal(stream + 1, math.prod(shape[1:])).reshape(tuple(shape))
        noise = (self.mean + _per_sample(std, len(shape)) * z) * _per_sample(on, len(shape))
        return NoiseParams(on=on, noise=noise)

    def apply(self, x: torch.Tensor, p: OpParams) -> torch.Tensor:
        assert isinstance(p, NoiseParams)
        return x + p.noise.to(x.dtype)


AugmentOp = AffineOp | ScaleIntensityOp | ShiftIntensityOp | ContrastOp | NoiseOp
_STREAMS_PER_OP = 16  # op k draws from streams 16k .. 16k+15


@dataclass(frozen=True)
class BatchAugment:
    """A preset's random transforms as batch tensor ops, in the preset's order."""

    ops: tuple[AugmentOp, ...]

    @classmethod
    def from_monai(cls, compose: Any) -> BatchAugment:
        """The batch version of a MONAI ``Compose`` of the presets' random transforms.

        Raises:
            MedtlError: a transform (or an option of one) with no batch version.
        """
        ops = []
        for t in getattr(compose, "transforms", ()):
            convert = _CONVERTERS.get(type(t))
            if convert is None:
                raise MedtlError(
                    f"{type(t).__name__} has no batch (GPU) version; the batch path covers "
                    f"{', '.join(c.__name__ for c in _CONVERTERS)}. Set "
                    "data.augment_device=cpu to run it per image in the loader"
                )
            op = convert(t)
            if op is not None:
                ops.append(op)
        return cls(tuple(ops))

    def sample(self, aug_seed: int, index: torch.Tensor, shape: Sequence[int]) -> list[OpParams]:
        """Every op's parameters for a batch of ``shape`` whose dataset indices are ``index``."""
        rng = CounterRNG(aug_seed, index)
        return [op.sample(rng, k * _STREAMS_PER_OP, shape) for k, op in enumerate(self.ops)]

    def apply(self, x: torch.Tensor, params: Sequence[OpParams]) -> torch.Tensor:
        """The ops on ``x`` (B, C, *spatial) with the given parameters, in order."""
        for op, p in zip(self.ops, params, strict=True):
            x = op.apply(x, p)
        return x

    def __call__(self, x: torch.Tensor, aug_seed: int, index: torch.Tensor) -> torch.Tensor:
        """Augment a batch: parameters keyed by (``aug_seed``, each sample's dataset index)."""
        if not self.ops:
            return x
        return self.apply(x, self.sample(aug_seed, index.to(x.device), x.shape))


# --------------------------------------------------------------------------- MONAI -> ops
def _ranges(param_range: Sequence[Any] | None) -> tuple[Range, ...]:
    """MONAI's ``RandAffineGrid._get_rand_param`` rule: a pair is (low, high), a number f is
    (-f, f), ``None`` entries are skipped (so later entries move up, as in MONAI)."""
    out = []
    for f in param_range or ():
        if isinstance(f, Sequence):
            out.append((float(f[0]), float(f[1])))
        elif f is not None:
            out.append((-float(f), float(f)))
    return tuple(out)


def _only_image(t: Any) -> None:
    if tuple(t.keys) != ("image",):
        raise MedtlError(
            f"{type(t).__name__} on keys {tuple(t.keys)}: the batch path augments 'image' only"
        )


def _refuse(t: Any, option: str) -> None:
    raise MedtlError(
        f"{type(t).__name__} with {option} has no batch (GPU) version; set data.augment_device=cpu"
    )


def _affine(t: RandAffined) -> AffineOp:
    _only_image(t)
    grid = t.rand_affine.rand_affine_grid
    if _ranges(grid.shear_range):
        _refuse(t, "shear_range")
    if t.rand_affine.spatial_size is not None:
        _refuse(t, f"spatial_size={t.rand_affine.spatial_size}")
    mode, padding = t.mode[0], t.padding_mode[0]
    if mode not in ("bilinear", "nearest") or padding not in ("zeros", "border", "reflection"):
        _refuse(t, f"mode={mode}, padding_mode={padding}")
    return AffineOp(
        prob=float(t.prob),
        rotate=_ranges(grid.rotate_range),
        translate=_ranges(grid.translate_range),
        scale=_ranges(grid.scale_range),
        mode=str(mode),
        padding_mode=str(padding),
    )


def _scale(t: RandScaleIntensityd) -> ScaleIntensityOp:
    _only_image(t)
    if t.scaler.channel_wise:
        _refuse(t, "channel_wise=True")
    lo, hi = t.scaler.factors
    return ScaleIntensityOp(prob=float(t.prob), factors=(float(lo), float(hi)))


def _shift(t: RandShiftIntensityd) -> ShiftIntensityOp:
    _only_image(t)
    if t.shifter.channel_wise or any(k is not None for k in t.factor_key):
        _refuse(t, "channel_wise or factor_key")
    lo, hi = t.shifter.offsets
    return ShiftIntensityOp(prob=float(t.prob), offsets=(float(lo), float(hi)))


def _contrast(t: RandAdjustContrastd) -> ContrastOp:
    _only_image(t)
    if t.adjuster.invert_image or t.adjuster.retain_stats:
        _refuse(t, "invert_image or retain_stats")
    lo, hi = t.adjuster.gamma
    return ContrastOp(prob=float(t.prob), gamma=(float(lo), float(hi)))


def _noise(t: RandGaussianNoised) -> NoiseOp:
    _only_image(t)
    n = t.rand_gaussian_noise
    return NoiseOp(
        prob=float(t.prob), mean=float(n.mean), std=float(n.std), sample_std=bool(n.sample_std)
    )


_CONVERTERS: dict[type, Callable[[Any], AugmentOp | None]] = {
    RandAffined: _affine,
    RandScaleIntensityd: _scale,
    RandShiftIntensityd: _shift,
    RandAdjustContrastd: _contrast,
    RandGaussianNoised: _noise,
    EnsureTyped: lambda t: None,  # the presets' closing dtype step: batches are float32 already
}


def monai_sampled_params(compose: Any, shape: Sequence[int]) -> list[OpParams]:
    """The parameters MONAI drew in its last call of ``compose`` on one image of ``shape``
    (C, *spatial), as a batch of one for ``BatchAugment.apply``: the CPU path's draws in the
    GPU path's form (how the tests hold the two paths to the same numbers)."""
    nd = len(shape) - 1
    out: list[OpParams] = []
    for t in compose.transforms:
        if isinstance(t, EnsureTyped):
            continue
        fired = bool(t._do_transform)
        on = torch.tensor([fired])
        if isinstance(t, RandAffined):
            # The matrix MONAI applied: RandAffined draws its parameters again after building
            # the grid, so rotate_params & co. no longer describe it; the matrix does.
            applied = t.rand_affine.rand_affine_grid.get_transformation_matrix()
            matrix = torch.eye(nd + 1)[None]
            if fired and applied is not None:
                matrix = torch.as_tensor(applied, dtype=torch.float32)[None]
            out.append(AffineParams(on=on, matrix=matrix))
        elif isinstance(t, RandGaussianNoised):
            noise = torch.zeros(tuple(shape))
            if fired:
                noise = torch.as_tensor(t.rand_gaussian_noise.noise, dtype=torch.float32)
            out.append(NoiseParams(on=on, noise=noise[None]))
        else:
            value = _DRAWN_VALUE[type(t)](t) if fired else 0.0
            out.append(ValueParams(on=on, value=torch.tensor([float(value)])))
    return out


# Where each one-value transform keeps its last draw (MONAI attribute names).
_DRAWN_VALUE: dict[type, Callable[[Any], float]] = {
    RandScaleIntensityd: lambda t: t.scaler.factor,
    RandShiftIntensityd: lambda t: t.shifter._offset,
    RandAdjustContrastd: lambda t: t.adjuster.gamma_value,
}
