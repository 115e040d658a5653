"""Pick a reader by what a path is: a folder (DICOM series), a suffix, or the file's bytes.

``READERS`` maps a format name to its loader; ``detect_format`` decides which applies.
Suffixes win when they are known; files without one (DICOM exports often have none) are
recognised by their first bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from medtl.errors import UnreadableImageError
from medtl.io.base import DEFAULT_POLICY, LoadedImage, ReadPolicy
from medtl.io.base import reorient as reorient_image
from medtl.io.contract import reader
from medtl.io.dicom import is_dicom, load_dicom
from medtl.io.image import IMAGE_SUFFIXES, load_png_jpeg
from medtl.io.nifti import NIFTI_SUFFIXES, load_nifti
from medtl.io.series import load_dicom_series


class Reader(Protocol):
    """A loader: ``reader(path, policy=...) -> LoadedImage``."""

    def __call__(self, path: Path, /, *, policy: ReadPolicy = ...) -> LoadedImage: ...


#: Format name -> loader. Each keeps ``medtl.io.contract``: it loads or raises
#: ``UnreadableImageError``, whatever went wrong.
READERS: dict[str, Reader] = {
    "dicom": load_dicom,
    "dicom_series": load_dicom_series,
    "nifti": load_nifti,
    "image": load_png_jpeg,
}

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "image",
    b"\xff\xd8\xff": "image",  # JPEG SOI
}
_NIFTI_MAGIC_OFFSET = 344  # NIfTI-1 single file: "n+1\0" at byte 344


def supported_suffixes() -> tuple[str, ...]:
    """Every file ending ``load_image`` recognises without looking inside the file."""
    return DICOM_SUFFIXES + NIFTI_SUFFIXES + IMAGE_SUFFIXES


def detect_format(path: str | Path) -> str:
    """Name the ``READERS`` entry for ``path``: folder, then suffix, then magic bytes.

    Raises:
        UnreadableImageError: missing path, or a file no reader recognises.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom_series"
    if not p.exists():
        raise UnreadableImageError(path, "file not found")
    name = p.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if is_dicom(p):
        return "dicom"
    try:
        with open(p, "rb") as f:
            head = f.read(348)
    except OSError as err:
        raise UnreadableImageError(path, f"cannot open file ({err.strerror})") from err
    for magic, fmt in _MAGIC.items():
        if head.startswith(magic):
            return fmt
    if head[_NIFTI_MAGIC_OFFSET : _NIFTI_MAGIC_OFFSET + 4] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    raise UnreadableImageError(
        path,
        "not a recognised image: expected DICOM (with 'DICM' preamble), a DICOM series "
        f"folder, or a file ending in {', '.join(supported_suffixes())}",
    )


@reader
def load_image(
    path: str | Path, reorient: str | None = None, policy: ReadPolicy = DEFAULT_POLICY
) -> LoadedImage:
    """Load any supported image as channel-first float32 with non-identifying metadata.

    Args:
        path: a DICOM file, a DICOM series folder, a NIfTI/Analyze/MGH file, or PNG/JPEG.
        reorient: axis codes such as ``"RAS"`` to reorder 3D images with an affine
            (``nibabel.as_closest_canonical`` for NIfTI); None keeps the file's order.
        policy: what to refuse before decoding (``data.max_image_bytes``,
            ``data.burned_in_annotation``).

    Raises:
        UnreadableImageError: for every failure of any type (a decoder's panic included;
            only KeyboardInterrupt and SystemExit pass); ``reason`` is one human line.
    """
    image = READERS[detect_format(path)](Path(path), policy=policy)
    return reorient_image(image, reorient) if reorient else image
