"""Grad-CAM overlays: real model, real demo files, maps at input resolution, PNGs written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from medtl.bundle import load_bundle, save_bundle
from medtl.config import build_config
from medtl.explain import gradcam_maps, last_conv_layer
from medtl.inference import write_gradcam_pngs
from medtl.models import create_model


def test_gradcam_overlays_for_demo_images(demo_data, tmp_path):
    # Seeded: with an untrained random head a class's map can be all zero (ReLU), by chance.
    torch.manual_seed(0)
    cfg = build_config({}, ["transforms.spatial_size=[64,64]", "data.positive_class=nodule"])
    model = create_model(cfg.model, 2)
    save_bundle(tmp_path / "bundle", model, cfg, ["normal", "nodule"], "binary", 0.5)
    bundle = load_bundle(tmp_path / "bundle")
    assert last_conv_layer(bundle.model).startswith("backbone.")

    manifest = pd.read_csv(demo_data.manifest_csv).head(3)
    paths = [str(demo_data.manifest_csv.parent / p) for p in manifest["image"]]
    pngs = write_gradcam_pngs(bundle, paths + [str(tmp_path / "missing.dcm")], tmp_path / "cam")
    assert [p.name for p in pngs] == ["00000_nodule.png", "00001_nodule.png", "00002_nodule.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)

    x = torch.randn(2, bundle.model.in_chans, 64, 64)
    maps = gradcam_maps(bundle.model, x, class_index=1)
    assert maps.shape == (2, 64, 64)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert maps.std() > 0  # not a constant map
