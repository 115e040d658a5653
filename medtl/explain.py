"""Grad-CAM heat maps over the images a model scored, for clinical review of what it looked at.

MONAI's ``GradCAM`` does the computation; medtl picks the target layer (the backbone's last
convolution, uniformly across families) and writes side-by-side PNGs: image | overlay.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.bundle import Bundle
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


def write_gradcam_pngs(
    bundle: Bundle,
    inputs: str | Path | Iterable[str],
    out_dir: str | Path,
    class_name: str | None = None,
    transform: Any = None,
) -> list[Path]:
    """One PNG per readable input (image | Grad-CAM overlay) for ``class_name``.

    ``inputs`` is what :func:`medtl.inference.predict` takes (manifest, folder, file or paths),
    in the same order, so ``<index>`` is the row of the prediction CSV. ``class_name`` defaults to the positive class for binary models and the predicted class
    otherwise. File names are ``<index>_<class>.png`` (never the input path, which may carry
    identifiers). Unreadable inputs are skipped here; ``predict`` already reports them.
    """
    from medtl.errors import look_up_option
    from medtl.inference import _VOLUME_PRESETS, _default_transform, _inputs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from monai.visualize import GradCAM

    tf = transform or _default_transform(bundle)
    model = bundle.model.cpu().eval()
    if class_name is not None:
        look_up_option(class_name, bundle.classes, "Grad-CAM class")
    cam_op = GradCAM(nn_module=model, target_layers=last_conv_layer(model))  # hooks: once
    written: list[Path] = []
    items = _inputs(inputs, bundle.cfg.transforms.preset in _VOLUME_PRESETS)
    for i, (_, path) in enumerate(items):
        try:
            x = torch.as_tensor(np.asarray(tf({"image": str(path)})["image"]))[None]
        except Exception:  # noqa: BLE001 - unreadable: listed by predict with its reason
            continue
        if class_name is not None:
            idx = bundle.classes.index(class_name)
        elif bundle.task == "binary":
            idx = 1
        else:
            with torch.no_grad():
                idx = int(model(x.float()).argmax(1))
        cam = gradcam_maps(model, x, idx, cam=cam_op)[0]
        dst = out / f"{i:05d}_{bundle.classes[idx]}.png"
        written.append(
            write_overlay_png(x[0].numpy(), cam, f"Grad-CAM: {bundle.classes[idx]}", dst)
        )
    return written


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
