"""Transform presets on real tiny DICOM/NIfTI files with known pixel values."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medtl.config import TransformConfig
from medtl.errors import ConfigError
from medtl.models.registry import PreprocessSpec
from medtl.transforms import (
    WINDOW_PRESETS,
    ToChannelsd,
    build_transforms,
    resolve_window,
    transform_cache_key,
    window_to_unit,
)

# An identity normalisation (mean 0, std 1) so outputs are the [0, 1] intensities.
IDENTITY = PreprocessSpec(input_size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
LITE = PreprocessSpec(input_size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def write_dicom(
    path: Path,
    stored: np.ndarray,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> Path:
    """A minimal uncompressed 12-bit grey DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, vol: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), path)
    return path


@pytest.mark.parametrize("name", sorted(WINDOW_PRESETS))
def test_window_presets_map_hu_to_unit(name):
    c, w = WINDOW_PRESETS[name]
    hu = torch.tensor([c - w, c - w / 2, c - w / 4, c, c + w / 4, c + w / 2, c + w])
    got = window_to_unit(hu, c, w)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_lung_window_through_the_2p5d_preset(tmp_path):
    # Axial slices of known HU: the lung window (-600/1500) maps -1350 -> 0, -600 -> 0.5, 150 -> 1.
    hu = [-2000, -1350, -975, -600, -225, 150, 1000]
    vol = np.stack([np.full((8, 8), v) for v in hu], axis=-1)
    path = write_nifti(tmp_path / "ct.nii", vol)
    tcfg = TransformConfig(preset="ct_2p5d", spatial_size=[8, 8], slices=1, window="lung")
    det = build_transforms(tcfg, IDENTITY, 1, "fold_sum").deterministic
    expect = [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    for k, want in enumerate(expect):
        out = det({"image": str(path), "slice": k})["image"]
        assert out.shape == (1, 8, 8)
        assert torch.allclose(out, torch.full_like(out, want), atol=1e-6), (k, hu[k])


def test_unknown_window_names_the_valid_presets():
    with pytest.raises(ConfigError, match=r"Did you mean 'lung'\?.*mediastinum"):
        resolve_window("lungs")
    assert resolve_window({"center": 40, "width": 80}) == (40.0, 80.0)
    assert resolve_window("file") == "file"


def test_monochrome1_comes_out_brighter_is_higher(tmp_path):
    # MONOCHROME1 stores low values as white: the left half (stored 0) must come out bright.
    stored = np.zeros((32, 32), np.uint16)
    stored[:, 16:] = 4095
    stored[0, 0] = 2000  # keep the percentile clip away from a degenerate two-value image
    path = write_dicom(tmp_path / "mono1.dcm", stored, "MONOCHROME1")
    tcfg = TransformConfig(spatial_size=[32, 32], percentile_clip=[0, 100])
    out = build_transforms(tcfg, IDENTITY, 1, "fold_sum").deterministic({"image": str(path)})
    img = out["image"][0]
    assert img[:, :16].mean() > 0.99 and img[:, 16:].mean() < 0.01


def test_file_window_uses_the_files_voi(tmp_path):
    stored = np.tile(np.arange(0, 4096, 128, dtype=np.uint16), (32, 1))  # 0..3968 by column
    path = write_dicom(tmp_path / "voi.dcm", stored, window=(1024.0, 1024.0))
    tcfg = TransformConfig(spatial_size=[32, 32], window="file")
    img = build_transforms(tcfg, IDENTITY, 1, "fold_sum").deterministic({"image": str(path)})[
        "image"
    ][0]
    expect = np.clip((np.arange(0, 4096, 128) - 512) / 1024, 0, 1)
    assert np.allclose(img[5].numpy(), expect, atol=1e-5)


def test_cxr_keeps_aspect_and_pads(tmp_path):
    stored = np.full((20, 40), 3000, np.uint16)
    stored[0, 0] = 0
    path = write_dicom(tmp_path / "wide.dcm", stored)
    tcfg = TransformConfig(spatial_size=[32, 32], percentile_clip=[0, 100])
    img = build_transforms(tcfg, IDENTITY, 1, "fold_sum").deterministic({"image": str(path)})[
        "image"
    ]
    assert img.shape == (1, 32, 32) and img.dtype == torch.float32
    rows_with_content = (img[0] > 0.5).any(dim=1).nonzero().flatten()
    assert len(rows_with_content) == 16  # 20x40 -> 16x32, padded 8 rows above and below
    assert img[0, :8].abs().max() == 0 and img[0, 24:].abs().max() == 0


def test_channels_and_normalisation_follow_the_weights(tmp_path):
    stored = np.full((16, 16), 4095, np.uint16)
    stored[:8] = 0
    path = write_dicom(tmp_path / "half.dcm", stored)
    tcfg = TransformConfig(spatial_size=[16, 16], percentile_clip=[0, 100])
    rgb = PreprocessSpec(input_size=(16, 16), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    folded = build_transforms(tcfg, rgb, 1, "fold_sum")
    x = folded.deterministic({"image": str(path)})["image"]
    assert x.shape == (1, 16, 16) and folded.out_channels == 1
    # mean of means / mean of stds for a folded stem: white -> (1 - 0.5) / 0.25
    assert torch.allclose(x[0, 15], torch.full((16,), 2.0))
    rep = build_transforms(tcfg, rgb, 1, "repeat")
    y = rep.deterministic({"image": str(path)})["image"]
    assert y.shape == (3, 16, 16) and rep.out_channels == 3
    for c, (m, s) in enumerate(zip(rgb.mean, rgb.std, strict=True)):
        assert torch.allclose(y[c, 0], torch.full((16,), -m / s))
        assert torch.allclose(y[c, 15], torch.full((16,), (1 - m) / s))


def test_rgb_exports_become_grey():
    rgb = torch.zeros(3, 4, 4)
    rgb[0], rgb[1], rgb[2] = 1.0, 0.5, 0.0
    grey = ToChannelsd("image", 1)({"image": rgb})["image"]
    assert grey.shape == (1, 4, 4)
    assert torch.allclose(grey, torch.full((1, 4, 4), 0.299 + 0.5 * 0.587))


def test_2p5d_gives_k_adjacent_slices(tmp_path):
    vol = np.stack([np.full((12, 10), 10 * k) for k in range(10)], axis=-1)  # slice k = 10k HU
    path = write_nifti(tmp_path / "vol.nii.gz", vol)
    tcfg = TransformConfig(
        preset="ct_2p5d", spatial_size=[24, 24], slices=5, window={"center": 50, "width": 100}
    )
    pair = build_transforms(tcfg, IDENTITY, 5, "fold_sum", train=True)
    mid = pair.deterministic({"image": str(path)})["image"]
    assert mid.shape == (5, 24, 24)
    centre = mid[:, 12, 12]
    assert torch.allclose(centre, torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7]), atol=1e-5)
    edge = pair.deterministic({"image": str(path), "slice": 0})["image"][:, 12, 12]
    assert torch.allclose(edge, torch.tensor([0.0, 0.0, 0.0, 0.1, 0.2]), atol=1e-5)
    assert pair.random({"image": mid})["image"].shape == (5, 24, 24)
    with pytest.raises(ConfigError, match="model.in_channels=5"):
        build_transforms(tcfg, IDENTITY, 1, "fold_sum")


def test_3d_preset_gives_the_configured_size(tmp_path):
    rng = np.random.default_rng(0)
    path = write_nifti(
        tmp_path / "ct.nii.gz", rng.integers(-1000, 1000, (30, 26, 12)), spacing=(0.8, 0.8, 2.5)
    )
    tcfg = TransformConfig(
        preset="ct_3d", spatial_size=[20, 20, 16], pixdim=[1.5, 1.5, 2.0], window="soft_tissue"
    )
    pair = build_transforms(tcfg, IDENTITY, 1, "fold_sum", train=True)
    x = pair.deterministic({"image": str(path)})["image"]
    assert x.shape == (1, 20, 20, 16) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert pair.random({"image": x})["image"].shape == (1, 20, 20, 16)


def test_random_ops_only_in_the_random_part():
    from monai.transforms import Randomizable

    tcfg = TransformConfig(augment="standard")
    train = build_transforms(tcfg, LITE, 1, "fold_sum", train=True)
    assert not [t for t in train.deterministic.transforms if isinstance(t, Randomizable)]
    assert [t for t in train.random.transforms if isinstance(t, Randomizable)]
    assert not build_transforms(tcfg, LITE, 1, "fold_sum", train=False).random.transforms


def test_cache_key_tracks_what_shapes_the_cached_output():
    base = TransformConfig()
    key = transform_cache_key(base, LITE, 1, "fold_sum")
    assert key == transform_cache_key(TransformConfig(), LITE, 1, "fold_sum")
    # augmentation is applied after the cache: it must not invalidate it
    assert key == transform_cache_key(TransformConfig(augment="standard"), LITE, 1, "fold_sum")
    changed = [
        transform_cache_key(TransformConfig(window="lung"), LITE, 1, "fold_sum"),
        transform_cache_key(TransformConfig(spatial_size=[128, 128]), LITE, 1, "fold_sum"),
        transform_cache_key(TransformConfig(percentile_clip=[1, 99]), LITE, 1, "fold_sum"),
        transform_cache_key(base, IDENTITY, 1, "fold_sum"),
        transform_cache_key(base, LITE, 1, "repeat"),
    ]
    assert len({key, *changed}) == len(changed) + 1
    assert build_transforms(base, LITE, 1, "fold_sum").cache_key == key


def test_2p5d_on_a_dicom_series_follows_the_slice_positions(tmp_path):
    # Six axial CT slices written in shuffled file order; slice z holds 100*z HU.
    series = tmp_path / "series"
    series.mkdir()
    study, uid = generate_uid(), generate_uid()
    for n, z in enumerate([3, 0, 5, 1, 4, 2]):
        p = write_dicom(series / f"f{n}.dcm", np.full((8, 8), 1024 + 100 * z), slope=1.0)
        ds = dcmread(p)
        ds.Modality = "CT"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.InstanceNumber = n + 1
        ds.save_as(p, enforce_file_format=True)
    tcfg = TransformConfig(
        preset="ct_2p5d", spatial_size=[8, 8], slices=3, window={"center": 250, "width": 500}
    )
    det = build_transforms(tcfg, IDENTITY, 3, "fold_sum").deterministic
    mid = det({"image": str(series)})["image"][:, 4, 4]
    assert torch.allclose(mid, torch.tensor([0.4, 0.6, 0.8]), atol=1e-5)  # slices 2, 3, 4
    low = det({"image": str(series), "slice": 1})["image"][:, 4, 4]
    assert torch.allclose(low, torch.tensor([0.0, 0.2, 0.4]), atol=1e-5)
