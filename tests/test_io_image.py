"""PNG/JPEG exports via Pillow, content sniffing, and the MONAI reader on them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medtl.errors import UnreadableImageError
from medtl.io import detect_format, load_image


def _grad(rows=12, cols=16, top=255, dtype=np.uint8) -> np.ndarray:
    return (np.linspace(0, top, rows * cols).reshape(rows, cols)).astype(dtype)


def test_grey_8bit_png(tmp_path):
    data = _grad()
    Image.fromarray(data).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.array.shape == (1, 12, 16) and image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array[0], data)
    assert image.meta.format == "PNG" and image.meta.spatial_dims == 2


def test_grey_16bit_png_keeps_full_range(tmp_path):
    data = _grad(top=65535, dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "g16.png")
    image = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(image.array[0], data)
    assert image.array.max() == 65535


def test_rgb_and_rgba_png(tmp_path):
    rgb = np.stack([_grad(), _grad()[::-1], np.full((12, 16), 7, np.uint8)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    rgba = np.concatenate([rgb, np.full((12, 16, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "ca.png")
    for name in ("c.png", "ca.png"):
        image = load_image(tmp_path / name)
        assert image.array.shape == (3, 12, 16)  # alpha dropped
        np.testing.assert_array_equal(np.moveaxis(image.array, 0, -1), rgb)


def test_palette_png_colour_and_grey(tmp_path):
    colour = Image.fromarray(np.stack([_grad()] * 3, -1)).convert("P", palette=Image.ADAPTIVE)
    colour.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 255] * 254)
    colour.save(tmp_path / "p.png")
    image = load_image(tmp_path / "p.png")
    assert image.array.shape == (3, 12, 16)
    np.testing.assert_array_equal(
        np.moveaxis(image.array, 0, -1), np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    )
    grey = Image.fromarray(_grad()).convert("P")  # Pillow's default palette is grey ramp
    grey.putpalette([v for i in range(256) for v in (i, i, i)])
    grey.save(tmp_path / "pg.png")
    assert load_image(tmp_path / "pg.png").array.shape == (1, 12, 16)


def test_jpeg_grey_and_rgb(tmp_path):
    Image.fromarray(_grad()).save(tmp_path / "g.jpg", quality=95)
    image = load_image(tmp_path / "g.jpg")
    assert image.array.shape == (1, 12, 16) and image.meta.format == "JPEG"
    np.testing.assert_array_equal(image.array[0], np.asarray(Image.open(tmp_path / "g.jpg")))
    rgb = np.stack([_grad()] * 3, -1)
    Image.fromarray(rgb).save(tmp_path / "c.jpeg")
    assert load_image(tmp_path / "c.jpeg").array.shape == (3, 12, 16)


def test_content_sniffing_without_suffix(tmp_path):
    Image.fromarray(_grad()).save(tmp_path / "noext", format="PNG")
    assert detect_format(tmp_path / "noext") == "image"
    assert load_image(tmp_path / "noext").array.shape == (1, 12, 16)
    (tmp_path / "blob").write_bytes(b"\x00\x01garbage" * 40)
    with pytest.raises(UnreadableImageError, match="not a recognised image"):
        load_image(tmp_path / "blob")


def test_truncated_and_fake_png(tmp_path):
    Image.fromarray(_grad(64, 64)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "fake.png").write_text("this is not a png")
    with pytest.raises(UnreadableImageError, match="fake.png"):
        load_image(tmp_path / "fake.png")
    with pytest.raises(UnreadableImageError, match="file not found"):
        load_image(tmp_path / "missing.png")


def test_monai_reader_png_batch_collates(tmp_path):
    """Two images through LoadImaged and MONAI's collate: channel-first, same meta keys."""
    from monai.data import list_data_collate
    from monai.transforms import LoadImaged

    from medtl.io import MedtlReader

    Image.fromarray(_grad()).save(tmp_path / "a.png")
    Image.fromarray(_grad()[::-1].copy()).save(tmp_path / "b.png")
    loader = LoadImaged(keys="image", reader=MedtlReader(), image_only=False)
    items = [loader({"image": str(tmp_path / n)}) for n in ("a.png", "b.png")]
    assert tuple(items[0]["image"].shape) == (1, 12, 16)
    assert np.isnan(items[0]["image_meta_dict"]["window_center"])
    batch = list_data_collate(items)
    assert tuple(batch["image"].shape) == (2, 1, 12, 16)
    assert MedtlReader().verify_suffix(str(tmp_path / "a.png"))
    assert not MedtlReader().verify_suffix(str(tmp_path / "missing.xyz"))
