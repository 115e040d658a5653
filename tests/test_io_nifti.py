"""NIfTI-1/2, Analyze and MGH through nibabel: every shipped test volume, affines, RAS."""

from __future__ import annotations

import pathlib
import shutil

import nibabel as nib
import numpy as np
import pytest

from medtl.errors import UnreadableImageError
from medtl.io import load_image

NIB_DATA = pathlib.Path(nib.__file__).parent / "tests" / "data"
VOLUMES = sorted(
    p
    for p in NIB_DATA.iterdir()
    if p.name.endswith((".nii", ".nii.gz", ".mgz")) and "dconn" not in p.name
)
HEADERS_ONLY = sorted(NIB_DATA.glob("*.hdr"))  # shipped without their .img


def _channel_first(data: np.ndarray) -> np.ndarray:
    data = data.reshape(*data.shape[:3], -1)
    return np.moveaxis(data, -1, 0)


@pytest.mark.parametrize("path", VOLUMES, ids=lambda p: p.name)
def test_volume_affine_and_data_match_nibabel(path):
    ref = nib.load(path)
    image = load_image(path)
    np.testing.assert_allclose(image.meta.affine_array, ref.affine)
    np.testing.assert_allclose(image.array, _channel_first(ref.get_fdata()), rtol=1e-6)
    assert image.meta.spatial_dims == 3
    assert image.meta.spacing == pytest.approx(nib.affines.voxel_sizes(ref.affine))


@pytest.mark.parametrize("path", VOLUMES, ids=lambda p: p.name)
def test_ras_reorientation_matches_closest_canonical(path):
    canonical = nib.as_closest_canonical(nib.load(path))
    image = load_image(path, reorient="RAS")
    np.testing.assert_allclose(image.meta.affine_array, canonical.affine)
    np.testing.assert_allclose(image.array, _channel_first(canonical.get_fdata()), rtol=1e-6)
    assert image.meta.spacing == pytest.approx(nib.affines.voxel_sizes(canonical.affine))


@pytest.mark.parametrize("path", HEADERS_ONLY, ids=lambda p: p.name)
def test_header_pairs(path, tmp_path):
    """Shipped .hdr files lack their .img: a clear error; with an .img they load."""
    with pytest.raises(UnreadableImageError, match=r"\.img"):
        load_image(path)
    hdr = shutil.copy(path, tmp_path / path.name)
    ref = nib.load(hdr)
    n_bytes = int(np.prod(ref.shape)) * np.dtype(ref.get_data_dtype()).itemsize
    n_bytes += int(ref.dataobj.offset)
    (tmp_path / path.name.replace(".hdr", ".img")).write_bytes(bytes(n_bytes))
    image = load_image(hdr)
    np.testing.assert_allclose(image.meta.affine_array, nib.load(hdr).affine)
    assert image.array.shape[1:] == ref.shape[:3]
    assert image.meta.format in ("Analyze", "NIfTI-1", "NIfTI-2")


def test_4d_becomes_channels():
    image = load_image(NIB_DATA / "example4d.nii.gz")
    assert image.array.shape == (2, 128, 96, 24)
    assert image.meta.n_frames == 2


def test_nifti2_and_format_names():
    assert load_image(NIB_DATA / "example_nifti2.nii.gz").meta.format == "NIfTI-2"
    assert load_image(NIB_DATA / "anatomical.nii").meta.format == "NIfTI-1"


def test_scaling_is_applied(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    img.header.set_slope_inter(0.5, -10)
    nib.save(img, tmp_path / "s.nii.gz")
    image = load_image(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(image.array[0], data * 0.5 - 10)
    assert image.meta.rescale_applied and image.meta.spacing == (2.0, 2.0, 3.0)


def test_cifti_is_not_a_volume():
    with pytest.raises(UnreadableImageError, match="Cifti2Image"):
        load_image(NIB_DATA / "row_major.dconn.nii")


def test_truncated_nifti(tmp_path):
    data = (NIB_DATA / "anatomical.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:1000])
    with pytest.raises(UnreadableImageError, match="cut.nii"):
        load_image(tmp_path / "cut.nii")


def test_invalid_orientation_code():
    from medtl.errors import MedtlError

    with pytest.raises(MedtlError, match="one from each pair"):
        load_image(NIB_DATA / "standard.nii.gz", reorient="RAR")
