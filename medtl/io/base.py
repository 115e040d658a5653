"""The reader contract: every reader returns a ``LoadedImage(array, meta)``.

Axes (stated once, relied on by transforms):

- 2D images: ``(C, rows, cols)``; C is 1 (grey) or 3 (RGB). ``affine`` is None.
- DICOM volumes (series folders, multi-frame files): ``(C, slices, rows, cols)``, so
  ``array[:, k]`` is slice/frame ``k`` in the same layout as a 2D image. Slices are sorted
  along the slice normal when the file gives positions; ``affine`` maps ``(k, row, col)``
  to RAS mm. Multi-frame files without per-frame positions (cine, ultrasound) keep file
  order and have ``affine`` None.
- NIfTI/Analyze/MGH: ``(C, I, J, K)`` in file voxel order with nibabel's affine; a 4th
  dimension (time, components) becomes channels.

``spacing`` is in array-axis order (channels excluded), 1.0 along an axis the file does
not describe, as in MONAI/ITK. Values are float32, higher is brighter, after the modality
LUT (CT in HU). ``window_center``/``window_width`` are the file's first VOI window,
expressed in the loaded array's values (so inverted along with MONOCHROME1 data).

``ImageMeta`` is a whitelist: it has no field that could carry a name, ID, date,
accession number, institution or UID, so nothing identifying can leave through it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np

from medtl.errors import ConfigError


@dataclass(frozen=True)
class ImageMeta:
    """Non-identifying facts about a loaded image (see the module docstring for axes)."""

    source: str
    format: str  # "DICOM", "DICOM series", "NIfTI-1", "NIfTI-2", "Analyze", "MGH", "PNG", "JPEG"
    spatial_dims: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: tuple[tuple[float, ...], ...] | None = None  # 4x4, RAS, mm
    modality: str | None = None
    photometric_interpretation: str | None = None  # as stored in the file
    n_frames: int = 1
    window_center: float | None = None
    window_width: float | None = None
    bits_stored: int | None = None
    rescale_applied: bool = False
    transfer_syntax: str | None = None  # the transfer syntax's name, never its UID
    stored_dtype: str | None = None  # dtype of the decoded values before float32

    @property
    def affine_array(self) -> np.ndarray | None:
        """The affine as a 4x4 float64 array (None when the image has no geometry)."""
        return None if self.affine is None else np.asarray(self.affine, dtype=np.float64)

    def to_dict(self) -> dict:
        """A JSON-safe dict of the fields (lists instead of tuples)."""
        out = asdict(self)
        for key in ("shape", "spacing"):
            out[key] = list(out[key])
        if self.affine is not None:
            out["affine"] = [list(row) for row in self.affine]
        return out


@dataclass(frozen=True)
class LoadedImage:
    """A channel-first float32 array and its non-identifying metadata."""

    array: np.ndarray
    meta: ImageMeta


#: The largest decoded image (float32 bytes) a header may ask for: 2 GiB holds a 2,000-slice
#: 512x512 CT series; a header asking for more is corrupt far more often than it is real.
DEFAULT_MAX_IMAGE_BYTES = 2 * 2**30
BurnedIn = Literal["quarantine", "allow"]


@dataclass(frozen=True)
class ReadPolicy:
    """What a reader refuses before decoding (``data.max_image_bytes``,
    ``data.burned_in_annotation``); picklable, so it travels to the decoding processes."""

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # DICOM BurnedInAnnotation (0028,0301) = YES: pixels may show names the header
    # whitelist cannot remove. quarantine = leave the file out; allow = use it.
    burned_in_annotation: BurnedIn = "quarantine"


DEFAULT_POLICY = ReadPolicy()


# The record key of an image's ``pixel_sha256`` (``medtl.data`` records, leakage checks).
PIXEL_HASH_KEY = "image_sha256"


def pixel_sha256(image: LoadedImage | np.ndarray) -> str:
    """sha256 of decoded pixels (dtype, shape, then the array bytes), before any transform.

    The same pixels give the same digest whatever the file's format or transfer syntax, so
    a re-encoded copy of an image is recognised (leakage and duplicate checks).
    """
    arr = image.array if isinstance(image, LoadedImage) else np.asarray(image)
    # Little-endian C order: the digest must not depend on the machine or the array's strides.
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    digest = hashlib.sha256(f"{arr.dtype.str}{tuple(arr.shape)}".encode())
    digest.update(arr.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def affine_tuple(affine: np.ndarray | None) -> tuple[tuple[float, ...], ...] | None:
    """Freeze a 4x4 array as nested tuples of Python floats (hashable, JSON-safe)."""
    if affine is None:
        return None
    return tuple(tuple(float(v) for v in row) for row in np.asarray(affine, dtype=float))


def reorient(image: LoadedImage, axcodes: str = "RAS") -> LoadedImage:
    """Permute/flip a 3D image so its axes point along ``axcodes`` (nibabel orientations).

    Images without an affine (2D images, frame stacks) are returned unchanged: they have
    no patient axes to reorder. For NIfTI this gives the same array and affine as
    ``nibabel.as_closest_canonical`` when ``axcodes == "RAS"``.
    """
    import nibabel.orientations as nio

    codes = tuple(str(axcodes).upper())
    pairs = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    if len(codes) != 3 or sorted(pairs.get(c, -1) for c in codes) != [0, 1, 2]:
        raise ConfigError(
            f"invalid orientation '{axcodes}': give three letters, one from each pair "
            "R/L, A/P, S/I, e.g. 'RAS' or 'LPS'"
        )
    affine = image.meta.affine_array
    if affine is None or image.meta.spatial_dims != 3:
        return image
    target = nio.axcodes2ornt(codes)
    current = nio.io_orientation(affine)
    transform = nio.ornt_transform(current, target)
    spatial_shape = image.array.shape[1:]
    # apply_orientation works on the leading (spatial) axes, so move channels last.
    arr = nio.apply_orientation(np.moveaxis(image.array, 0, -1), transform)
    arr = np.ascontiguousarray(np.moveaxis(arr, -1, 0))
    new_affine = affine @ nio.inv_ornt_aff(transform, spatial_shape)
    perm = [int(a) for a in transform[:, 0]]
    spacing = [0.0] * 3
    for src, dst in enumerate(perm):
        spacing[dst] = image.meta.spacing[src]
    meta = replace(
        image.meta,
        affine=affine_tuple(new_affine),
        shape=tuple(arr.shape),
        spacing=tuple(spacing),
    )
    return LoadedImage(arr, meta)
