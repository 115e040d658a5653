"""PNG and JPEG exports through Pillow -> ``(C, rows, cols)`` float32.

Grey stays one channel (8- or 16-bit values kept as they are), colour becomes RGB: alpha
is dropped, palette and CMYK images are converted to RGB by Pillow. No spacing is stored
in these formats, so spacing is 1.0 and ``affine`` is None.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medtl.errors import UnreadableImageError
from medtl.io.base import DEFAULT_POLICY, ImageMeta, LoadedImage, ReadPolicy
from medtl.io.contract import check_pixel_budget, reader

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@reader
def load_png_jpeg(path: str | Path, policy: ReadPolicy = DEFAULT_POLICY) -> LoadedImage:
    """Load a PNG or JPEG file (8/16-bit grey, RGB, RGBA, palette).

    Raises:
        UnreadableImageError: not an image Pillow can decode, or a truncated file.
    """
    p = Path(path)
    if not p.is_file():
        raise UnreadableImageError(path, "file not found")
    try:
        with Image.open(p) as img:
            fmt = img.format or p.suffix.lstrip(".").upper()
            if fmt not in ("PNG", "JPEG", "MPO"):
                raise UnreadableImageError(path, f"{fmt} files are not read; use PNG or JPEG")
            mode = img.mode
            bands = len(img.getbands())
            check_pixel_budget(path, (img.height, img.width, bands), policy, f"{fmt} header")
            img.load()
            arr = _to_array(img)
    except UnreadableImageError:
        raise
    except UnidentifiedImageError as err:
        raise UnreadableImageError(path, "not a PNG/JPEG image Pillow can identify") from err
    except (OSError, ValueError, SyntaxError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableImageError(path, f"cannot decode image ({first[:150]})") from err
    stored_dtype = str(arr.dtype.newbyteorder("="))
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    else:
        arr = np.moveaxis(arr, -1, 0)
    array = np.ascontiguousarray(arr, dtype=np.float32)
    meta = ImageMeta(
        source=str(path),
        format="JPEG" if fmt == "MPO" else fmt,
        spatial_dims=2,
        shape=tuple(int(s) for s in array.shape),
        spacing=(1.0, 1.0),
        photometric_interpretation=mode,  # Pillow's mode, e.g. "L", "I;16", "RGB", "P"
        bits_stored=8 if stored_dtype == "uint8" else (16 if "16" in mode else None),
        stored_dtype=stored_dtype,
    )
    return LoadedImage(array, meta)


def _to_array(img: Image.Image) -> np.ndarray:
    """Grey as ``(rows, cols)``, everything else as RGB ``(rows, cols, 3)``."""
    mode = img.mode
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(img)
    if mode == "1":
        return np.asarray(img.convert("L"))
    if mode == "LA":
        return np.asarray(img)[..., 0]
    if mode == "P" and not _palette_has_colour(img):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))  # RGB, RGBA (alpha dropped), P, PA, CMYK, YCbCr


def _palette_has_colour(img: Image.Image) -> bool:
    """True unless every palette entry is grey (R == G == B)."""
    rgb = img.convert("RGB")
    arr = np.asarray(rgb)
    return not (
        np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    )
