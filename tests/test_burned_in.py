"""Burned-in annotation: a DICOM whose header says BurnedInAnnotation (0028,0301) is YES may
show names in its pixels, which no header whitelist sees. Such images are left out with that
reason (training preparation, predict), so their pixels reach no cache, gallery, Grad-CAM
file or MLflow artifact, until the user opts in (data.burned_in_annotation=allow,
predict --allow-burned-in)."""

from __future__ import annotations

import pandas as pd
import pydicom
import pytest
import torch
from click.testing import CliRunner

from medtl.bundle import save_bundle
from medtl.config import build_config
from medtl.data import prepare_records
from medtl.errors import UnreadableImageError
from medtl.io import ReadPolicy, load_image
from medtl.models import create_model, get_backbone_spec
from medtl.transforms import build_transforms, read_policy

REASON = "BurnedInAnnotation (0028,0301) is YES"


@pytest.fixture(scope="module")
def images(demo_data, tmp_path_factory):
    """Three demo radiographs and a copy of the first whose header says burned-in: YES."""
    root = demo_data.manifest_csv.parent
    paths = [root / p for p in pd.read_csv(demo_data.manifest_csv)["image"].head(3)]
    ds = pydicom.dcmread(paths[0])
    ds.BurnedInAnnotation = "YES"
    burned = tmp_path_factory.mktemp("burned") / "burned_in.dcm"
    ds.save_as(burned)
    return [str(p) for p in paths], str(burned)


def test_reader_refuses_burned_in_unless_allowed(images):
    good, burned = images
    with pytest.raises(UnreadableImageError, match=r"BurnedInAnnotation \(0028,0301\) is YES"):
        load_image(burned)
    allowed = load_image(burned, policy=ReadPolicy(burned_in_annotation="allow"))
    assert allowed.array.shape == load_image(good[0]).array.shape


def test_training_preparation_quarantines_it_and_the_cache_never_holds_it(images, tmp_path):
    good, burned = images
    records = [{"image": p, "label": "normal", "patient_id": f"p{i}"} for i, p in enumerate(good)]
    records.append({"image": burned, "label": "normal", "patient_id": "p9"})
    spec = get_backbone_spec("resnet18").preprocess
    out = {}
    for mode in ("quarantine", "allow"):
        cfg = build_config(
            {}, ["transforms.spatial_size=[32,32]", f"data.burned_in_annotation={mode}"]
        )
        pair = build_transforms(cfg.transforms, spec, read_policy=read_policy(cfg.data))
        out[mode] = (pair.cache_key, prepare_records(records, pair, tmp_path, 0.5, False))
    key_q, refused = out["quarantine"]
    assert [q.path for q in refused.quarantine] == [burned]
    assert REASON in refused.quarantine[0].reason and "burned_in_annotation=allow" in (
        refused.quarantine[0].reason
    )
    assert len(refused.records) == 3
    key_a, allowed = out["allow"]
    assert allowed.quarantine == [] and len(allowed.records) == 4
    # A cache filled while such images were allowed is not the refusing run's cache.
    assert key_a != key_q


def test_predict_refuses_it_and_writes_no_gradcam_of_it_unless_allowed(images, tmp_path):
    from medtl.cli import main

    good, burned = images
    torch.manual_seed(0)
    cfg = build_config({}, ["transforms.spatial_size=[32,32]", "data.positive_class=nodule"])
    bundle = tmp_path / "bundle"
    save_bundle(bundle, create_model(cfg.model, 2), cfg, ["normal", "nodule"], "binary", 0.5)
    listing = tmp_path / "inputs.csv"
    pd.DataFrame({"image": [*good, burned]}).to_csv(listing, index=False)
    for flag, cams_expected in (([], 3), (["--allow-burned-in"], 4)):
        out, cams = tmp_path / f"preds{len(flag)}.csv", tmp_path / f"cams{len(flag)}"
        args = ["predict", "--model", str(bundle), str(listing), "--out", str(out)]
        res = CliRunner().invoke(
            main, [*args, "--gradcam", str(cams), "--allow-unapproved", "--device", "cpu", *flag]
        )
        assert res.exit_code == 0, res.output
        df = pd.read_csv(out)
        assert len(list(cams.iterdir())) == cams_expected
        last = df.iloc[-1]
        if flag:
            assert pd.isna(last["error"]) and 0 <= last["prob_nodule"] <= 1
        else:
            assert REASON in last["error"] and pd.isna(last["prob_nodule"])
            assert df["error"].head(3).isna().all()
