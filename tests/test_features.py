"""Feature cache: identical embeddings on reuse, invalidated when backbone, weights,
preprocessing or the image file change; never affected by augmentation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from fit_job import demo_split, tiny_config

from medtl.training.engine import Engine
from medtl.training.features import (
    FeatureCache,
    extract_features,
    feature_model_key,
    fit_logistic,
    image_file_key,
)
from medtl.training.strategies import get_strategy


@pytest.fixture(scope="module")
def split(demo_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = tiny_config(["strategy.name=feature_extraction", "transforms.augment=standard"], cache)
    train_ds, val_ds, classes = demo_split(demo_data.manifest_csv, cfg, cache)
    return cfg, train_ds, val_ds, classes


def _model(cfg):
    from medtl.models import create_model

    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, 2, spatial_dims=2)


def _engine(cfg, model, train_ds, val_ds, workdir):
    return Engine(cfg, model, train_ds, val_ds, get_strategy(cfg), workdir=workdir)


def test_cache_returns_identical_embeddings_without_recomputing(split, tmp_path):
    cfg, train_ds, val_ds, _ = split
    model = _model(cfg)
    eng = _engine(cfg, model, train_ds, val_ds, tmp_path)
    first = extract_features(eng, train_ds)
    assert first.shape == (len(train_ds), model.num_features)
    second = extract_features(eng, train_ds)
    np.testing.assert_array_equal(first, second)
    # The train set uses "standard" augmentation, yet features come from the deterministic
    # transforms: a fresh extraction (empty cache) gives the same numbers as the cached ones.
    cfg2 = cfg.model_copy(deep=True)
    cfg2.data.cache_dir = str(tmp_path / "fresh")
    fresh = extract_features(_engine(cfg2, model, train_ds, val_ds, tmp_path), train_ds)
    np.testing.assert_allclose(fresh, first, atol=1e-6)


def test_second_extraction_reads_the_cache(split, tmp_path):
    cfg, train_ds, val_ds, _ = split
    model = _model(cfg)
    seen = []
    orig = model.forward_features

    def counting(x):
        seen.append(x.shape[0])
        return orig(x)

    model.forward_features = counting
    eng = _engine(cfg, model, train_ds, val_ds, tmp_path)
    extract_features(eng, val_ds)
    assert sum(seen) == len(val_ds)
    extract_features(eng, val_ds)
    assert sum(seen) == len(val_ds)  # nothing recomputed


def test_key_changes_with_backbone_weights_and_preprocessing(split):
    cfg, *_ = split
    model = _model(cfg)
    k0 = feature_model_key(cfg, model, None)
    assert feature_model_key(cfg, model, None) == k0

    other_backbone = cfg.model_copy(deep=True)
    other_backbone.model.backbone = "resnet18"
    assert feature_model_key(other_backbone, model, None) != k0

    size = cfg.model_copy(deep=True)
    size.transforms.spatial_size = [64, 64]
    assert feature_model_key(size, model, None) != k0
    window = cfg.model_copy(deep=True)
    window.transforms.percentile_clip = [1.0, 99.0]
    assert feature_model_key(window, model, None) != k0
    # Augmentation never reaches cached features, so it must not split the cache.
    aug = cfg.model_copy(deep=True)
    aug.transforms.augment = "none"
    assert feature_model_key(aug, model, None) == k0

    with torch.no_grad():  # different weights (e.g. a new checkpoint with the same name)
        model.stage_groups()[1][1][0].add_(1e-3)
    assert feature_model_key(cfg, model, None) != k0
    model2 = _model(cfg)
    model2.weights_info = {**dict(model2.weights_info), "sha256": "0" * 64}
    assert feature_model_key(cfg, model2, None) != k0
    assert feature_model_key(cfg, _model(cfg), torch.bfloat16) != k0


def test_image_change_invalidates_its_entry(tmp_path):
    img = tmp_path / "a.dcm"
    img.write_bytes(b"x" * 10)
    cache = FeatureCache(tmp_path / "c", "k" * 64)
    cache.save(img, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(cache.load(img), np.arange(4))
    k = image_file_key(img)
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert image_file_key(img) != k and cache.load(img) is None
    assert FeatureCache(tmp_path / "c", "j" * 64).load(img) is None  # other model key


def test_two_slices_of_one_volume_are_two_entries(tmp_path):
    """2.5D: rows of one volume at different slices must not share an embedding."""
    vol = tmp_path / "ct.nii.gz"
    vol.write_bytes(b"x" * 10)
    cache = FeatureCache(tmp_path / "c", "k" * 64)
    cache.save(vol, np.zeros(4, np.float32), slice_index=3)
    cache.save(vol, np.ones(4, np.float32), slice_index=7)
    np.testing.assert_array_equal(cache.load(vol, slice_index=3), np.zeros(4))
    np.testing.assert_array_equal(cache.load(vol, slice_index=7), np.ones(4))
    assert cache.load(vol) is None


def test_logistic_head_equals_sklearn_probabilities():
    """The LR coefficients copied into a 2-column softmax head give sklearn's probabilities."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6)).astype(np.float32) * 3 + 1
    y = (x[:, 0] + rng.normal(size=80) > 1).astype(int)
    w, b = fit_logistic(x, y, "binary", 2, 1.0, False, 0)
    logits = x @ w.T + b
    p = torch.softmax(torch.from_numpy(logits), 1).numpy()
    z = (x - x.mean(0)) / (x - x.mean(0)).std()
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(z, y).predict_proba(z)
    np.testing.assert_allclose(p, ref, atol=1e-4)
    # multiclass: coefficients map one-to-one
    y3 = np.digitize(x[:, 0], [0, 2])
    w3, b3 = fit_logistic(x, y3, "multiclass", 3, 1.0, True, 0)
    ref3 = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(z, y3)
    np.testing.assert_allclose(
        torch.softmax(torch.from_numpy(x @ w3.T + b3), 1).numpy(), ref3.predict_proba(z), atol=1e-4
    )
