"""Benchmark: image loading cost, raw decode + transforms vs medtl's on-disk cache.

Writes realistic radiographs (2500x2048, 12-bit, smooth anatomy-like content plus noise) as
uncompressed, JPEG 2000 lossless and JPEG-LS lossless DICOM into a temp folder, then
measures in one run on this machine:

* an epoch of raw decode + the ``cxr_2d`` deterministic transforms vs an epoch read from the
  ``PersistentDataset`` cache (with and without the random part), per transfer syntax;
* a header-only scan (``dcmread(stop_before_pixels=True)``) vs a full ``load_image``;
* JPEG-LS decode through pyjpegls vs pylibjpeg (pydicom's ``decoding_plugin``).

Prints a Markdown table and writes it to ``benchmarks/results/loading.md``.

    python benchmarks/loading.py            # 8 files per syntax, ~2-3 min on 2 cores
    python benchmarks/loading.py --files 4 --size 224
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROWS, COLS = 2500, 2048


def radiograph(rng: np.random.Generator) -> np.ndarray:
    """A 12-bit chest-radiograph-like image: body, lungs, spine, ribs, detector noise."""
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    y, x = yy / ROWS * 2 - 1, xx / COLS * 2 - 1
    att = 0.25 + 0.55 * (((x / 0.85) ** 2 + (y / 0.95) ** 2) <= 1)
    for cx in (-0.38, 0.38):
        att -= 0.3 * ((((x - cx) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2) <= 1)
    att += 0.25 * (np.abs(x) < 0.07)
    att += 0.05 * np.sin(y * 40 + rng.uniform(0, 6)) * (np.abs(x) < 0.7)
    att += rng.normal(0, 0.01, att.shape).astype(np.float32)
    return np.clip(att * 3500 + 200, 0, 4095).astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, syntax) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.16, 0.16]
    ds.PixelData = pixels.tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def per_image(fn, items, repeat: int = 1) -> float:
    """Best-of-``repeat`` seconds per item of ``fn(item)`` over all items."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, time.perf_counter() - t0)
    return best / len(items)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8, help="files per transfer syntax")
    ap.add_argument("--size", type=int, default=224, help="transforms.spatial_size side")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    a = ap.parse_args(argv)

    import pydicom
    import torch
    from pydicom.pixels import pixel_array
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

    from medtl.config import build_config
    from medtl.data import build_dataset, prepare_records
    from medtl.io import load_image
    from medtl.models import get_backbone_spec
    from medtl.transforms import build_transforms

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="medtl_bench_"))
    rng = np.random.default_rng(0)
    syntaxes = {
        "uncompressed": ExplicitVRLittleEndian,
        "JPEG 2000 lossless": JPEG2000Lossless,
        "JPEG-LS lossless": JPEGLSLossless,
    }
    files: dict[str, list[Path]] = {}
    t0 = time.perf_counter()
    images = [radiograph(rng) for _ in range(a.files)]
    for name, uid in syntaxes.items():
        folder = tmp / name.split()[0].replace("-", "")
        folder.mkdir()
        files[name] = []
        for i, px in enumerate(images):
            p = folder / f"im{i:03d}.dcm"
            write_dicom(p, px, uid)
            files[name].append(p)
    print(f"wrote {a.files} x {len(syntaxes)} files in {time.perf_counter() - t0:.0f} s")

    cfg = build_config({"transforms": {"spatial_size": [a.size, a.size], "augment": "light"}})
    pre = get_backbone_spec(cfg.model.backbone).preprocess
    args = (cfg.transforms, pre, cfg.model.in_channels, cfg.model.channel_adapt)
    tr_eval = build_transforms(*args, train=False)
    tr_train = build_transforms(*args, train=True)

    rows: list[list[str]] = []
    for name in ("uncompressed", "JPEG 2000 lossless"):
        recs = [{"image": str(p), "label": 0} for p in files[name]]
        cache = tmp / f"cache_{name.split()[0]}"
        raw_ds = build_dataset(recs, tr_eval, None, "none")
        t_raw = per_image(lambda i, ds=raw_ds: ds[i], range(len(recs)))
        prepare_records(recs, tr_eval, cache, 0.0, progress=False)
        cached = build_dataset(recs, tr_eval, cache, "disk")
        t_cached = per_image(lambda i, ds=cached: ds[i], range(len(recs)), repeat=5)
        aug = build_dataset(recs, tr_train, cache, "disk")
        t_aug = per_image(lambda i, ds=aug: ds[i], range(len(recs)), repeat=3)
        t_decode = per_image(load_image, files[name])
        rows += [
            [
                name,
                "decode only (`load_image`)",
                f"{t_decode * 1e3:.1f}",
                f"{1 / t_decode:.1f}",
                "",
            ],
            [
                name,
                "raw epoch: decode + cxr_2d transforms",
                f"{t_raw * 1e3:.1f}",
                f"{1 / t_raw:.1f}",
                "100%",
            ],
            [
                name,
                "cached epoch (PersistentDataset)",
                f"{t_cached * 1e3:.2f}",
                f"{1 / t_cached:.0f}",
                f"{t_cached / t_raw:.2%}",
            ],
            [
                name,
                "cached epoch + light augmentation",
                f"{t_aug * 1e3:.2f}",
                f"{1 / t_aug:.0f}",
                f"{t_aug / t_raw:.2%}",
            ],
        ]

    for name in ("uncompressed", "JPEG 2000 lossless"):
        t_head = per_image(
            lambda p: pydicom.dcmread(p, stop_before_pixels=True), files[name], repeat=3
        )
        t_full = per_image(load_image, files[name])
        rows.append(
            [
                name,
                "header-only scan (`stop_before_pixels`) vs full load",
                f"{t_head * 1e3:.2f}",
                f"{1 / t_head:.0f}",
                f"{t_head / t_full:.2%} of full load",
            ]
        )

    ls = files["JPEG-LS lossless"]
    times = {}
    for plugin in ("pyjpegls", "pylibjpeg"):
        try:
            times[plugin] = per_image(lambda p, pl=plugin: pixel_array(p, decoding_plugin=pl), ls)
        except Exception as err:  # a plugin not installed: say so in the table
            rows.append(["JPEG-LS lossless", f"decode via {plugin}", "n/a", "n/a", str(err)[:60]])
    if times:
        ref = times.get("pyjpegls")
        for plugin, t in times.items():
            note = f"{t / ref:.2f}x pyjpegls" if ref else ""
            rows.append(
                ["JPEG-LS lossless", f"decode via {plugin}", f"{t * 1e3:.1f}", f"{1 / t:.1f}", note]
            )

    header = ["transfer syntax", "path", "ms / image", "images / s", "vs raw epoch"]
    lines = [
        f"### Loading: {a.files} radiographs per syntax, {ROWS}x{COLS} 12-bit, "
        f"spatial_size {a.size}, 1 thread",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, pydicom {pydicom.__version__}. Measured in one run "
        "(`python benchmarks/loading.py`); ratios are within that run.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loading.md").write_text(table)
    if a.keep:
        print(f"files kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return table


if __name__ == "__main__":
    main()
