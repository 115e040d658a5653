"""DICOM slice geometry: sort slices along their normal, check spacing, build a RAS affine.

Pure functions shared by DICOM series (one file per slice) and multi-frame files with
per-frame positions. Hand-written because pydicom reads the attributes but does not
assemble volumes; the maths is PS3.3 C.7.6.2.1.1 (Image Plane Module).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# DICOM patient space is LPS; medtl (like nibabel and MONAI) works in RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class GeometryError(ValueError):
    """Slices do not form one regular volume; the message says why (no identifiers)."""


@dataclass(frozen=True)
class SliceStack:
    """Slices sorted along the normal: ``order`` indexes the input, ``step`` in mm."""

    order: list[int]
    step: float
    normal: np.ndarray


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Return the unit normal (row x column direction) of an ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=float).reshape(2, 3)
    n = np.cross(o[0], o[1])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise GeometryError("ImageOrientationPatient rows and columns are parallel")
    return n / norm


def sort_slices(
    orientations: list[np.ndarray],
    positions: list[np.ndarray],
    tolerance: float = 0.01,
) -> SliceStack:
    """Sort slices by their position projected on the common normal and check spacing.

    Args:
        orientations: ImageOrientationPatient (6 values) per slice.
        positions: ImagePositionPatient (3 values) per slice.
        tolerance: largest relative deviation of a gap from the median gap.

    Raises:
        GeometryError: orientations differ, two slices share a position, or the gaps are
            not uniform within ``tolerance`` (a missing slice).
    """
    ori = np.asarray(orientations, dtype=float).reshape(-1, 6)
    if np.abs(ori - ori[0]).max() > 1e-4:
        raise GeometryError("slices have different orientations (ImageOrientationPatient)")
    normal = slice_normal(ori[0])
    proj = np.asarray(positions, dtype=float).reshape(-1, 3) @ normal
    order = [int(i) for i in np.argsort(proj, kind="stable")]
    if len(order) == 1:
        return SliceStack(order, 0.0, normal)
    gaps = np.diff(proj[order])
    if gaps.min() < 1e-4:
        n_dup = int((gaps < 1e-4).sum())
        raise GeometryError(
            f"{n_dup} duplicate slice position(s); the folder may hold two acquisitions "
            "of the same series or a copied file"
        )
    median = float(np.median(gaps))
    worst = float(np.abs(gaps - median).max())
    if worst > tolerance * median:
        raise GeometryError(
            f"non-uniform slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm "
            f"(median {median:.3g}, tolerance {tolerance:.0%}); a slice is probably missing"
        )
    return SliceStack(order, float(gaps.mean()), normal)


def volume_affine(
    orientation: np.ndarray,
    first_position: np.ndarray,
    pixel_spacing: tuple[float, float],
    slice_step: float,
    normal: np.ndarray,
) -> np.ndarray:
    """RAS affine for an array laid out ``(slice, row, col)``.

    ``pixel_spacing`` is DICOM's (row spacing, column spacing). Column index moves along
    the first ImageOrientationPatient triplet, row index along the second.
    """
    o = np.asarray(orientation, dtype=float).reshape(2, 3)
    lps = np.eye(4)
    lps[:3, 0] = normal * slice_step
    lps[:3, 1] = o[1] * pixel_spacing[0]
    lps[:3, 2] = o[0] * pixel_spacing[1]
    lps[:3, 3] = np.asarray(first_position, dtype=float)
    return LPS_TO_RAS @ lps
