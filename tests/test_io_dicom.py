"""DICOM single files and multi-frame: every pydicom test file, transfer syntaxes, LUTs, errors."""

from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medtl.errors import UnreadableImageError
from medtl.io import (
    DECODER_PREFERENCE,
    is_dicom,
    load_image,
    read_dicom_header,
)
from medtl.io.dicom import choose_decoding_plugin

TEST_FILES = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
ALL_FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
# Shipped files that are broken on purpose (FACTS.md): each must be an UnreadableImageError.
BROKEN_BY_DESIGN = {
    "JPEG-lossy.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "MR_truncated.dcm",
    "badVR.dcm",
    "meta_missing_tsyntax.dcm",
    "nested_priv_SQ.dcm",
}


def _quiet_read(path: pathlib.Path) -> Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, force=True)
        except Exception:
            return None


def _expected(ds: Dataset) -> np.ndarray:
    """pydicom's own answer, channel-first: pixel_array -> palette or modality LUT (+ MONO1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif ds.SamplesPerPixel == 1:
        arr = apply_modality_lut(arr, ds).astype(np.float64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            bits = ds.BitsStored
            signed = ds.PixelRepresentation == 1
            ends = np.array(
                [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1]
            )
            lo_hi = apply_modality_lut(ends, ds)
            arr = lo_hi.min() + lo_hi.max() - arr
    if arr.ndim == (3 if frames == 1 else 4):  # samples last -> first
        return np.moveaxis(arr, -1, 0)
    return arr[np.newaxis]


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(TEST_FILES)))
def test_pydicom_test_file_matches_pydicom(path: pathlib.Path):
    ds = _quiet_read(path)
    if ds is None or "PixelData" not in ds:
        # Not an image (DICOMDIR, SR, RT plan, a stray non-DICOM file): a clean refusal.
        with pytest.raises(UnreadableImageError) as info:
            load_image(path)
        assert info.value.path == str(path) and "\n" not in info.value.reason
        return
    try:
        expected = _expected(ds)
    except Exception:
        expected = None  # pydicom cannot decode it either: medtl must say so cleanly
    if expected is None or path.name in BROKEN_BY_DESIGN:
        with pytest.raises(UnreadableImageError) as info:
            load_image(path)
        assert info.value.path == str(path)
        assert str(path) in str(info.value)
        assert "\n" not in info.value.reason and "Traceback" not in info.value.reason
        return
    image = load_image(path)
    assert image.array.dtype == np.float32
    assert image.array.shape == expected.shape
    assert image.meta.shape == image.array.shape
    np.testing.assert_allclose(image.array, expected, rtol=1e-6, atol=1e-3)
    json.dumps(image.meta.to_dict())  # JSON-safe


def test_decodable_count_matches_facts():
    """89 of the 95 shipped images decode, the 6 broken-by-design ones do not."""
    loaded, failed = 0, set()
    for path in ALL_FILES:
        ds = _quiet_read(path)
        if ds is None or "PixelData" not in ds:
            continue
        try:
            load_image(path)
            loaded += 1
        except UnreadableImageError:
            failed.add(path.name)
    assert loaded == 89
    assert failed == BROKEN_BY_DESIGN


def test_monai_failures_load_as_2d():
    """MONAI's PydicomReader raises a broadcast error on these single-frame SEG files."""
    for name in ("liver_1frame.dcm", "liver_expb_1frame.dcm"):
        image = load_image(TEST_FILES / name)
        assert image.array.shape == (1, 512, 512)
        assert image.meta.spatial_dims == 2 and image.meta.affine is None


def test_monochrome1_cr_is_inverted():
    path = TEST_FILES / "dicomdirtests/77654033/CR1/6154"
    ds = _quiet_read(path)
    raw = apply_modality_lut(ds.pixel_array, ds)
    image = load_image(path)
    # Brightest stored pixel becomes the darkest loaded pixel.
    assert np.unravel_index(raw.argmax(), raw.shape) == np.unravel_index(
        image.array[0].argmin(), raw.shape
    )
    assert image.meta.photometric_interpretation == "MONOCHROME1"


def _dataset(pixels: np.ndarray, **attrs) -> Dataset:
    """A minimal valid secondary-capture-like grey image with the given pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = attrs.pop("Modality", "OT")
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = attrs.pop("PhotometricInterpretation", "MONOCHROME2")
    ds.BitsAllocated = 16
    ds.BitsStored = attrs.pop("BitsStored", 12)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def test_monochrome1_known_values_and_window(tmp_path):
    pixels = np.array([[0, 4095], [1000, 3000]], dtype=np.uint16)
    ds = _dataset(
        pixels, PhotometricInterpretation="MONOCHROME1", WindowCenter=1000, WindowWidth=400
    )
    ds.save_as(tmp_path / "m1.dcm", enforce_file_format=True)
    image = load_image(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(image.array[0], [[4095, 0], [3095, 1095]])
    # The window moves with the data so the "file" window still frames the same tissue.
    assert image.meta.window_center == 3095 and image.meta.window_width == 400


def _ct(tmp_path, name="ct.dcm") -> tuple[pathlib.Path, np.ndarray]:
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(64, 48), dtype=np.uint16)
    ds = _dataset(
        stored, Modality="CT", RescaleSlope=1, RescaleIntercept=-1024, PixelSpacing=[0.7, 0.8]
    )
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path, stored.astype(np.float32) - 1024


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_give_the_same_hu(tmp_path, syntax):
    path, hu = _ct(tmp_path)
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    image = load_image(tmp_path / "c.dcm")
    np.testing.assert_array_equal(image.array[0], hu)
    assert image.meta.transfer_syntax == syntax.name
    assert image.meta.rescale_applied and image.meta.spacing == (0.7, 0.8)


def test_decoder_preference_table():
    assert choose_decoding_plugin(JPEGLSLossless) == "pyjpegls"
    assert choose_decoding_plugin(RLELossless) == "pylibjpeg"
    assert choose_decoding_plugin(JPEG2000Lossless) == "pylibjpeg"
    assert choose_decoding_plugin(ExplicitVRLittleEndian) == ""
    for group in (pydicom.uid.JPEGLSTransferSyntaxes, pydicom.uid.JPEG2000TransferSyntaxes):
        assert all(uid in DECODER_PREFERENCE for uid in group)


def test_enhanced_multiframe_sorted_with_functional_group_rescale(tmp_path):
    frames = np.stack([np.full((4, 5), k * 10, dtype=np.uint16) for k in range(4)])
    order = [2, 0, 3, 1]  # frames stored out of spatial order
    ds = _dataset(frames[order])
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.6]
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -100
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = [-10, -20, 3.0 * k]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(tmp_path / "enh.dcm", enforce_file_format=True)

    image = load_image(tmp_path / "enh.dcm")
    assert image.array.shape == (1, 4, 4, 5)
    assert image.meta.spatial_dims == 3 and image.meta.n_frames == 4
    np.testing.assert_array_equal(image.array[0, :, 0, 0], [-100, -80, -60, -40])
    assert image.meta.spacing == pytest.approx((3.0, 0.5, 0.6))
    affine = image.meta.affine_array
    # voxel (slice 1, row 2, col 3) -> LPS (-10 + 3*0.6, -20 + 2*0.5, 3) -> RAS flips x, y
    np.testing.assert_allclose(affine @ [1, 2, 3, 1], [10 - 1.8, 20 - 1.0, 3.0, 1])


def test_rtdose_grid_offsets_give_affine():
    ds = _quiet_read(TEST_FILES / "rtdose.dcm")
    image = load_image(TEST_FILES / "rtdose.dcm")
    affine = image.meta.affine_array
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    for k, offset in enumerate(ds.GridFrameOffsetVector):
        np.testing.assert_allclose(affine @ [k, 0, 0, 1], [-x, -y, z + float(offset), 1])


def test_multiframe_without_positions_keeps_file_order():
    image = load_image(TEST_FILES / "examples_ybr_color.dcm")
    assert image.array.shape == (3, 30, 240, 320)
    assert image.meta.affine is None and image.meta.n_frames == 30


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"hello, this is a text file, not DICOM\n" * 5, "not a DICOM file"),
        (b"", "not a DICOM file"),
    ],
)
def test_not_dicom_named_dcm(tmp_path, content, reason):
    path = tmp_path / "x.dcm"
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError) as info:
        load_image(path)
    assert info.value.path == str(path)


def test_truncated_file(tmp_path):
    data = (TEST_FILES / "CT_small.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="cut.dcm"):
        load_image(path)
    path.write_bytes(data[:200])  # cut inside the header
    with pytest.raises(UnreadableImageError):
        load_image(path)


def test_compression_without_decoder(tmp_path):
    path, _ = _ct(tmp_path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # no pixel decoder exists for video
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(UnreadableImageError, match="MPEG2") as info:
        load_image(tmp_path / "mpeg.dcm")
    assert "not supported" in info.value.reason


def test_read_dicom_header_and_is_dicom(tmp_path):
    ds = read_dicom_header(TEST_FILES / "CT_small.dcm")
    assert "PixelData" not in ds and ds.Rows == 128
    assert is_dicom(TEST_FILES / "CT_small.dcm")
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    assert not is_dicom(tmp_path / "a.png")
    with pytest.raises(UnreadableImageError):
        read_dicom_header(tmp_path / "a.png")


def test_monai_load_imaged_reads_dicom_channel_first():
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    from medtl.io import MedtlReader

    loader = LoadImaged(keys="image", reader=MedtlReader(), image_only=False)
    out = loader({"image": str(TEST_FILES / "CT_small.dcm")})
    expected = load_image(TEST_FILES / "CT_small.dcm").array
    np.testing.assert_array_equal(out["image"].numpy(), expected)
    assert out["image_meta_dict"]["modality"] == "CT"
    again = EnsureChannelFirstd(keys="image")(out)
    assert tuple(again["image"].shape) == expected.shape
    assert tuple(out["image"].affine.shape) == (4, 4)
