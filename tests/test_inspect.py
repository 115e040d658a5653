"""``medtl inspect`` API: summary dict, previews, no identifying values, clean errors."""

from __future__ import annotations

import json
import pathlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtl.errors import UnreadableImageError
from medtl.inspect import inspect_path, write_preview
from medtl.io import load_image

TEST_FILES = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
NIB_DATA = pathlib.Path(nib.__file__).parent / "tests" / "data"

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN9876543",
    "PatientBirthDate": "19510203",
    "AccessionNumber": "ACC55501",
    "InstitutionName": "Saint Example Hospital",
    "ReferringPhysicianName": "Who^Doctor",
    "StudyDate": "20240117",
}


def _phi_ct(path: pathlib.Path) -> dict[str, str]:
    """Write a CT image full of identifying values; return every value that must not leak."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 16, 20
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = (np.arange(320, dtype=np.uint16).reshape(16, 20) * 10).tobytes()
    ds.save_as(path, enforce_file_format=True)
    secrets = dict(PHI)
    secrets.update(
        StudyInstanceUID=ds.StudyInstanceUID,
        SeriesInstanceUID=ds.SeriesInstanceUID,
        SOPInstanceUID=ds.SOPInstanceUID,
        PatientNameParts="Jane",
    )
    return secrets


def test_no_identifying_values_anywhere(tmp_path):
    path = tmp_path / "image.dcm"
    secrets = _phi_ct(path)
    outputs = {
        "meta": json.dumps(load_image(path).meta.to_dict()),
        "inspect": json.dumps(inspect_path(path)),
    }
    from monai.transforms import LoadImaged

    from medtl.io import MedtlReader

    loaded = LoadImaged(keys="image", reader=MedtlReader(), image_only=False)({"image": str(path)})
    outputs["monai"] = repr(dict(loaded["image_meta_dict"]))
    for where, text in outputs.items():
        for key, value in secrets.items():
            assert value not in text, f"{key} leaked into {where}"


def test_inspect_ct_values(tmp_path):
    path = tmp_path / "image.dcm"
    _phi_ct(path)
    info = inspect_path(path)
    assert info["shape"] == [1, 16, 20] and info["dtype"] == "uint16"
    assert info["modality"] == "CT" and info["photometric_interpretation"] == "MONOCHROME2"
    assert info["min"] == -1024 and info["max"] == 319 * 10 - 1024
    assert info["spacing"] == [0.5, 0.5] and info["window_center"] == 40
    assert info["p50"] == pytest.approx(np.median(np.arange(320) * 10 - 1024))
    assert info["orientation"] is None and info["n_frames"] == 1


def test_inspect_nifti_and_series_orientation():
    info = inspect_path(NIB_DATA / "example4d.nii.gz")
    assert info["format"] == "NIfTI-1" and info["orientation"] == "LAS"
    assert info["shape"] == [2, 128, 96, 24]
    series = inspect_path(TEST_FILES / "dicomdirtests/98892001/CT5N")
    assert series["format"] == "DICOM series" and series["shape"] == [1, 5, 16, 16]


@pytest.mark.parametrize("content", [b"just some text\n" * 20, b""])
def test_inspect_non_image_raises(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError) as info:
        inspect_path(path)
    assert info.value.path == str(path)


def test_inspect_truncated_dicom_raises(tmp_path):
    data = (TEST_FILES / "MR_small.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 3000])
    with pytest.raises(UnreadableImageError, match="cut.dcm"):
        inspect_path(tmp_path / "cut.dcm")
    with pytest.raises(UnreadableImageError, match="file meta information has no Transfer"):
        inspect_path(TEST_FILES / "meta_missing_tsyntax.dcm")


def test_preview_uses_file_window(tmp_path):
    path = tmp_path / "image.dcm"
    _phi_ct(path)
    out = write_preview(path, tmp_path / "prev" / "p.png")
    png = np.asarray(Image.open(out))
    assert png.dtype == np.uint8 and png.shape == (16, 20)
    hu = load_image(path).array[0]
    # Window 40/400: below -160 HU is black, above 240 HU is white.
    assert (png[hu <= -160] == 0).all() and (png[hu >= 240] == 255).all()
    inside = (hu > -150) & (hu < 230)
    assert ((png[inside] > 0) & (png[inside] < 255)).all()


def test_preview_monochrome1_shows_low_stored_values_bright(tmp_path):
    out = write_preview(TEST_FILES / "dicomdirtests/77654033/CR1/6154", tmp_path / "cr.png")
    png = np.asarray(Image.open(out)).astype(int)
    ds = pydicom.dcmread(TEST_FILES / "dicomdirtests/77654033/CR1/6154")
    stored = ds.pixel_array
    assert png[stored == stored.min()].mean() > png[stored == stored.max()].mean()


def test_preview_volume_and_colour(tmp_path):
    out = write_preview(NIB_DATA / "anatomical.nii", tmp_path / "a.png")
    img = nib.as_closest_canonical(nib.load(NIB_DATA / "anatomical.nii"))
    # Radiological axial display of the middle axial slice: (rows A->P, cols R->L).
    assert np.asarray(Image.open(out)).shape == (img.shape[1], img.shape[0])
    loaded = load_image(TEST_FILES / "examples_rgb_color.dcm")
    out = write_preview(loaded, tmp_path / "rgb.png")
    assert np.asarray(Image.open(out)).shape == (240, 320, 3)


def test_demo_dataset_loads_without_leaking_phi(demo_data):
    """Every demo image (five transfer syntaxes, MONOCHROME1, NIfTI) loads; no PHI leaves."""
    import pandas as pd

    from medtl.demo_data import demo_phi_values

    paths = [
        demo_data.root / rel
        for csv in (demo_data.manifest_csv, demo_data.manifest_3d_csv)
        if csv is not None
        for rel in pd.read_csv(csv)["image"]
    ]
    assert len(paths) > 20
    texts = []
    for path in paths:
        image = load_image(path)
        assert image.array.dtype == np.float32 and np.isfinite(image.array).all()
        texts.append(json.dumps(image.meta.to_dict()))
    texts.append(json.dumps(inspect_path(paths[0])))
    blob = "\n".join(texts)
    leaked = {v for v in demo_phi_values(demo_data) if v in blob}
    assert not leaked
