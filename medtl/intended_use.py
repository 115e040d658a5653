"""The intended-use guard: what the training images were, and whether an input is like them.

At the end of `medtl train` the bundle records the training images' **input profile**: the
modalities, body parts, view positions and photometric interpretations seen, and the range
of image sizes (rows, columns, slices). `medtl predict` reads the same facts from each
input and flags one that falls outside (a CT slice sent to a chest radiograph model);
``--strict`` refuses it.

Facts come from the file itself, header only, by one function at training and at
prediction time, so an input is judged the same way whether it arrives in a folder or a
manifest. DICOM: ``Modality``, ``BodyPartExamined``, ``ViewPosition``,
``PhotometricInterpretation``, ``Rows``, ``Columns``, ``NumberOfFrames`` (or the number of
files of a series folder), read with ``specific_tags`` so no identifying element is even
parsed (these are "retain patient characteristics" attributes, see ``medtl.deid``).
PNG/JPEG: Pillow's mode and size; NIfTI: the header's shape. A value a file does not state
is ``None`` and is part of the profile like any other value: an input that lacks it is in
profile only when training images lacked it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtl.errors import UnreadableImageError

__all__ = [
    "CATEGORICAL_FIELDS",
    "PROFILE_FORMAT",
    "SIZE_FIELDS",
    "ImageFacts",
    "build_profile",
    "check_profile",
    "read_image_facts",
    "training_profile",
]

PROFILE_FORMAT = "medtl-input-profile/1"
CATEGORICAL_FIELDS = ("modality", "body_part", "view_position", "photometric_interpretation")
SIZE_FIELDS = ("rows", "columns", "slices")
_DICOM_TAGS = [
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
]


@dataclass(frozen=True)
class ImageFacts:
    """Non-identifying header facts of one input (None where the file does not say)."""

    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    photometric_interpretation: str | None = None
    rows: int | None = None
    columns: int | None = None
    slices: int | None = None


def _text(value: Any) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return text or None


def _dicom_facts(path: Path, n_slices: int | None = None) -> ImageFacts:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
    except Exception as err:  # a corrupt header raises many types (NotImplementedError, ...)
        raise UnreadableImageError(path, f"DICOM header cannot be read ({err})") from err
    frames = int(ds.get("NumberOfFrames") or 1)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    return ImageFacts(
        modality=_text(ds.get("Modality")),
        body_part=_text(ds.get("BodyPartExamined")),
        view_position=_text(ds.get("ViewPosition")),
        photometric_interpretation=_text(ds.get("PhotometricInterpretation")),
        rows=int(rows) if rows is not None else None,
        columns=int(cols) if cols is not None else None,
        slices=n_slices if n_slices is not None else frames,
    )


def _series_facts(folder: Path) -> ImageFacts:
    from medtl.io.series import list_series_files

    files = list_series_files(folder)
    if not files:
        raise UnreadableImageError(folder, "no DICOM files in the folder")
    return _dicom_facts(files[0], n_slices=len(files))


def _image_facts(path: Path) -> ImageFacts:
    from PIL import Image

    try:
        with Image.open(path) as img:  # header only: Pillow decodes lazily
            width, height = img.size
            mode = img.mode
    except Exception as err:  # a corrupt header raises many types (ValueError: IHDR, ...)
        raise UnreadableImageError(path, f"image header cannot be read ({err})") from err
    return ImageFacts(photometric_interpretation=_text(mode), rows=height, columns=width, slices=1)


def _nifti_facts(path: Path) -> ImageFacts:
    import nibabel as nib

    try:
        img = nib.load(path)  # reads the header only; the data stays on disk
        shape = tuple(int(s) for s in getattr(img, "shape", ()))
    except Exception as err:  # nibabel raises ImageFileError, ValueError, EOFError, ...
        raise UnreadableImageError(path, f"volume header cannot be read ({err})") from err
    dims = (*shape, 1, 1, 1)
    return ImageFacts(rows=dims[0], columns=dims[1], slices=dims[2])


def read_image_facts(path: str | Path) -> ImageFacts:
    """Header facts of a DICOM file or series folder, a NIfTI/Analyze/MGH or a PNG/JPEG file.

    Raises UnreadableImageError when the header cannot be read (prediction reports those).
    """
    from medtl.io import detect_format

    p = Path(path)
    readers: dict[str, Callable[[Path], ImageFacts]] = {
        "dicom": _dicom_facts,
        "dicom_series": _series_facts,
        "nifti": _nifti_facts,
        "image": _image_facts,
    }
    return readers[detect_format(p)](p)


def _sorted_values(values: Iterable[str | None]) -> list[str | None]:
    return sorted(set(values), key=lambda v: (v is None, v or ""))


def build_profile(facts: Iterable[ImageFacts]) -> dict[str, Any]:
    """The profile of a set of images: values seen per field, ``[min, max]`` per size."""
    items = list(facts)
    profile: dict[str, Any] = {"format": PROFILE_FORMAT, "n_images": len(items)}
    for name in CATEGORICAL_FIELDS:
        profile[name] = _sorted_values(getattr(f, name) for f in items)
    for name in SIZE_FIELDS:
        sizes = [getattr(f, name) for f in items if getattr(f, name) is not None]
        profile[name] = [min(sizes), max(sizes)] if sizes else None
    return profile


def training_profile(paths: Iterable[str | Path]) -> dict[str, Any] | None:
    """The input profile of the training images (unreadable headers are left out; those
    images were quarantined by training already). None when no header could be read."""
    facts = []
    for p in paths:
        try:
            facts.append(read_image_facts(p))
        except UnreadableImageError:
            continue
    return build_profile(facts) if facts else None


def _shown(value: str | None) -> str:
    return "not stated" if value is None else value


def check_profile(profile: Mapping[str, Any], facts: ImageFacts) -> str | None:
    """Why an input is outside the training profile (every reason, ``; ``-joined), or None."""
    reasons = []
    for name in CATEGORICAL_FIELDS:
        seen = profile.get(name)
        value = getattr(facts, name)
        if seen is not None and value not in seen:
            label = name.replace("_", " ")
            reasons.append(
                f"{label} {_shown(value)} not in training [{', '.join(map(_shown, seen))}]"
            )
    for name in SIZE_FIELDS:
        bounds = profile.get(name)
        value = getattr(facts, name)
        if bounds is None or value is None:
            continue
        lo, hi = bounds
        if not lo <= value <= hi:
            reasons.append(f"{name} {value} outside training range {lo}-{hi}")
    return "; ".join(reasons) or None
