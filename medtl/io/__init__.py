"""Image readers: DICOM files and series, NIfTI/Analyze, PNG/JPEG -> ``LoadedImage``.

See ``medtl.io.base`` for the array/metadata contract. ``MedtlReader`` (MONAI) is
imported lazily so that ``import medtl.io`` does not import MONAI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medtl.io.base import (
    DEFAULT_POLICY,
    PIXEL_HASH_KEY,
    ImageMeta,
    LoadedImage,
    ReadPolicy,
    pixel_sha256,
    reorient,
)
from medtl.io.dicom import DECODER_PREFERENCE, is_dicom, load_dicom, read_dicom_header
from medtl.io.image import load_png_jpeg
from medtl.io.nifti import load_nifti
from medtl.io.registry import READERS, detect_format, load_image, supported_suffixes
from medtl.io.series import load_dicom_series

if TYPE_CHECKING:
    from medtl.io.monai_reader import MedtlReader

__all__ = [
    "DECODER_PREFERENCE",
    "DEFAULT_POLICY",
    "PIXEL_HASH_KEY",
    "READERS",
    "ReadPolicy",
    "ImageMeta",
    "LoadedImage",
    "MedtlReader",
    "detect_format",
    "is_dicom",
    "load_dicom",
    "load_dicom_series",
    "load_image",
    "load_nifti",
    "load_png_jpeg",
    "pixel_sha256",
    "read_dicom_header",
    "reorient",
    "supported_suffixes",
]


def __getattr__(name: str):
    if name == "MedtlReader":
        from medtl.io.monai_reader import MedtlReader

        return MedtlReader
    raise AttributeError(f"module 'medtl.io' has no attribute '{name}'")
