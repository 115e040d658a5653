"""DICOM series folders: sorting by position, geometry, and clear errors for bad folders."""

from __future__ import annotations

import pathlib
import random
import shutil
import uuid

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtl.errors import UnreadableImageError
from medtl.io import load_dicom_series, load_image

TEST_FILES = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"


def _volume(n=6, rows=8, cols=10, seed=0) -> np.ndarray:
    """Stored values per slice; slice k has a distinct offset so order is visible."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2000, size=(n, rows, cols), dtype=np.uint16)
    return base + (np.arange(n, dtype=np.uint16) * 100)[:, None, None]


def write_series(
    folder: pathlib.Path,
    stored: np.ndarray,
    orientation=(1, 0, 0, 0, 1, 0),
    origin=(-50.0, -60.0, 10.0),
    step=2.5,
    spacing=(0.7, 0.8),
    series_uid: str | None = None,
    z_jitter: np.ndarray | None = None,
) -> list[pathlib.Path]:
    """Write one CT slice per file, shuffled on disk, random names, misleading InstanceNumber."""
    folder.mkdir(parents=True, exist_ok=True)
    ori = np.asarray(orientation, dtype=float)
    normal = np.cross(ori[:3], ori[3:])
    series_uid = series_uid or generate_uid()
    paths = []
    order = list(range(len(stored)))
    random.Random(1).shuffle(order)
    for rank, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_SOP
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = CT_SOP
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.InstanceNumber = rank + 1  # deliberately not the spatial order
        ds.ImageOrientationPatient = list(orientation)
        offset = k * step + (0.0 if z_jitter is None else float(z_jitter[k]))
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + offset * normal]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = step
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{uuid.uuid4().hex}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_shuffled_axial_series_sorted_with_geometry(tmp_path):
    stored = _volume()
    write_series(tmp_path / "s", stored)
    (tmp_path / "s" / "notes.txt").write_text("not dicom")  # ignored
    image = load_image(tmp_path / "s")
    assert image.meta.format == "DICOM series" and image.meta.spatial_dims == 3
    assert image.array.shape == (1, 6, 8, 10)
    np.testing.assert_array_equal(image.array[0], stored.astype(np.float32) - 1024)
    assert image.meta.spacing == pytest.approx((2.5, 0.7, 0.8))
    affine = image.meta.affine_array
    # voxel (slice 2, row 3, col 4): LPS = origin + 4*0.8 x + 3*0.7 y + 2*2.5 z; RAS flips x, y.
    lps = np.array([-50 + 3.2, -60 + 2.1, 10 + 5.0])
    np.testing.assert_allclose(affine @ [2, 3, 4, 1], [-lps[0], -lps[1], lps[2], 1])


def test_oblique_sagittal_series_descending_positions(tmp_path):
    """Sorting uses the normal (row x col), not z or file names."""
    stored = _volume(n=5)
    ori = (0, 1, 0, 0, 0, -1)  # sagittal: rows along +y, columns along -z; normal = -x
    write_series(tmp_path / "sag", stored, orientation=ori, origin=(30.0, 0.0, 0.0), step=3.0)
    image = load_dicom_series(tmp_path / "sag")
    np.testing.assert_array_equal(image.array[0], stored.astype(np.float32) - 1024)
    import nibabel as nib

    # slices step along the normal (-x LPS = patient right), rows go inferior, cols posterior
    assert "".join(nib.aff2axcodes(image.meta.affine_array)) == "RIP"
    ras = load_image(tmp_path / "sag", reorient="RAS")
    assert "".join(nib.aff2axcodes(ras.meta.affine_array)) == "RAS"
    # Same world position for the same voxel value after reorientation.
    k, r, c = 1, 2, 3
    value = image.array[0, k, r, c]
    world = image.meta.affine_array @ [k, r, c, 1]
    idx = np.rint(np.linalg.inv(ras.meta.affine_array) @ world).astype(int)[:3]
    assert ras.array[0][tuple(idx)] == value


def test_list_of_files_is_a_series(tmp_path):
    stored = _volume(n=3)
    paths = write_series(tmp_path / "s", stored)
    image = load_dicom_series(paths)
    np.testing.assert_array_equal(image.array[0], stored.astype(np.float32) - 1024)


def test_mixed_series_error_counts_without_uids(tmp_path):
    uid_a, uid_b = generate_uid(), generate_uid()
    write_series(tmp_path / "m", _volume(n=3), series_uid=uid_a)
    write_series(tmp_path / "m", _volume(n=2), series_uid=uid_b, origin=(0.0, 0.0, 100.0))
    with pytest.raises(UnreadableImageError, match="2 DICOM series") as info:
        load_image(tmp_path / "m")
    assert uid_a not in str(info.value) and uid_b not in str(info.value)
    assert "3, 2 files" in info.value.reason


def test_duplicate_position_error(tmp_path):
    paths = write_series(tmp_path / "d", _volume(n=4))
    shutil.copy(paths[0], tmp_path / "d" / "copy.dcm")
    with pytest.raises(UnreadableImageError, match="duplicate slice position"):
        load_image(tmp_path / "d")


def test_grey_and_colour_slices_are_a_clean_error(tmp_path):
    """Not numpy's ValueError: only UnreadableImageError gets a file quarantined."""
    paths = write_series(tmp_path / "d", _volume(n=4))
    ds = pydicom.dcmread(paths[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()
    ds.save_as(paths[1], enforce_file_format=True)
    with pytest.raises(UnreadableImageError, match="mix grey and colour"):
        load_image(tmp_path / "d")


def test_missing_slice_error(tmp_path):
    paths = write_series(tmp_path / "g", _volume(n=6))
    positions = {p: float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in paths}
    middle = sorted(paths, key=positions.get)[3]
    middle.unlink()
    with pytest.raises(UnreadableImageError, match="slice is probably missing"):
        load_image(tmp_path / "g")


def test_spacing_tolerance_is_configurable(tmp_path):
    jitter = np.array([0, 0.005, -0.005, 0.0, 0.005])  # gaps deviate up to 0.6%
    write_series(tmp_path / "j", _volume(n=5), z_jitter=jitter)
    assert load_dicom_series(tmp_path / "j").array.shape == (1, 5, 8, 10)
    with pytest.raises(UnreadableImageError, match="non-uniform"):
        load_dicom_series(tmp_path / "j", spacing_tolerance=0.001)


def test_real_series_folders_from_pydicom():
    """pydicom's DICOMDIR tree: one clean CT series and real-world problem folders."""
    ct5n = load_image(TEST_FILES / "dicomdirtests/98892001/CT5N")
    assert ct5n.array.shape == (1, 5, 16, 16)
    with pytest.raises(UnreadableImageError, match="3 DICOM series"):
        load_image(TEST_FILES / "dicomdirtests/98892003/MR2")
    with pytest.raises(UnreadableImageError, match="different orientations"):
        load_image(TEST_FILES / "dicomdirtests/98892003/MR700")  # includes a localizer
    with pytest.raises(UnreadableImageError, match="missing"):
        load_image(TEST_FILES / "dicomdirtests/77654033/CT2")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnreadableImageError, match="no DICOM images"):
        load_image(tmp_path / "empty")


def test_monai_reader_on_series_folder(tmp_path):
    from monai.transforms import LoadImaged

    from medtl.io import MedtlReader

    stored = _volume(n=4)
    write_series(tmp_path / "s", stored)
    out = LoadImaged(keys="image", reader=MedtlReader(), image_only=False)(
        {"image": str(tmp_path / "s")}
    )
    assert tuple(out["image"].shape) == (1, 4, 8, 10)
    np.testing.assert_allclose(
        out["image"].affine.numpy(), load_image(tmp_path / "s").meta.affine_array
    )
