"""Leakage guards: test patients never get a CV fold, copies of an image (re-encoded ones
too) are found, and `medtl evaluate` refuses data the model was trained on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import RLELossless

from medtl.config import CVConfig, PipelineConfig
from medtl.cv import make_splits
from medtl.errors import ManifestError
from medtl.evaluation.leakage import check_overlap, training_fingerprint
from medtl.io import PIXEL_HASH_KEY, load_image, pixel_sha256
from medtl.manifest import read_manifest, validate_manifest

SALT = "test-salt-not-secret"  # what tests/conftest.py sets as MEDTL_PSEUDONYM_SALT


@pytest.fixture(scope="module")
def demo(demo_data):
    """The demo training and held-out manifests with absolute image paths."""
    tables = []
    for csv in (demo_data.manifest_csv, demo_data.holdout_manifest_csv):
        df = pd.read_csv(csv, dtype=str)
        df["image"] = [str(demo_data.root / p) for p in df["image"]]
        tables.append(df)
    return tables[0], tables[1]


def _rle_copy(src: str, dst: Path) -> Path:
    """The same pixels in another transfer syntax (RLE Lossless): other bytes, same image."""
    ds = pydicom.dcmread(src)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.compress(RLELossless)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    assert dst.read_bytes() != Path(src).read_bytes()
    return dst


def _records(df: pd.DataFrame) -> list[dict]:
    return [
        {"image": p, "patient_id": q} for p, q in zip(df["image"], df["patient_id"], strict=True)
    ]


# ------------------------------------------------------------------------- split vs fold
def test_test_patient_with_a_cv_fold_is_an_error(demo):
    df, _ = demo
    patients = sorted(df["patient_id"].unique())
    df = df.assign(
        fold=df["patient_id"].map({p: i % 3 for i, p in enumerate(patients)}), split="train"
    )
    victim = patients[4]
    df.loc[df["patient_id"] == victim, "split"] = "test"
    with pytest.raises(ManifestError, match=rf"1 patient\(s\) held out as test.*'{victim}'") as e:
        make_splits(df, CVConfig(folds=3))
    assert "-1" in str(e.value)  # says how to fix it

    # Fixed as the message says: the patient is held out, and a fold -1 patient is too.
    df.loc[df["patient_id"] == victim, "fold"] = -1
    other = patients[7]
    df.loc[df["patient_id"] == other, "fold"] = -1
    out = make_splits(df, CVConfig(folds=3))
    held = set(out.loc[out["split"] == "test", "patient_id"])
    assert held == {victim, other}
    assert (out.loc[out["split"] == "test", "fold"] == -1).all()


# ------------------------------------------------------------------------- manifest validate
def test_deep_validation_finds_copies_by_pixels(demo, tmp_path):
    df, _ = demo
    rows = df.iloc[:3].copy()
    src, owner = rows["image"].iat[0], rows["patient_id"].iat[0]
    # A re-encoded copy under another patient: a leak between folds.
    leak = _rle_copy(src, tmp_path / "other_site" / "IM0001.dcm")
    # The same file at a second path of its own patient: a duplicate.
    dup_src, dup_owner = rows["image"].iat[1], rows["patient_id"].iat[1]
    dup = tmp_path / "again" / "IM0002.dcm"
    dup.parent.mkdir()
    dup.write_bytes(Path(dup_src).read_bytes())
    extra = pd.DataFrame(
        [
            {**rows.iloc[0].to_dict(), "image": str(leak), "patient_id": "P-0ther0000001"},
            {**rows.iloc[1].to_dict(), "image": str(dup)},
        ]
    )
    csv = tmp_path / "manifest.csv"
    pd.concat([rows, extra]).to_csv(csv, index=False)

    report = validate_manifest(read_manifest(csv), deep=True)
    across = [e for e in report.errors if e.code == "same_pixels_across_patients"]
    assert len(across) == 1, report.errors
    msg = across[0].message
    assert owner in msg and "P-0ther0000001" in msg and str(leak) in msg and src in msg
    assert msg.startswith("1 image(s)") and "2 patients" in msg
    assert across[0].rows == (0, 3)
    within = [w for w in report.warnings if w.code == "same_pixels_same_patient"]
    assert len(within) == 1 and within[0].rows == (1, 4)
    assert dup_owner in within[0].message and str(dup) in within[0].message
    # Without --deep nothing is decoded, so nothing of this is reported.
    assert (
        not {"same_pixels_across_patients", "same_pixels_same_patient"}
        & validate_manifest(read_manifest(csv)).codes()
    )


# ------------------------------------------------------------------------- fingerprints
def test_fingerprint_holds_no_identifiers_and_finds_overlap(demo, tmp_path):
    df, holdout = demo
    train = df.iloc[:12]
    records = _records(train)
    # Half the records carry the hash the cached transforms give; the rest are decoded.
    for rec in records[::2]:
        rec[PIXEL_HASH_KEY] = pixel_sha256(load_image(rec["image"]))
    fp = training_fingerprint(records, SALT)
    text = json.dumps(fp)
    for rec in records:
        assert rec["patient_id"] not in text
        assert rec["patient_id"].removeprefix("P-") not in text
        assert Path(rec["image"]).name not in text and str(Path(rec["image"]).parent) not in text
    assert fp["n_patients"] == train["patient_id"].nunique() and fp["n_unhashed"] == 0
    raw = {pixel_sha256(load_image(r["image"])) for r in records}
    assert not raw & set(fp["image_hashes"]) and not any(h in text for h in raw)

    copy = _rle_copy(train["image"].iat[5], tmp_path / "copy.dcm")
    evaluation = [
        {"image": holdout["image"].iat[0], "patient_id": train["patient_id"].iat[0]},  # patient
        {"image": str(copy), "patient_id": "P-new000000001"},  # re-encoded training image
        {"image": holdout["image"].iat[1], "patient_id": holdout["patient_id"].iat[1]},
    ]
    rep = check_overlap(fp, evaluation, SALT)
    assert rep.patients_compared and rep.shared_patients == 1 and rep.shared_images == 1
    assert rep.shared_patient_ids == (train["patient_id"].iat[0],) and rep.shared_rows == (1,)
    assert rep.overlaps and rep.images_compared == 3 and rep.n_patients == 3

    other = check_overlap(fp, evaluation, "another-sites-salt")
    assert not other.patients_compared and other.shared_patients == 0
    assert "salt differs" in (other.note or "") and other.shared_images == 1
    assert other.summary()["shared_patients"] is None

    unsalted = training_fingerprint(records, None)
    assert unsalted["patient_hashes"] is None and unsalted["image_nonce"] != fp["image_nonce"]
    assert check_overlap(unsalted, evaluation, SALT).shared_images == 1


def test_cached_transforms_carry_the_pixel_hash(demo, tmp_path, monkeypatch):
    from medtl.config import TransformConfig
    from medtl.data import build_dataset, make_loader, prepare_records
    from medtl.models import get_backbone_spec
    from medtl.transforms import build_transforms

    df, _ = demo
    records = [{**r, "label": i % 2} for i, r in enumerate(_records(df.iloc[:4]))]
    preprocess = get_backbone_spec("tf_efficientnet_lite0").preprocess
    pair = build_transforms(TransformConfig(spatial_size=[32, 32]), preprocess, 1, "fold_sum")
    first = prepare_records(records, pair, tmp_path, 0.0, progress=False)
    want = [pixel_sha256(load_image(r["image"])) for r in records]
    assert [r[PIXEL_HASH_KEY] for r in first.records] == want
    assert PIXEL_HASH_KEY not in records[0]  # the caller's records are not changed

    def no_decode(*args, **kwargs):
        raise AssertionError("a cache hit must not decode the image")

    monkeypatch.setattr("medtl.io.load_image", no_decode)
    again = prepare_records(records, pair, tmp_path, 0.0, progress=False)
    assert [r[PIXEL_HASH_KEY] for r in again.records] == want
    # The extra string key never reaches a batch: training sees image, label, index only.
    batch = next(iter(make_loader(build_dataset(again.records, pair, tmp_path), 4, num_workers=0)))
    assert set(batch) == {"image", "label", "index"} and batch["image"].shape == (
        4,
        pair.out_channels,
        32,
        32,
    )


# ------------------------------------------------------------------------- medtl evaluate
@pytest.fixture(scope="module")
def eval_setup(demo, tmp_path_factory):
    """A small (untrained) bundle with the fingerprint of 12 training images, and an
    evaluation manifest of the held-out set plus one training image of a training patient."""
    from medtl.bundle import save_bundle
    from medtl.models import create_model

    df, holdout = demo
    work = tmp_path_factory.mktemp("leak_eval")
    cfg = PipelineConfig.model_validate(
        {
            "transforms": {"spatial_size": [64, 64]},
            "evaluation": {"bootstrap": 10, "gallery_per_cell": 0, "subgroups": []},
            "data": {"classes": ["normal", "nodule"], "task": "binary"},
        }
    )
    model = create_model(cfg.model, 2, pretrained=False)
    train = df.iloc[:12]
    fp = training_fingerprint(_records(train), SALT)
    bundles = {}
    for name, training_set in (("with", fp), ("without", None)):
        bundles[name] = save_bundle(
            work / name, model, cfg, ["normal", "nodule"], "binary", 0.5, training_set=training_set
        )
    manifest = pd.concat([holdout, train.iloc[[0]]], ignore_index=True)
    csv = work / "evaluation.csv"
    manifest.to_csv(csv, index=False)
    return bundles, csv, train


def test_evaluate_refuses_a_manifest_overlapping_the_training_set(eval_setup, tmp_path):
    from medtl.evaluation.heldout import evaluate_model

    bundles, csv, train = eval_setup
    with pytest.raises(ManifestError, match=r"shares 1 patient\(s\).* and 1 image\(s\)") as e:
        evaluate_model(str(bundles["with"]), csv, tmp_path / "refused")
    assert train["patient_id"].iat[0] in str(e.value) and "--allow-overlap" in str(e.value)
    assert not (tmp_path / "refused").exists()

    paths = evaluate_model(str(bundles["with"]), csv, tmp_path / "allowed", allow_overlap=True)
    report = paths.markdown.read_text()
    assert "evaluated anyway (--allow-overlap)" in report
    assert "1 of 9 patient(s), 1 of 21 image(s)" in report
    assert "| patients shared with training | 1 |" in report
    assert "| images shared with training | 1 |" in report
    assert len(pd.read_csv(paths.predictions)) == 21


def test_evaluate_with_another_salt_compares_images_only(eval_setup, tmp_path, monkeypatch):
    from medtl.evaluation.heldout import evaluate_model

    bundles, csv, train = eval_setup
    monkeypatch.setenv("MEDTL_PSEUDONYM_SALT", "another-sites-salt")
    with pytest.raises(ManifestError, match=r"shares 1 image\(s\).*patients not compared") as e:
        evaluate_model(str(bundles["with"]), csv, tmp_path / "refused")
    assert "salt differs" in str(e.value) and train["patient_id"].iat[0] not in str(e.value)


def test_evaluate_with_an_old_bundle_warns_that_it_could_not_check(eval_setup, tmp_path, caplog):
    from medtl.evaluation.heldout import evaluate_model

    bundles, csv, _ = eval_setup
    with caplog.at_level(logging.WARNING, logger="medtl.evaluation.heldout"):
        paths = evaluate_model(str(bundles["without"]), csv, tmp_path / "old")
    assert any("no training-set fingerprint" in r.getMessage() for r in caplog.records)
    assert "not checked" in paths.markdown.read_text()
    assert np.isfinite(pd.read_csv(paths.predictions)["prob_nodule"]).all()


def test_cli_evaluate_refuses_overlap_in_one_line(eval_setup, tmp_path):
    from click.testing import CliRunner

    from medtl.cli import main

    bundles, csv, _ = eval_setup
    args = ["evaluate", "--model", str(bundles["with"]), "--manifest", str(csv)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "--allow-overlap" in result.output
    assert "shares 1 patient(s)" in result.output and not (tmp_path / "cli").exists()
    assert "--allow-overlap" in CliRunner().invoke(main, ["evaluate", "--help"]).output
