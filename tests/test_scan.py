"""`manifest scan` of DICOM exports (demo tree and hand-made edge cases) and the PHI rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtl.deid import (
    IDENTIFYING_ATTRIBUTES,
    SALT_ENV,
    SALT_FILE_ENV,
    is_identifying_column,
    load_salt,
    pseudonymize,
)
from medtl.demo_data import DEMO_SALT, demo_phi_values
from medtl.errors import ConfigError, ManifestError
from medtl.manifest import read_manifest, scan_dicom_dir, validate_manifest


@pytest.fixture(scope="module")
def scanned(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "scan.csv"
    result = scan_dicom_dir(
        demo_data.dicom_dir, demo_data.labels_csv, out=out, salt=DEMO_SALT, progress=False
    )
    return result, out


def test_scan_reproduces_the_demo_manifest(demo_data, scanned):
    result, out = scanned
    demo = pd.read_csv(demo_data.manifest_csv)
    scan = pd.read_csv(out)
    assert result.n_rows == len(scan) == len(demo)
    assert result.n_unlabeled == 0 and result.n_unreadable == 0
    assert result.n_non_dicom == 2  # the export log and .DS_Store
    scan["abs"] = [str((out.parent / p).resolve()) for p in scan["image"]]
    demo["abs"] = [str((demo_data.root / p).resolve()) for p in demo["image"]]
    merged = demo.merge(scan, on="abs", suffixes=("", "_scan"), validate="one_to_one")
    assert len(merged) == len(demo)
    for col in ("label", "patient_id", "study_id", "site", "sex", "modality"):
        assert (merged[col] == merged[f"{col}_scan"]).all(), col
    # The scanned manifest is valid as it stands.
    assert validate_manifest(read_manifest(out)).ok


def test_scan_writes_no_identifying_value(demo_data, scanned):
    result, out = scanned
    values = demo_phi_values(demo_data)
    assert len(values) > 100
    for f in (out, result.unlabeled_csv, result.unreadable_csv):
        text = f.read_text()
        leaked = [v for v in values if v in text]
        assert not leaked, (f.name, leaked[:3])
    # Not even the join key's values (accession numbers) travel from labels.csv.
    labels = pd.read_csv(demo_data.labels_csv, dtype=str)
    assert not set(labels["AccessionNumber"]) & set(out.read_text().replace("\n", ",").split(","))
    assert "AccessionNumber" not in result.manifest.columns


def test_one_pseudonym_per_patient(demo_data, scanned):
    result, out = scanned
    scan = pd.read_csv(out)
    mrn = {}
    for image, pid in zip(scan["image"], scan["patient_id"], strict=True):
        ds = pydicom.dcmread(out.parent / image, stop_before_pixels=True)
        mrn.setdefault(ds.PatientID, set()).add(pid)
    assert all(len(p) == 1 for p in mrn.values())
    assert len({next(iter(p)) for p in mrn.values()}) == len(mrn) == 40


def test_salt_from_environment_changes_pseudonyms_not_grouping(demo_data, tmp_path):
    res = scan_dicom_dir(demo_data.dicom_dir, demo_data.labels_csv, progress=False)
    demo = pd.read_csv(demo_data.manifest_csv)
    assert not set(res.manifest["patient_id"]) & set(demo["patient_id"])
    assert res.manifest["patient_id"].nunique() == demo["patient_id"].nunique()
    assert Path(res.manifest["image"].iat[0]).is_absolute()  # no out: absolute paths


def test_unlabeled_images_are_listed_not_dropped(demo_data, tmp_path):
    labels = pd.read_csv(demo_data.labels_csv, dtype=str)
    labels.iloc[5:].to_csv(tmp_path / "labels.csv", index=False)
    res = scan_dicom_dir(
        demo_data.dicom_dir,
        tmp_path / "labels.csv",
        out=tmp_path / "m.csv",
        salt="s",
        progress=False,
    )
    assert res.n_unlabeled == 5 and res.n_rows == len(labels) - 5
    side = pd.read_csv(tmp_path / "m.unlabeled.csv")
    assert len(side) == 5 and side["reason"].str.contains("AccessionNumber").all()
    assert all((tmp_path / p).is_file() for p in side["path"])
    assert "unlabeled: 5" in res.summary()


def test_bad_key_and_bad_labels_file(demo_data, tmp_path):
    with pytest.raises(ConfigError, match="Accession.*Valid values: AccessionNumber"):
        scan_dicom_dir(demo_data.dicom_dir, demo_data.labels_csv, key="Accession", salt="s")
    with pytest.raises(ConfigError, match="StudyInstanceUID"):
        scan_dicom_dir(demo_data.dicom_dir, demo_data.labels_csv, key="PatientName", salt="s")
    with pytest.raises(ManifestError, match="no column 'StudyInstanceUID'.*AccessionNumber"):
        scan_dicom_dir(demo_data.dicom_dir, demo_data.labels_csv, key="StudyInstanceUID", salt="s")
    labels = pd.read_csv(demo_data.labels_csv, dtype=str)
    conflict = pd.concat([labels, labels.head(1).assign(label="other")])
    conflict.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ManifestError, match="conflicting labels") as err:
        scan_dicom_dir(demo_data.dicom_dir, tmp_path / "c.csv", salt="s", progress=False)
    assert labels["AccessionNumber"].iat[0] not in str(err.value)  # line numbers, not values


def test_identifying_label_columns_are_left_out(demo_data, tmp_path):
    labels = pd.read_csv(demo_data.labels_csv, dtype=str)
    manifest = pd.read_csv(demo_data.manifest_csv)
    acc_to_mrn = {}
    for image in manifest["image"]:
        ds = pydicom.dcmread(demo_data.root / image, stop_before_pixels=True)
        acc_to_mrn[ds.AccessionNumber] = ds.PatientID
    labels["MRN"] = labels["AccessionNumber"].map(acc_to_mrn)
    labels["reader_note"] = labels["MRN"]  # innocuous name, identifying content
    labels["grade"] = "2"
    labels.to_csv(tmp_path / "labels.csv", index=False)
    res = scan_dicom_dir(
        demo_data.dicom_dir,
        tmp_path / "labels.csv",
        out=tmp_path / "m.csv",
        salt="s",
        progress=False,
    )
    assert {"MRN", "reader_note"} <= set(res.dropped_columns)
    assert "grade" in res.manifest.columns and "site" in res.manifest.columns
    text = (tmp_path / "m.csv").read_text()
    assert not any(mrn in text for mrn in acc_to_mrn.values())


def test_keep_ids_keeps_real_ids(demo_data, tmp_path):
    res = scan_dicom_dir(demo_data.dicom_dir, demo_data.labels_csv, keep_ids=True, progress=False)
    first = res.manifest.iloc[0]
    ds = pydicom.dcmread(first["image"], stop_before_pixels=True)
    assert first["patient_id"] == ds.PatientID
    assert any("keep-ids" in w for w in res.warnings)


def _dicom(path: Path, **fields) -> Dataset:
    """A tiny real DICOM image (8x8, 16-bit) with the given header fields."""
    no_pixels = fields.pop("no_pixels", False)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = fields.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = uid
    ds.PatientID = "MRN0000001"
    ds.PatientName = "TESTPERSON^ALICE"
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.AccessionNumber = "ACC555"
    for k, v in fields.items():
        setattr(ds, k, v)
    if not no_pixels:
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_series_grouping_non_images_and_unreadable(tmp_path):
    export = tmp_path / "export"
    orient = [1, 0, 0, 0, 1, 0]
    for z in range(3):  # one CT series of 3 slices in its own folder
        _dicom(export / "a" / "b" / f"{z:03d}", ImagePositionPatient=[0, 0, 2.5 * z],
               ImageOrientationPatient=orient, InstanceNumber=z + 1)  # fmt: skip
    # A single CT image of another study, in a folder named after the patient.
    _dicom(export / "TESTPERSON" / "x", StudyInstanceUID="1.2.9", SeriesInstanceUID="1.2.9.1",
           AccessionNumber="ACC777")  # fmt: skip
    # A structured report (not an image) and a damaged file.
    _dicom(
        export / "sr", SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11", Modality="SR", no_pixels=True
    )
    bad = export / "broken"  # cut inside the header
    bad.write_bytes((export / "sr").read_bytes()[:200])
    # A series whose files share a folder with another series cannot become one image.
    for z in range(2):
        _dicom(export / "mixed" / f"s{z}", SeriesInstanceUID="1.2.3.9", ImagePositionPatient=[0, 0, z],
               ImageOrientationPatient=orient)  # fmt: skip
    _dicom(export / "mixed" / "other", SeriesInstanceUID="1.2.3.10")
    pd.DataFrame({"AccessionNumber": ["ACC555", "ACC777"], "label": ["yes", "no"]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    res = scan_dicom_dir(
        export, tmp_path / "labels.csv", out=tmp_path / "out" / "m.csv", salt="s", progress=False
    )
    m = res.manifest.set_index("image")
    assert m.loc["../export/a/b", "n_files"] == 3 and m.loc["../export/a/b", "label"] == "yes"
    assert m.loc["../export/TESTPERSON/x", "label"] == "no"
    assert res.n_series == 1 and res.n_non_image == 1
    reasons = dict(zip(res.unreadable["path"], res.unreadable["reason"], strict=True))
    assert "header unreadable" in reasons["../export/broken"]
    assert "shares its folder" in reasons["../export/mixed/s0"]
    assert "../export/mixed/other" in set(m.index)  # the lone image is still one row
    assert any("image path(s) contain identifying values" in w for w in res.warnings)
    assert (tmp_path / "out" / "m.unreadable.csv").is_file()
    assert m["patient_id"].nunique() == 1 and m["study_id"].nunique() == 2


def test_pseudonyms_are_keyed_and_stable():
    a = pseudonymize("MRN1234567", "salt-1")
    assert a == pseudonymize("MRN1234567", "salt-1") == pseudonymize(" MRN1234567 ", "salt-1")
    assert a.startswith("P-") and len(a) == 14
    assert a != pseudonymize("MRN1234567", "salt-2") != pseudonymize("MRN1234568", "salt-1")
    assert pseudonymize("x", "s", prefix="S-").startswith("S-")
    with pytest.raises(ConfigError):
        pseudonymize("x", "")


def test_load_salt_from_env_file_or_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(SALT_ENV, "from-env")
    assert load_salt() == "from-env"
    monkeypatch.delenv(SALT_ENV)
    (tmp_path / "salt").write_text("from-file\n")
    monkeypatch.setenv(SALT_FILE_ENV, str(tmp_path / "salt"))
    assert load_salt() == "from-file"
    monkeypatch.setenv(SALT_FILE_ENV, str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="does not name a readable file"):
        load_salt()
    monkeypatch.delenv(SALT_FILE_ENV)
    with pytest.raises(ConfigError, match=f"{SALT_ENV}.*{SALT_FILE_ENV}"):
        load_salt()


def test_identifying_rules():
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
               "InstitutionName", "ReferringPhysicianName", "StudyInstanceUID", "StudyDate"):  # fmt: skip
        assert kw in IDENTIFYING_ATTRIBUTES
    assert (
        "SOPClassUID" not in IDENTIFYING_ATTRIBUTES and "PatientSex" not in IDENTIFYING_ATTRIBUTES
    )
    assert is_identifying_column("MRN") and is_identifying_column("Patient ID")
    assert not is_identifying_column("site") and not is_identifying_column("label")


def test_scan_of_a_copied_tree_is_path_independent(demo_data, tmp_path):
    """Copying the export elsewhere gives the same manifest (relative to the output)."""
    a = scan_dicom_dir(demo_data.dicom_dir, demo_data.labels_csv, salt="s", progress=False)
    shutil.copytree(demo_data.dicom_dir, tmp_path / "copy")
    b = scan_dicom_dir(tmp_path / "copy", demo_data.labels_csv, salt="s", progress=False)
    strip = lambda df, root: df.assign(image=[Path(p).relative_to(root) for p in df["image"]])  # noqa: E731
    pd.testing.assert_frame_equal(
        strip(a.manifest, demo_data.dicom_dir.resolve()),
        strip(b.manifest, (tmp_path / "copy").resolve()),
    )
