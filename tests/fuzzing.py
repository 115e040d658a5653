"""A small seeded mutation fuzzer for the image readers (issue 14), shared by the fuzz tests
and ``benchmarks/reader_fuzz.py``.

Sources are real files the readers load unmutated: a fixed subset of pydicom's and nibabel's
bundled test files (one per file type, each small) plus a PNG and a JPEG made here with
Pillow. Five operators break them the way real exports break: truncation, byte flips in the
header, byte flips in the pixel data, a zeroed range and a duplicated range. Mutant ``i`` of
``mutants(seed, n)`` depends only on ``(seed, i)``, so a run of 500 is the start of a run of
3,000 and any mutant can be rebuilt from its name.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER_BYTES = 2048  # "header region": the first 2 kB (DICOM meta + dataset, NIfTI's 348+)
MAX_FLIPS = 8

# (kind, file name): one small file per file type the readers take.
DICOM_SOURCES = [
    ("dicom_explicit_le", "CT_small.dcm"),
    ("dicom_implicit_le", "MR_small_implicit.dcm"),
    ("dicom_big_endian", "MR_small_bigendian.dcm"),
    ("dicom_deflated", "image_dfl.dcm"),
    ("dicom_jpeg_baseline", "SC_rgb_jpeg_dcmtk.dcm"),
    ("dicom_jpeg_ls", "MR_small_jpeg_ls_lossless.dcm"),
    ("dicom_jpeg2000", "MR_small_jp2klossless.dcm"),
    ("dicom_rle", "SC_rgb_rle_16bit.dcm"),
]
NIBABEL_SOURCES = [
    ("nifti", "anatomical.nii"),
    ("nifti_gz", "example_nifti2.nii.gz"),
    ("mgz", "test.mgz"),
]


@dataclass(frozen=True)
class Source:
    """One unmutated file: its type (``kind``), file name and bytes."""

    kind: str
    name: str
    data: bytes

    @property
    def suffix(self) -> str:
        """The file ending the reader registry dispatches on (``.nii.gz`` kept whole)."""
        return ".nii.gz" if self.name.endswith(".nii.gz") else Path(self.name).suffix

    @property
    def gzipped(self) -> bool:
        return self.data[:2] == b"\x1f\x8b"


@dataclass(frozen=True)
class Mutant:
    """A broken copy of a source; ``detail`` gives the offsets, so the README can cite it."""

    name: str
    source: str
    kind: str
    operator: str
    detail: str
    suffix: str
    data: bytes


def pydicom_file(name: str) -> Path:
    """The path of one of pydicom's bundled test files (never downloaded)."""
    import pydicom.data

    # Only files present on disk: get_testdata_file() may try to download the others.
    found = [Path(p) for p in pydicom.data.get_testdata_files() if Path(p).name == name]
    found = [p for p in found if p.is_file()]
    if not found:
        raise FileNotFoundError(f"pydicom's bundled test file {name} is not installed")
    return found[0]


def nibabel_file(name: str) -> Path:
    """The path of one of nibabel's bundled test files."""
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"nibabel's bundled test file {name} is not installed")
    return path


def _made_image(fmt: str, seed: int = 0) -> bytes:
    """A 64x64 gradient plus seeded noise, encoded by Pillow (16-bit grey PNG, RGB JPEG)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.float64) / 126.0
    buf = io.BytesIO()
    if fmt == "png":
        grey = (ramp * 4000 + rng.normal(0, 50, ramp.shape)).clip(0, 65535).astype(np.uint16)
        Image.fromarray(grey).save(buf, format="PNG")
    else:
        rgb = np.stack([ramp, ramp[::-1], ramp.T], axis=-1) * 255 + rng.normal(0, 8, (64, 64, 3))
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@functools.cache
def sources() -> tuple[Source, ...]:
    """The fixed source files, in a fixed order; an MGH (uncompressed) is ``test.mgz``
    gunzipped, since nibabel bundles none."""
    out = [Source(kind, name, pydicom_file(name).read_bytes()) for kind, name in DICOM_SOURCES]
    out += [Source(kind, name, nibabel_file(name).read_bytes()) for kind, name in NIBABEL_SOURCES]
    out.append(Source("mgh", "test.mgh", gzip.decompress(nibabel_file("test.mgz").read_bytes())))
    out.append(Source("png", "made_grey16.png", _made_image("png")))
    out.append(Source("jpeg", "made_rgb.jpg", _made_image("jpeg")))
    return tuple(out)


# ------------------------------------------------------------------------- operators
# Each takes the bytes and a Generator and returns (mutated bytes, offsets as text).
def truncate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """Cut the file at a random offset (an interrupted copy)."""
    cut = int(rng.integers(1, len(data)))
    return data[:cut], f"cut at {cut} of {len(data)}"


def _flip(data: bytes, rng: np.random.Generator, lo: int, hi: int) -> tuple[bytes, str]:
    buf = bytearray(data)
    spots = []
    for _ in range(int(rng.integers(1, MAX_FLIPS + 1))):
        at, mask = int(rng.integers(lo, hi)), int(rng.integers(1, 256))
        buf[at] ^= mask
        spots.append(f"{at}^{mask:#04x}")
    return bytes(buf), "xor " + ",".join(spots)


def flip_header(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """XOR 1-8 random bytes of the first 2 kB (or first half of a smaller file)."""
    return _flip(data, rng, 0, min(HEADER_BYTES, len(data) // 2))


def flip_pixels(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """XOR 1-8 random bytes of the second half, where pixel data lies in these files."""
    return _flip(data, rng, len(data) // 2, len(data))


def zero_range(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """Overwrite a random range (up to an eighth of the file) with zeros."""
    start = int(rng.integers(0, len(data)))
    end = min(len(data), start + int(rng.integers(1, max(2, len(data) // 8))))
    return data[:start] + bytes(end - start) + data[end:], f"zero {start}:{end}"


def duplicate_range(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """Insert a copy of a random range (up to an eighth of the file) at a random offset."""
    start = int(rng.integers(0, len(data)))
    end = min(len(data), start + int(rng.integers(1, max(2, len(data) // 8))))
    at = int(rng.integers(0, len(data) + 1))
    return data[:at] + data[start:end] + data[at:], f"copy {start}:{end} to {at}"


Operator = Callable[[bytes, np.random.Generator], tuple[bytes, str]]
OPERATORS: dict[str, Operator] = {
    "truncate": truncate,
    "flip_header": flip_header,
    "flip_pixels": flip_pixels,
    "zero_range": zero_range,
    "duplicate_range": duplicate_range,
}


def mutant(seed: int, index: int) -> Mutant:
    """Mutant ``index`` of run ``seed``: sources and operators in turn, offsets from a
    Generator seeded by ``(seed, index)`` alone. A gzipped source has its compressed bytes
    mutated (a broken export), or one time in three the inner bytes, recompressed."""
    srcs = sources()
    src = srcs[index % len(srcs)]
    op_name = list(OPERATORS)[(index // len(srcs)) % len(OPERATORS)]
    rng = np.random.default_rng([seed, index])
    inner = src.gzipped and rng.random() < 1 / 3
    data = gzip.decompress(src.data) if inner else src.data
    data, detail = OPERATORS[op_name](data, rng)
    if inner:
        data = gzip.compress(data, mtime=0)
        detail = f"inside gzip: {detail}"
    stem = src.name.removesuffix(src.suffix)
    name = f"s{seed}-{index:05d}-{stem}-{op_name}"
    return Mutant(name, src.name, src.kind, op_name, detail, src.suffix, data)


def mutants(seed: int, n: int) -> Iterator[Mutant]:
    """``n`` mutants, fully determined by ``seed``."""
    for i in range(n):
        yield mutant(seed, i)


def write(m: Mutant, folder: Path) -> Path:
    """Write ``m`` to ``folder`` under its name with the source's suffix; returns the path."""
    path = Path(folder) / f"{m.name}{m.suffix}"
    path.write_bytes(m.data)
    return path


# ------------------------------------------------------------------------- outcome
def load_outcome(item: dict) -> dict:
    """Load ``item["image"]`` and say how it went, never raising (module level, so the
    decoding pool can pickle it): ``loaded``, ``unreadable`` (medtl's own error, with the
    reason and the type of the exception behind it) or ``leak`` (anything else, also
    BaseExceptions such as pyo3's PanicException). Ctrl-C and sys.exit still pass."""
    from medtl.errors import UnreadableImageError
    from medtl.io import load_image

    try:
        image = load_image(item["image"])
    except UnreadableImageError as err:
        cause = err.__cause__
        return {
            "outcome": "unreadable",
            "reason": err.reason,
            "cause": type(cause).__name__ if cause is not None else "",
        }
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - the point: whatever escapes the reader
        return {"outcome": "leak", "type": type(err).__name__, "msg": str(err)[:300]}
    return {"outcome": "loaded", "shape": list(image.array.shape)}


def run_in_process(m: Mutant, folder: Path) -> dict:
    """Write ``m`` and load it in this process (the benchmark's serial path)."""
    path = write(m, folder)
    try:
        return load_outcome({"image": str(path)})
    finally:
        os.unlink(path)
