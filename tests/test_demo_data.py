"""The demo dataset is real, varied DICOM/NIfTI, imbalanced, and deterministic for a seed."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from medtl.deid import pseudonymize
from medtl.demo_data import (
    DEMO_SALT,
    DEMO_TRANSFER_SYNTAXES,
    demo_phi_values,
    make_demo_data,
)


@pytest.fixture(scope="module")
def decoded(demo_data):
    """Every 2D manifest row decoded with plain pydicom: (row, dataset, pixels)."""
    m = pd.read_csv(demo_data.manifest_csv)
    out = []
    for row in m.itertuples():
        ds = pydicom.dcmread(demo_data.root / row.image)
        out.append((row, ds, ds.pixel_array))
    return out


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_manifest_columns_and_relative_paths(demo_data):
    m = pd.read_csv(demo_data.manifest_csv)
    assert {"image", "label", "patient_id", "study_id", "site", "sex"} <= set(m.columns)
    assert not m["image"].str.startswith("/").any()
    assert all((demo_data.root / p).is_file() for p in m["image"])
    assert m["patient_id"].nunique() == 40
    assert m["patient_id"].str.fullmatch(r"P-[0-9a-f]{12}").all()
    assert set(m["site"]) == {"site_a", "site_b"}
    per_patient = m.groupby("patient_id").size()
    assert per_patient.min() >= 1 and per_patient.max() <= 4
    # Hospital-export-like names: nested folders, IM#### with and without .dcm.
    names = [Path(p).name for p in m["image"]]
    assert any(n.endswith(".dcm") for n in names) and any("." not in n for n in names)
    assert min(len(Path(p).parts) for p in m["image"]) >= 4


def test_every_file_decodes_and_pixels_are_12_bit(decoded):
    for _row, ds, px in decoded:
        assert px.shape == (96, 96)
        assert ds.BitsStored == 12 and int(px.max()) <= 4095
        assert px.std() > 50  # an image, not a constant


def test_transfer_syntaxes_mixed_and_some_monochrome1(decoded):
    syntaxes = Counter(ds.file_meta.TransferSyntaxUID for _, ds, _ in decoded)
    assert set(syntaxes) == set(DEMO_TRANSFER_SYNTAXES)
    assert any(ds.file_meta.TransferSyntaxUID.is_compressed for _, ds, _ in decoded)
    photometric = Counter(ds.PhotometricInterpretation for _, ds, _ in decoded)
    assert photometric["MONOCHROME1"] >= 0.1 * len(decoded)
    assert photometric["MONOCHROME2"] >= 0.5 * len(decoded)


def test_monochrome1_is_stored_inverted(decoded):
    """Air (image corner) is dark once displayed: high stored values in MONOCHROME1 files."""
    for _row, ds, px in decoded:
        corner = float(px[:4, :4].mean())
        if ds.PhotometricInterpretation == "MONOCHROME1":
            assert corner > 3000
        else:
            assert corner < 1200


def test_nodule_is_a_visible_opacity():
    """Same phantom with and without the finding: a round opacity well above the texture."""
    from medtl.demo_data import _nodule_site, _radiograph

    for k in range(5):
        nodule = _nodule_site(np.random.default_rng(k))
        with_n = _radiograph(np.random.default_rng(100 + k), 96, nodule)
        without = _radiograph(np.random.default_rng(100 + k), 96, None)
        diff = with_n - without
        cy, cx = np.unravel_index(np.argmax(diff), diff.shape)
        x, y = nodule[0], nodule[1]
        assert abs(cx - (x + 1) / 2 * 95) < 8 and abs(cy - (y + 1) / 2 * 95) < 8
        assert diff.max() > 0.1  # attenuation units; lung texture std is ~0.05
        assert (diff > 0.05).sum() >= 9  # several pixels wide, not a speck


def test_class_imbalance_and_site_differences(demo_data, decoded):
    m = pd.read_csv(demo_data.manifest_csv)
    frac = (m["label"] == "nodule").mean()
    assert 0.18 <= frac <= 0.35, frac
    # Most patients keep one label across studies.
    consistent = (m.groupby("patient_id")["label"].nunique() == 1).mean()
    assert consistent >= 0.8
    # The two sites really look different (contrast/brightness/noise).
    display = {"site_a": [], "site_b": []}
    for row, ds, px in decoded:
        img = 4095 - px if ds.PhotometricInterpretation == "MONOCHROME1" else px
        display[row.site].append(float(img[:4, :4].mean()))
    assert np.mean(display["site_b"]) > np.mean(display["site_a"]) + 200


def test_labels_csv_and_pseudonyms_match_headers(demo_data, decoded):
    labels = pd.read_csv(demo_data.labels_csv, dtype=str)
    assert list(labels.columns[:2]) == ["AccessionNumber", "label"]
    by_acc = dict(zip(labels["AccessionNumber"], labels["label"], strict=True))
    for row, ds, _ in decoded:
        assert by_acc[ds.AccessionNumber] == row.label
        assert row.patient_id == pseudonymize(ds.PatientID, DEMO_SALT)
        assert row.study_id == pseudonymize(ds.StudyInstanceUID, DEMO_SALT, prefix="S-")
        assert ds.PatientID not in row.image


def test_phi_values_cover_headers_and_stay_out_of_manifests(demo_data, decoded):
    values = demo_phi_values(demo_data)
    _, ds, _ = decoded[0]
    for kw in ["PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
               "InstitutionName", "StudyInstanceUID", "SOPInstanceUID"]:  # fmt: skip
        assert str(ds[kw].value) in values, kw
    for csv in [demo_data.manifest_csv, demo_data.holdout_manifest_csv, demo_data.manifest_3d_csv]:
        text = csv.read_text()
        assert not [v for v in values if v in text], csv.name


def test_holdout_and_3d_sets(demo_data):
    import nibabel as nib

    train = pd.read_csv(demo_data.manifest_csv)
    hold = pd.read_csv(demo_data.holdout_manifest_csv)
    assert len(hold) >= 8 and set(hold["label"]) == {"normal", "nodule"}
    assert not set(hold["patient_id"]) & set(train["patient_id"])
    assert all((demo_data.root / p).is_file() for p in hold["image"])
    m3 = pd.read_csv(demo_data.manifest_3d_csv)
    assert set(m3["label"]) == {"normal", "nodule"}
    img = nib.load(demo_data.root / m3["image"].iloc[0])
    vol = np.asarray(img.dataobj)
    assert vol.shape == (32, 32, 16)
    assert vol.min() <= -900 and vol.max() >= 300  # HU: air and bone
    assert np.allclose(img.header.get_zooms(), (1.2, 1.2, 2.5))


def test_deterministic_for_a_seed(tmp_path):
    a = make_demo_data(tmp_path / "a", n_patients=4, image_size=48, seed=5, n_3d=2, n_holdout=2)
    b = make_demo_data(tmp_path / "b", n_patients=4, image_size=48, seed=5, n_3d=2, n_holdout=2)
    c = make_demo_data(tmp_path / "c", n_patients=4, image_size=48, seed=6, n_3d=2, n_holdout=2)
    da, db, dc = _digest(a.root), _digest(b.root), _digest(c.root)
    assert da == db
    assert da != dc
    assert demo_phi_values(a) == demo_phi_values(b) != demo_phi_values(c)


def test_example_manifests_name_files_of_the_default_demo(tmp_path):
    """data_manifests/example_*.csv point into `medtl demo-data data_manifests/demo`."""
    from medtl.manifest import read_manifest, validate_manifest

    make_demo_data(tmp_path / "demo", n_patients=60, image_size=32, seed=0)
    examples = Path(__file__).parent.parent / "data_manifests"
    for name in ("example_2d.csv", "example_3d.csv"):
        shutil.copy(examples / name, tmp_path / name)
        report = validate_manifest(read_manifest(tmp_path / name), classes=["normal", "nodule"])
        assert not report.errors, (name, report.errors)
        assert set(report.summary["class_counts"]) == {"normal", "nodule"}
