"""The batched prediction pass (`medtl predict/evaluate --device --batch-size`): decoded through
the crash-isolated pool, batched, the same probabilities as the serial in-process reference
path on the CPU, Grad-CAM from the same pass, bad inputs listed without stopping the run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from medtl.bundle import load_bundle, save_bundle
from medtl.config import build_config
from medtl.models import create_model


@pytest.fixture(scope="module")
def demo_bundle(demo_data, tmp_path_factory):
    """The default backbone with its real ImageNet weights and a seeded head, no calibrator."""
    torch.manual_seed(0)
    cfg = build_config({}, ["transforms.spatial_size=[64,64]", "data.positive_class=nodule"])
    path = tmp_path_factory.mktemp("pass") / "bundle"
    save_bundle(path, create_model(cfg.model, 2), cfg, ["normal", "nodule"], "binary", 0.5)
    return path


@pytest.fixture(scope="module")
def inputs(demo_data, tmp_path_factory):
    """Twelve demo radiographs (several transfer syntaxes), a corrupt file and a missing one."""
    root = demo_data.manifest_csv.parent
    df = pd.read_csv(demo_data.manifest_csv).head(12)[["image"]]
    bad = tmp_path_factory.mktemp("bad") / "corrupt.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 20)
    paths = [str(root / p) for p in df["image"]] + [str(bad), str(root / "missing.dcm")]
    return paths


def test_pool_pass_matches_the_serial_reference_on_cpu(demo_bundle, inputs):
    from medtl.inference import predict, predict_serial

    bundle = load_bundle(demo_bundle)
    ref = predict_serial(bundle, inputs)
    for workers, batch in ((2, 5), (0, 32)):
        got = predict(bundle, inputs, device="cpu", workers=workers, batch_size=batch)
        assert list(got["image"]) == list(ref["image"])
        p, q = got[["prob_normal", "prob_nodule"]], ref[["prob_normal", "prob_nodule"]]
        assert p.notna().sum().sum() == 24  # 12 readable images predicted
        np.testing.assert_allclose(p.to_numpy(), q.to_numpy(), atol=1e-5, equal_nan=True)
        assert got["pred"].tolist() == ref["pred"].tolist()
        errors = got["error"]
        assert errors[:12].isna().all() and isinstance(errors[12], str)
        assert "FileNotFoundError" in errors[13]


def test_predict_cli_device_batch_size_and_gradcam_in_one_pass(demo_bundle, inputs, tmp_path):
    from medtl.cli import main
    from medtl.inference import predict_serial

    listing = tmp_path / "inputs.csv"
    pd.DataFrame({"image": inputs}).to_csv(listing, index=False)
    out, cams = tmp_path / "preds.csv", tmp_path / "cams"
    args = ["predict", "--model", str(demo_bundle), str(listing), "--out", str(out)]
    res = CliRunner().invoke(
        main,
        [
            *args,
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--gradcam",
            str(cams),
            "--allow-unapproved",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "12 Grad-CAM overlays" in res.output and "2 unreadable" in res.output
    df = pd.read_csv(out)
    ref = predict_serial(load_bundle(demo_bundle), inputs)
    np.testing.assert_allclose(df["prob_nodule"], ref["prob_nodule"], atol=1e-5, equal_nan=True)
    assert sorted(p.name for p in cams.iterdir()) == [f"{i:05d}_nodule.png" for i in range(12)]

    bad = CliRunner().invoke(main, [*args, "--device", "tpu", "--allow-unapproved"])
    assert bad.exit_code != 0 and "--device 'tpu'" in bad.output and "Traceback" not in bad.output
    if not torch.cuda.is_available():
        gpu = CliRunner().invoke(main, [*args, "--device", "cuda", "--allow-unapproved"])
        assert gpu.exit_code != 0 and "no GPU is visible" in gpu.output
