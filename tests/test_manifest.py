"""Manifest reading, validation (fast and deep) and the content hash, on real demo files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from medtl.errors import ConfigError, ManifestError
from medtl.manifest import (
    Manifest,
    manifest_content_hash,
    read_manifest,
    render_summary,
    validate_manifest,
    write_manifest,
)


@pytest.fixture
def small(demo_data, tmp_path) -> Path:
    """Eight demo images copied into tmp_path (safe to change) with a manifest beside them."""
    m = pd.read_csv(demo_data.manifest_csv, dtype=str)
    # Both classes, several patients, one patient with two images.
    rows = pd.concat([m[m["label"] == "nodule"].head(3), m[m["label"] == "normal"].head(5)])
    for image in rows["image"]:
        dst = tmp_path / image
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_data.root / image, dst)
    write_manifest(rows, tmp_path / "m.csv")
    return tmp_path / "m.csv"


def _edit(path: Path, fn) -> Path:
    df = pd.read_csv(path, dtype=str)
    out = path.with_name("edited.csv")
    fn(df).to_csv(out, index=False)
    return out


def test_read_resolves_paths_and_keeps_extra_columns(demo_data):
    m = read_manifest(demo_data.manifest_csv)
    assert isinstance(m, Manifest)
    assert m.root == demo_data.root.resolve()
    assert {"image", "label", "patient_id", "site", "sex", "path"} <= set(m.df.columns)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in m.df["path"])
    report = validate_manifest(m)
    assert report.ok, report.errors
    s = report.summary
    assert s["patients"] == 40 and s["images"] == len(m.df)
    assert set(s["class_counts"]) == {"normal", "nodule"}
    assert set(s["sites"]) == {"site_a", "site_b"}
    assert s["images_per_patient"]["min"] >= 1 and s["images_per_patient"]["max"] <= 4
    assert report.to_dict()["ok"] is True
    assert render_summary(report).row_count >= 6


def test_missing_column_is_named_with_the_columns_present(tmp_path):
    p = tmp_path / "m.csv"
    pd.DataFrame({"image": ["a.dcm"], "diagnosis": ["x"], "patient_id": ["1"]}).to_csv(p)
    with pytest.raises(ManifestError, match="no column 'label'.*diagnosis"):
        read_manifest(p)
    assert read_manifest(p, label_column="diagnosis").label_column == "diagnosis"
    m = read_manifest(p, require_label=False)
    assert "label" not in m.df.columns
    with pytest.raises(ManifestError, match="unknown suffix"):
        read_manifest(p.rename(tmp_path / "m.xlsx"))


def test_ids_stay_text_and_parquet_round_trip(tmp_path):
    df = pd.DataFrame({"image": ["a.png"], "label": ["1"], "patient_id": ["007"], "fold": [2]})
    write_manifest(df, tmp_path / "m.csv")
    write_manifest(df, tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        m = read_manifest(tmp_path / name)
        assert m.df["patient_id"].iat[0] == "007" and m.df["label"].iat[0] == "1"
        assert int(m.df["fold"].iat[0]) == 2
    assert manifest_content_hash(
        read_manifest(tmp_path / "m.csv"), include_files=False
    ) == manifest_content_hash(read_manifest(tmp_path / "m.parquet"), include_files=False)
    with pytest.raises(ConfigError, match="manifest suffix"):
        write_manifest(df, tmp_path / "m.xlsx")


def test_validate_catches_missing_unknown_duplicate_and_conflict(small):
    clean = validate_manifest(read_manifest(small), classes=["normal", "nodule"])
    assert clean.ok and "patient_label_conflict" not in clean.codes()

    def corrupt(df):
        df.loc[0, "image"] = "dicom/nowhere/IM9999"  # missing file
        df.loc[1, "label"] = "pneumonia"  # unknown label
        df = pd.concat([df, df.iloc[[2]]])  # duplicate row
        df.loc[df.index[3], "patient_id"] = df["patient_id"].iloc[2]  # two labels, one patient
        df.iloc[3, df.columns.get_loc("label")] = "normal"
        df.iloc[2, df.columns.get_loc("label")] = "nodule"
        return df

    report = validate_manifest(read_manifest(_edit(small, corrupt)), classes=["normal", "nodule"])
    assert not report.ok
    errors = {e.code: e for e in report.errors}
    assert {"missing_file", "unknown_label", "duplicate"} <= set(errors)
    assert "IM9999" in str(errors["missing_file"]) and errors["missing_file"].rows == (0,)
    assert "'pneumonia'" in str(errors["unknown_label"]) and "line 3" in str(
        errors["unknown_label"]
    )
    assert "listed more than once" in str(errors["duplicate"])
    assert "patient_label_conflict" in {w.code for w in report.warnings}
    # Without classes, an unknown label is no error.
    assert "unknown_label" not in validate_manifest(read_manifest(_edit(small, corrupt))).codes()


def test_validate_empty_and_blank_cells(small, tmp_path):
    empty = _edit(small, lambda df: df.iloc[0:0])
    report = validate_manifest(read_manifest(empty))
    assert [e.code for e in report.errors] == ["empty"]

    def blank(df):
        df.loc[0, "label"] = None
        df.loc[1, "patient_id"] = " "
        return df

    codes = validate_manifest(read_manifest(_edit(small, blank))).codes()
    assert {"missing_label", "missing_patient"} <= codes


def test_validate_patient_leakage_across_folds_and_rare_class(small):
    def folds(df):
        df["fold"] = range(len(df))
        df.loc[df.index[1], "patient_id"] = df["patient_id"].iloc[0]
        return df

    report = validate_manifest(read_manifest(_edit(small, folds)))
    assert "patient_in_several_folds" in {e.code for e in report.errors}
    # 3 nodule patients < 5 folds' worth.
    rare = [w for w in report.warnings if w.code == "rare_class"]
    assert rare and "'nodule'" in str(rare[0])


def test_deep_mode_names_a_truncated_dicom(small):
    m = read_manifest(small)
    assert validate_manifest(m, deep=True).ok
    victim = Path(m.df["path"].iat[4])
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    fast = validate_manifest(m)
    assert fast.ok  # headers are intact: only decoding finds it
    deep = validate_manifest(read_manifest(small), deep=True)
    errors = [e for e in deep.errors if e.code == "unreadable"]
    assert errors and errors[0].rows == (4,)
    assert m.df["image"].iat[4] in str(errors[0])


def test_content_hash_follows_bytes_and_labels_only(small):
    m = read_manifest(small)
    h0 = manifest_content_hash(m)
    assert len(h0) == 64 and h0 == manifest_content_hash(read_manifest(small))
    # Row order and the manifest's location do not matter.
    shuffled = _edit(small, lambda df: df.iloc[::-1])
    assert manifest_content_hash(read_manifest(shuffled)) == h0
    # A label change does.
    assert m.df["label"].iat[0] == "nodule"
    relabel = _edit(small, lambda df: df.assign(label=df["label"].where(df.index != 0, "normal")))
    assert manifest_content_hash(read_manifest(relabel)) != h0
    # One changed byte in one file does.
    victim = Path(m.df["path"].iat[0])
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    h1 = manifest_content_hash(m)
    assert h1 != h0
    assert manifest_content_hash(m, include_files=False) == manifest_content_hash(
        read_manifest(small), include_files=False
    )
    assert validate_manifest(m).content_hash == h1


def test_content_hash_of_a_series_folder(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(3):
        (folder / f"s{k}").write_bytes(bytes([k]) * 10)
    df = pd.DataFrame({"image": ["series"], "label": ["a"], "patient_id": ["p"]})
    write_manifest(df, tmp_path / "m.csv")
    h0 = manifest_content_hash(read_manifest(tmp_path / "m.csv"))
    (folder / "s1").write_bytes(b"changed")
    assert manifest_content_hash(read_manifest(tmp_path / "m.csv")) != h0
