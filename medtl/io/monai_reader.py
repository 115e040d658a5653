"""``MedtlReader``: medtl's readers behind MONAI's ``ImageReader`` interface.

``LoadImaged(keys="image", reader=MedtlReader(), image_only=False)`` gives the same array
as ``load_image``, already channel-first (``original_channel_dim`` is 0, so
``EnsureChannelFirst`` leaves it alone). Unlike MONAI's own readers, 2D arrays are
``(C, rows, cols)`` (no transpose). Meta keys: MONAI's ``affine``, ``original_affine``,
``spatial_shape``, ``original_channel_dim``, ``space`` plus every ``ImageMeta`` field;
missing numbers are NaN and missing strings "" so batches collate.
Kept apart from ``medtl.io`` so importing the readers does not import MONAI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader
from monai.utils import ensure_tuple

from medtl.errors import MedtlError, UnreadableImageError
from medtl.io.base import DEFAULT_POLICY, ImageMeta, LoadedImage, ReadPolicy
from medtl.io.registry import detect_format, load_image
from medtl.io.series import load_dicom_series


class MedtlReader(ImageReader):
    """MONAI ImageReader over ``medtl.io.load_image`` (DICOM, series, NIfTI, PNG/JPEG)."""

    def __init__(self, reorient: str | None = None, policy: ReadPolicy = DEFAULT_POLICY):
        super().__init__()
        self.reorient = reorient
        self.policy = policy

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True when medtl recognises every path (folder, suffix or file content)."""
        try:
            for f in ensure_tuple(filename):
                detect_format(f)
        except MedtlError:
            return False
        return True

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> LoadedImage:
        """Load one path; several DICOM files are one series, other lists stack channels."""
        paths = [Path(p) for p in ensure_tuple(data)]
        if len(paths) == 1:
            return load_image(paths[0], reorient=self.reorient, policy=self.policy)
        if all(detect_format(p) == "dicom" for p in paths):
            return load_image_series(paths, self.reorient, self.policy)
        return _stack_channels(
            [load_image(p, reorient=self.reorient, policy=self.policy) for p in paths]
        )

    def get_data(self, img: LoadedImage) -> tuple[np.ndarray, dict]:
        """The channel-first array and a MONAI meta dict (see the module docstring)."""
        return img.array, monai_meta(img)


def load_image_series(
    paths: Sequence[Path], reorient: str | None, policy: ReadPolicy = DEFAULT_POLICY
) -> LoadedImage:
    """A list of DICOM files as one series volume (optionally reoriented)."""
    from medtl.io.base import reorient as reorient_image

    image = load_dicom_series(paths, policy=policy)
    return reorient_image(image, reorient) if reorient else image


def monai_meta(img: LoadedImage) -> dict:
    """MONAI-style meta dict for ``img``: affine always 4x4 (spacing-diagonal if none)."""
    meta = img.meta
    affine = meta.affine_array
    if affine is None:
        diag = list(meta.spacing[:3]) + [1.0] * (3 - len(meta.spacing[:3]))
        affine = np.diag([*diag, 1.0])
    out: dict = {}
    for field in dataclasses.fields(ImageMeta):
        if field.name == "affine":
            continue
        value = getattr(meta, field.name)
        if value is None:
            value = "" if "str" in str(field.type) and "float" not in str(field.type) else np.nan
        elif isinstance(value, tuple):
            value = np.asarray(value, dtype=float)
        out[field.name] = value
    out.update(
        affine=affine,
        original_affine=affine.copy(),
        spatial_shape=np.asarray(img.array.shape[1:]),
        original_channel_dim=0,
        space="RAS",
    )
    return out


def _stack_channels(images: list[LoadedImage]) -> LoadedImage:
    shapes = {im.array.shape[1:] for im in images}
    if len(shapes) != 1:
        raise UnreadableImageError(
            images[0].meta.source, f"cannot stack images of different sizes {sorted(shapes)}"
        )
    array = np.concatenate([im.array for im in images], axis=0)
    meta = dataclasses.replace(images[0].meta, shape=tuple(array.shape))
    return LoadedImage(array, meta)
