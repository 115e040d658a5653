"""DICOM series (a folder, or a list of files, one slice each) -> one 3D ``LoadedImage``.

Slices are ordered by ImagePositionPatient projected on the slice normal (never by file
name or InstanceNumber), checked for one series, one orientation, no duplicate positions
and uniform spacing, then decoded one by one with the single-file pipeline of
``medtl.io.dicom`` (so a per-slice RescaleSlope/Intercept is honoured).
Output: ``(C, slices, rows, cols)`` float32 with a RAS affine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from medtl.errors import UnreadableImageError
from medtl.io.base import DEFAULT_POLICY, LoadedImage, ReadPolicy
from medtl.io.contract import check_pixel_budget, reader
from medtl.io.dicom import (
    DecodedPixels,
    build_meta,
    check_burned_in,
    decode_pixels,
    frame_count,
    is_dicom,
    pixel_spacing,
    read_dataset,
)
from medtl.io.geometry import GeometryError, sort_slices, volume_affine

#: Largest relative deviation of a slice gap from the median gap before a series is
#: rejected as having a missing slice.
DEFAULT_SPACING_TOLERANCE = 0.01


def list_series_files(folder: str | Path) -> list[Path]:
    """DICOM files directly inside ``folder`` (by preamble or a .dcm suffix), sorted by name."""
    root = Path(folder)
    return sorted(
        p
        for p in root.iterdir()
        if p.is_file() and (is_dicom(p) or p.suffix.lower() in (".dcm", ".dicom"))
    )


@reader
def load_dicom_series(
    source: str | Path | Sequence[str | Path],
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
    policy: ReadPolicy = DEFAULT_POLICY,
) -> LoadedImage:
    """Load a folder (or a list of files) holding one DICOM series as a 3D volume.

    Args:
        source: a folder, or the files of one series.
        spacing_tolerance: allowed relative deviation of slice gaps from their median.

    Raises:
        UnreadableImageError: no DICOM images, several series (the count is given, never
            the UIDs), multi-frame files, missing geometry, duplicate positions, a gap
            (missing slice), or a slice that cannot be decoded.
    """
    where, files = _series_files(source)
    headers = _image_headers(files, where)
    _check_one_series(headers, where, policy)
    orientations, positions = _slice_geometry(headers, where)
    try:
        stack = sort_slices(orientations, positions, tolerance=spacing_tolerance)
    except GeometryError as err:
        raise UnreadableImageError(where, str(err)) from err
    frames, decoded, first_ds = _decode_slices([headers[i][0] for i in stack.order], where, policy)
    spacing2d = pixel_spacing(first_ds)
    step = stack.step or float(
        first_ds.get("SpacingBetweenSlices") or first_ds.get("SliceThickness") or 1.0
    )
    affine = volume_affine(
        orientations[stack.order[0]], positions[stack.order[0]], spacing2d, step, stack.normal
    )
    array = np.ascontiguousarray(np.moveaxis(frames, -1, 0))
    meta = build_meta(
        first_ds,
        decoded,
        where if isinstance(source, (str, Path)) else files[0],
        "DICOM series",
        array,
        (step, *spacing2d),
        3,
        len(stack.order),
        affine,
    )
    return LoadedImage(array, meta)


Headers = list[tuple[Path, Dataset]]


def _series_files(source: str | Path | Sequence[str | Path]) -> tuple[Path, list[Path]]:
    """(the folder errors are reported against, the files): a folder's DICOM files, or the
    given list."""
    if isinstance(source, (str, Path)):
        where = Path(source)
        if not where.is_dir():
            raise UnreadableImageError(where, "not a folder")
        return where, list_series_files(where)
    files = [Path(p) for p in source]
    return (files[0].parent if files else Path(".")), files


def _image_headers(files: list[Path], where: Path) -> Headers:
    """Headers only: grouping and geometry need no pixels; non-image objects (DICOMDIR,
    structured reports, presentation states) are skipped."""
    headers = [(f, read_dataset(f, stop_before_pixels=True)) for f in files]
    headers = [(f, ds) for f, ds in headers if "Rows" in ds and "Columns" in ds]
    if not headers:
        raise UnreadableImageError(where, "no DICOM images found in the folder")
    return headers


def _check_one_series(headers: Headers, where: Path, policy: ReadPolicy) -> None:
    """One series of single-frame slices of one size, none refused by ``policy``, within
    its pixel budget."""
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in headers)
    if len(series) > 1:
        counts = ", ".join(str(n) for n in sorted(series.values(), reverse=True))
        raise UnreadableImageError(
            where,
            f"{len(series)} DICOM series mixed in one folder ({counts} files); "
            "put each series in its own folder or pass the files of one series",
        )
    if any(frame_count(ds, f) > 1 for f, ds in headers):
        raise UnreadableImageError(
            where, "series folder holds multi-frame files; load each file on its own"
        )
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    if len(sizes) > 1:
        raise UnreadableImageError(where, f"slices have different sizes: {sorted(sizes)}")
    for f, ds in headers:
        check_burned_in(ds, f, policy)
    spp = max(int(ds.get("SamplesPerPixel", 1) or 1) for _, ds in headers)
    check_pixel_budget(where, (len(headers), *next(iter(sizes)), spp), policy, "series headers")


def _slice_geometry(headers: Headers, where: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each slice's ImageOrientationPatient and ImagePositionPatient (all must have both)."""
    lacking = [
        f
        for f, ds in headers
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds
    ]
    if lacking:
        raise UnreadableImageError(
            where,
            f"{len(lacking)} slice(s) lack ImagePositionPatient/ImageOrientationPatient; "
            "cannot order the slices",
        )
    orientations = [np.asarray(ds.ImageOrientationPatient, dtype=float) for _, ds in headers]
    positions = [np.asarray(ds.ImagePositionPatient, dtype=float) for _, ds in headers]
    return orientations, positions


def _decode_slices(
    ordered: list[Path], where: Path, policy: ReadPolicy
) -> tuple[np.ndarray, DecodedPixels, Dataset]:
    """The slices' frames stacked in ``ordered`` order, the first slice's decoded pixels and
    its dataset (for the metadata)."""
    slices = []
    first: tuple[DecodedPixels, Dataset] | None = None
    for path in ordered:
        full = read_dataset(path)
        decoded = decode_pixels(full, path, policy)
        if first is None:
            first = (decoded, full)
        slices.append(decoded.frames)
    assert first is not None
    # Before concatenating: numpy would raise its own ValueError, which is not quarantined.
    if len({s.shape[-1] for s in slices}) != 1:
        raise UnreadableImageError(where, "slices mix grey and colour images")
    return np.concatenate(slices, axis=0), first[0], first[1]
