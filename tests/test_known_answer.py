"""Known answers through the real ImageNet head: proves the default weights and their mapping
onto timm's tf_efficientnet_lite0 are the published ones (FACTS: cat 285 p~0.79, espresso 967)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from medtl.config import ModelConfig
from medtl.models import create_model


@pytest.fixture(scope="module")
def imagenet_lite0():
    cfg = ModelConfig(in_channels=3)  # the default backbone with its real weights
    return create_model(cfg, 1000, keep_pretrained_head=True).eval()


@pytest.mark.parametrize(
    ("image", "classes", "min_prob"),
    [(data.chelsea, range(281, 286), 0.6), (data.coffee, [967], 0.8)],
    ids=["chelsea_cat", "coffee_espresso"],
)
def test_lite0_known_answers(imagenet_lite0, image, classes, min_prob):
    pre = imagenet_lite0.preprocess
    x = resize(image(), pre.input_size, anti_aliasing=True).astype(np.float32)  # [0, 1]
    x = (x - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    with torch.no_grad():
        p = imagenet_lite0(torch.from_numpy(x).permute(2, 0, 1)[None]).softmax(1)[0]
    assert int(p.argmax()) in classes
    assert float(p.max()) > min_prob
