"""`medtl predict` behind its two guards: the approval gate (a rejected, unreviewed or
unregistered model is refused unless --allow-unapproved, and then every row says so) and the
intended-use guard (a CT slice sent to a chest radiograph model is flagged, and refused with
--strict), with provenance on every row. Real DICOM files, a real SQLite MLflow store."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tracking_helpers import tiny_cfg, tiny_factory, trained_tiny

from medtl.config import TrackingConfig
from medtl.errors import MedtlError
from medtl.intended_use import ImageFacts, build_profile, check_profile, read_image_facts

CT_FILE = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def write_radiograph(path: Path, rows: int = 48, cols: int = 40, seed: int = 0) -> Path:
    """A chest PA computed radiograph as a real DICOM file (no identifying values)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.random.default_rng(seed).integers(0, 4096, (rows, cols), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- pure: profile and check
def test_profile_records_what_training_saw_and_check_names_every_difference():
    cr = ImageFacts("CR", "CHEST", "PA", "MONOCHROME2", 48, 40, 1)
    dx = ImageFacts("DX", "CHEST", None, "MONOCHROME1", 64, 64, 1)
    profile = build_profile([cr, dx])
    assert profile["modality"] == ["CR", "DX"] and profile["view_position"] == ["PA", None]
    assert (profile["rows"], profile["columns"], profile["n_images"]) == ([48, 64], [40, 64], 2)
    assert check_profile(profile, ImageFacts("DX", "CHEST", None, "MONOCHROME2", 50, 50, 1)) is None
    ct = ImageFacts("CT", "CHEST", None, "MONOCHROME2", 512, 512, 1)
    assert check_profile(profile, ct) == (
        "modality CT not in training [CR, DX]; rows 512 outside training range 48-64; "
        "columns 512 outside training range 40-64"
    )
    # Not stated is a value like any other: in profile only if training images lacked it too.
    png = ImageFacts(None, None, None, "L", 48, 48, 1)
    assert "modality not stated not in training [CR, DX]" in check_profile(profile, png)


def test_facts_come_from_the_header_of_each_format(tmp_path):
    from PIL import Image

    cr = read_image_facts(write_radiograph(tmp_path / "cr.dcm", 48, 40))
    assert cr == ImageFacts("CR", "CHEST", "PA", "MONOCHROME2", 48, 40, 1)
    ct = read_image_facts(CT_FILE)
    assert (ct.modality, ct.rows, ct.columns) == ("CT", 128, 128)
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(tmp_path / "x.png")
    assert read_image_facts(tmp_path / "x.png") == ImageFacts(None, None, None, "L", 30, 20, 1)


# ---------------------------------------------------------------- against a SQLite store
@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """Chest radiographs, a CT slice, and a tiny model trained on radiographs, logged once."""
    from medtl.bundle import save_bundle
    from medtl.intended_use import training_profile
    from medtl.tracking.runs import TrainTracker

    root = tmp_path_factory.mktemp("gate")
    train = [write_radiograph(root / "train" / f"{i}.dcm", 48, 40 + 4 * i, i) for i in range(3)]
    inputs = root / "inputs"
    for i in range(2):
        write_radiograph(inputs / f"cr_{i}.dcm", 48, 44, 10 + i)
    (inputs / "ct_0.dcm").write_bytes(CT_FILE.read_bytes())
    tcfg = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="medtl-gate")
    cfg = tiny_cfg()
    cfg.tracking = tcfg
    profile = training_profile(train)
    bundle = save_bundle(
        root / "model", trained_tiny(), cfg, ["neg", "pos"], "binary", 0.5, input_profile=profile
    )
    bare = save_bundle(root / "bare_model", trained_tiny(), cfg, ["neg", "pos"], "binary", 0.5)
    tracker = TrainTracker(tcfg, cfg, {})
    tracker.start()
    tracker.log_model(bundle)
    tracker.end("FINISHED")
    return {"tcfg": tcfg, "run_id": tracker.parent_run_id, "inputs": inputs, "bundle": bundle,
            "bare": bare, "profile": profile}  # fmt: skip


def _predict(gate, ref, **kw):
    from medtl.inference import predict_for_use

    return predict_for_use(ref, gate["inputs"], tcfg=gate["tcfg"], model_factory=tiny_factory, **kw)


def test_approval_gate_refuses_unreviewed_rejected_and_unregistered_models(gate):
    from medtl.tracking.registry import approval_status, register, review

    tcfg = gate["tcfg"]
    register(gate["run_id"], "gate-cxr", tcfg)
    with pytest.raises(MedtlError, match="version 1 has not been reviewed.*--allow-unapproved"):
        _predict(gate, "models:/gate-cxr/1")
    review("gate-cxr", "1", "reject", "Dr Reject", "misses small nodules", tcfg)
    with pytest.raises(MedtlError, match="was rejected by Dr Reject .*misses small nodules"):
        _predict(gate, "models:/gate-cxr/1")
    with pytest.raises(MedtlError, match="is not a registered model version"):
        _predict(gate, gate["bundle"])
    # Allowed on request, and then every row says it was not approved.
    res = _predict(gate, "models:/gate-cxr/1", allow_unapproved=True)
    assert not res.provenance.approved and (res.rows["approved"] == False).all()  # noqa: E712
    local = _predict(gate, gate["bundle"], allow_unapproved=True).rows
    assert (local["model_name"] == "").all() and not local["approved"].any()

    register(gate["run_id"], "gate-cxr", tcfg)
    review("gate-cxr", "2", "approve", "Dr Approve", "", tcfg)
    res = _predict(gate, "models:/gate-cxr@approved")
    rows = res.rows
    assert res.provenance.approved and rows["approved"].all()
    assert set(rows["model_name"]) == {"gate-cxr"} and set(rows["model_version"]) == {"2"}
    assert set(rows["model_sha256"]) == {res.bundle.sha256} and len(res.bundle.sha256) == 64
    assert datetime.fromisoformat(rows["predicted_at"].iloc[0]).utcoffset().total_seconds() == 0
    assert rows["prob_pos"].notna().all()
    # The approval covers those bytes only.
    other = approval_status("gate-cxr", "2", "0" * 64, tcfg)
    assert not other.approved and "the bytes loaded are 0000" in other.reason


def test_intended_use_guard_flags_a_ct_slice_and_strict_refuses_it(gate):
    from medtl.tracking.registry import register, review

    register(gate["run_id"], "guard-cxr", gate["tcfg"])
    review("guard-cxr", "1", "approve", "Dr A", "", gate["tcfg"])
    flagged = _predict(gate, "models:/guard-cxr@approved").rows.set_index("image")
    assert flagged["out_of_profile"][["cr_0.dcm", "cr_1.dcm"]].isna().all()
    assert "modality CT not in training [CR]" in flagged["out_of_profile"]["ct_0.dcm"]
    assert flagged["prob_pos"].notna().all()  # flagged, still predicted

    res = _predict(gate, "models:/guard-cxr@approved", strict=True)
    strict = res.rows.set_index("image")
    assert (res.n_refused, res.n_out_of_profile) == (1, 1)
    assert np.isnan(strict.loc["ct_0.dcm", "prob_pos"]) and pd.isna(strict.loc["ct_0.dcm", "pred"])
    assert strict.loc["ct_0.dcm", "error"].startswith("refused (--strict)")
    assert strict.loc[["cr_0.dcm", "cr_1.dcm"], "prob_pos"].notna().all()
    np.testing.assert_allclose(
        strict.loc[["cr_0.dcm", "cr_1.dcm"], "prob_pos"],
        flagged.loc[["cr_0.dcm", "cr_1.dcm"], "prob_pos"],
    )
    with pytest.raises(MedtlError, match="--strict .* has none"):
        _predict(gate, gate["bare"], strict=True, allow_unapproved=True)


def test_predict_command_writes_provenance_and_refuses_in_one_line(gate, tmp_path, monkeypatch):
    import medtl.models
    from medtl.cli import main
    from medtl.tracking.registry import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", gate["tcfg"].uri)
    monkeypatch.setattr(medtl.models, "create_model", tiny_factory)  # the bundles hold TinyNet
    register(gate["run_id"], "cli-gate", gate["tcfg"])
    runner = CliRunner()
    out = tmp_path / "preds.csv"
    args = ["predict", "--model", "models:/cli-gate/1", str(gate["inputs"]), "--out", str(out)]
    refused = runner.invoke(main, args)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "has not been reviewed" in refused.stderr and not out.exists()

    res = runner.invoke(main, [*args, "--allow-unapproved", "--strict"])
    assert res.exit_code == 0, res.output
    assert "1 outside the intended-use profile, refused" in res.stdout
    assert "warning: not approved" in res.stderr
    df = pd.read_csv(out)
    assert list(df.columns[-6:]) == [
        "out_of_profile", "model_name", "model_version", "model_sha256", "approved",
        "predicted_at",
    ]  # fmt: skip
    assert not df["approved"].any() and (df["model_version"] == 1).all()
    assert df.loc[df["image"] == "ct_0.dcm", "error"].str.startswith("refused").all()
