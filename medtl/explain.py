"""Grad-CAM heat maps over the images a model scored, for clinical review of what it looked at.

MONAI's ``GradCAM`` does the computation; medtl picks the target layer (the backbone's last
convolution, uniformly across families) and writes side-by-side PNGs: image | overlay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.errors import ConfigError


def last_conv_layer(model: nn.Module) -> str:
    """Name of the last 2D convolution in ``model.backbone`` (the usual Grad-CAM target)."""
    name = None
    for n, m in model.named_modules():
        if n.startswith("backbone") and isinstance(m, nn.Conv2d):
            name = n
    if name is None:
        raise ConfigError("Grad-CAM needs a 2D convolutional backbone; none found in this model")
    return name


def gradcam_maps(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int,
    layer: str | None = None,
    cam: Any = None,
) -> np.ndarray:
    """Grad-CAM maps ``(B, H, W)`` in [0, 1] for ``class_index``, at the input resolution.

    Pass ``cam`` (a MONAI ``GradCAM`` on ``model``) when calling in a loop: each new GradCAM
    registers its own hooks on the target layer, and they are never removed.
    """
    from monai.visualize import GradCAM

    if images.ndim != 4:
        raise ConfigError("Grad-CAM overlays are for 2D models (transforms.preset cxr_2d/ct_2p5d)")
    model.eval()
    if cam is None:
        cam = GradCAM(nn_module=model, target_layers=layer or last_conv_layer(model))
    with torch.enable_grad():
        maps = cam(x=images.float(), class_idx=class_index)
    return maps[:, 0].detach().cpu().numpy()


def _display(image: np.ndarray) -> np.ndarray:
    """First channel stretched to [0, 1] for display (the network input is normalised)."""
    img = image[0].astype(np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def write_overlay_png(image: np.ndarray, cam: np.ndarray, title: str, dst: str | Path) -> Path:
    """One PNG: the ``(C, H, W)`` network input | the same with the ``(H, W)`` map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = _display(image)
    fig, axes = plt.subplots(1, 2, figsize=(6, 3), dpi=100)
    for ax in axes:
        ax.imshow(img, cmap="gray")
        ax.axis("off")
    axes[1].imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    axes[1].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(dst)
    plt.close(fig)
    return Path(dst)
