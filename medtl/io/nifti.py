"""NIfTI-1/2, Analyze (.hdr/.img) and MGH volumes through nibabel -> ``(C, I, J, K)``.

The array keeps the file's voxel order and nibabel's affine (RAS mm); scaling
(scl_slope/scl_inter) is applied by nibabel. A 4th and later dimensions (time,
components) become channels. Reorientation is ``medtl.io.base.reorient``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from medtl.errors import UnreadableImageError
from medtl.io.base import DEFAULT_POLICY, ImageMeta, LoadedImage, ReadPolicy, affine_tuple
from medtl.io.contract import check_pixel_budget, reader

#: File name endings nibabel reads for us, and the format name reported for each class.
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz", ".mgz", ".mgh")
_FORMAT_NAMES = {
    "Nifti1Image": "NIfTI-1",
    "Nifti1Pair": "NIfTI-1",
    "Nifti2Image": "NIfTI-2",
    "Nifti2Pair": "NIfTI-2",
    "AnalyzeImage": "Analyze",
    "Spm99AnalyzeImage": "Analyze",
    "Spm2AnalyzeImage": "Analyze",
    "MGHImage": "MGH",
}


@reader
def load_nifti(path: str | Path, policy: ReadPolicy = DEFAULT_POLICY) -> LoadedImage:
    """Load a NIfTI/Analyze/MGH file as float32 ``(C, I, J, K)`` with its affine.

    Raises:
        UnreadableImageError: not a volume nibabel can read (CIFTI, truncated, the .img of
            an Analyze pair missing).
    """
    p = Path(path)
    if not p.is_file():
        raise UnreadableImageError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(p)
    except Exception as err:  # nibabel raises ImageFileError, ValueError, EOFError, ...
        raise UnreadableImageError(
            path, f"not a readable NIfTI/Analyze file: {_short(err)}"
        ) from err
    kind = type(img).__name__
    fmt = _FORMAT_NAMES.get(kind)
    # Every class in _FORMAT_NAMES is a SpatialImage; the isinstance check narrows the type.
    if fmt is None or not isinstance(img, SpatialImage) or img.affine is None:
        raise UnreadableImageError(
            path,
            f"{kind} is not an image volume medtl reads; supported: NIfTI-1/2, Analyze, MGH",
        )
    check_pixel_budget(path, tuple(img.shape) or (1,), policy, f"{fmt} header")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = img.get_fdata(dtype=np.float32)
    except FileNotFoundError as err:
        raise UnreadableImageError(
            path, "image data file missing (an Analyze/NIfTI pair needs both .hdr and .img)"
        ) from err
    except Exception as err:
        raise UnreadableImageError(path, f"cannot read voxel data: {_short(err)}") from err
    while data.ndim < 3:
        data = data[..., np.newaxis]
    spatial = data.shape[:3]
    array = np.ascontiguousarray(np.moveaxis(data.reshape(*spatial, -1), -1, 0))
    # Spacing from the affine, not header zooms: the two disagree in some files (test.mgz)
    # and the affine is what places voxels in the world.
    spacing = tuple(float(z) for z in nib.affines.voxel_sizes(img.affine))
    meta = ImageMeta(
        source=str(path),
        format=fmt,
        spatial_dims=3,
        shape=tuple(int(s) for s in array.shape),
        spacing=spacing,
        affine=affine_tuple(img.affine),
        n_frames=int(array.shape[0]),
        stored_dtype=str(np.dtype(img.get_data_dtype()).newbyteorder("=")),
        rescale_applied=_has_scaling(img),
    )
    return LoadedImage(array, meta)


def _has_scaling(img) -> bool:
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    return bool(np.isfinite(slope) and (slope != 1.0 or (np.isfinite(inter) and inter != 0.0)))


def _short(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
