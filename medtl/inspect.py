"""The API behind ``medtl inspect``: what the pipeline reads from one image, and a preview.

Everything reported comes from ``ImageMeta`` (a whitelist) and the pixel values, so the
output never holds names, IDs, dates or UIDs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medtl.io import LoadedImage, load_image, reorient

#: Percentiles reported by ``inspect_path`` and used for the preview stretch.
PERCENTILES = (0.5, 1.0, 50.0, 99.0, 99.5)
_PREVIEW_STRETCH = (0.5, 99.5)
# Radiological display: rows run anterior->posterior, columns patient right->left.
_DISPLAY_AXES = "SPL"


def inspect_path(path: str | Path, image: LoadedImage | None = None) -> dict:
    """Describe an image file or DICOM series folder as a JSON-safe dict.

    Keys: format, shape (channel-first), dtype (as stored), spatial_dims, spacing,
    orientation (axis codes, 3D with geometry), modality, photometric_interpretation,
    n_frames, transfer_syntax, bits_stored, rescale_applied, window_center/width,
    min, max, mean, p<q> percentiles.

    ``image`` is ``path`` already loaded (the CLI reuses it for the preview).

    Raises:
        UnreadableImageError: the path cannot be read.
    """
    image = image if image is not None else load_image(path)
    meta = image.meta
    arr = image.array
    info: dict = {
        "path": str(path),
        "format": meta.format,
        "shape": list(meta.shape),
        "dtype": meta.stored_dtype,
        "spatial_dims": meta.spatial_dims,
        "spacing": [round(s, 6) for s in meta.spacing],
        "orientation": _axcodes(meta.affine_array),
        "modality": meta.modality,
        "photometric_interpretation": meta.photometric_interpretation,
        "n_frames": meta.n_frames,
        "transfer_syntax": meta.transfer_syntax,
        "bits_stored": meta.bits_stored,
        "rescale_applied": meta.rescale_applied,
        "window_center": meta.window_center,
        "window_width": meta.window_width,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "mean": float(arr.mean(dtype=np.float64)),
    }
    for q, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True):
        info[f"p{q:g}"] = float(v)
    return info


def write_preview(source: str | Path | LoadedImage, out_png: str | Path) -> Path:
    """Write an 8-bit PNG preview: middle slice for 3D; the file's window, else a stretch.

    Volumes with an affine are shown as radiological axial slices; frame stacks show
    their middle frame. Grey uses the file's VOI window when it has one, else the
    0.5-99.5 percentile range; colour keeps RGB. Returns the written path.
    """
    image = source if isinstance(source, LoadedImage) else load_image(source)
    if image.meta.spatial_dims == 3:
        if image.meta.affine is not None:
            image = reorient(image, _DISPLAY_AXES)
        plane = image.array[:, image.array.shape[1] // 2]
    else:
        plane = image.array
    if plane.shape[0] == 3:
        lo, hi = _stretch(plane, image.meta.bits_stored)
        rgb = np.moveaxis(_to_uint8(plane, lo, hi), 0, -1)
        pil = Image.fromarray(np.ascontiguousarray(rgb))
    else:
        grey = plane[0]
        center, width = image.meta.window_center, image.meta.window_width
        if center is not None and width is not None and width > 0:
            lo, hi = center - width / 2.0, center + width / 2.0
        else:
            lo, hi = (float(v) for v in np.percentile(grey, _PREVIEW_STRETCH))
        pil = Image.fromarray(_to_uint8(grey, lo, hi))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    pil.save(out, format="PNG")
    return out


def _stretch(plane: np.ndarray, bits_stored: int | None) -> tuple[float, float]:
    if bits_stored and float(plane.min()) >= 0:
        return 0.0, float(2**bits_stored - 1)
    lo, hi = np.percentile(plane, _PREVIEW_STRETCH)
    return float(lo), float(hi)


def _to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((arr - lo) * scale, 0, 255).round().astype(np.uint8)


def _axcodes(affine: np.ndarray | None) -> str | None:
    if affine is None:
        return None
    import nibabel as nib

    return "".join(c or "?" for c in nib.aff2axcodes(affine))
