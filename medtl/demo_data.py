"""The built-in demo dataset: synthetic chest radiographs as real DICOM files, CT-like NIfTI.

Everything a hospital export throws at a pipeline, made small and deterministic for a seed:
a nested folder tree with meaningless file names (some without ``.dcm``), six transfer
syntaxes (Explicit/Implicit/Deflated VR Little Endian, RLE Lossless, JPEG 2000 Lossless,
JPEG-LS Lossless), MONOCHROME1 files stored inverted, 12-bit pixels, two sites with
different contrast, brightness and noise, and header fields that look like PHI (names,
MRNs, birth dates, accession numbers, institutions, UIDs; all fake). The positive class
("nodule") is a visible round opacity in a lung field; about 27% of images are positive.

A third, shifted site ("site_c", ``target_patients``) is written as its own export under
``target/`` with ``target_manifest.csv`` (labelled) and ``target_unlabelled.csv`` (no label
column): the data for domain-shift and adaptation work. Its scanner differs in ways that
survive the default percentile clip and a resize to small inputs (a pure gain or offset
change would not, since the clip rescales each image to its own range):

- lower native resolution: a detector matrix of 3/4 of ``image_size`` pixels a side (at least
  32; coarser pixel spacing, same field of view), which the pipeline resamples;
- a blurrier detector (Gaussian MTF, sigma 0.5 native pixels) before the noise;
- a non-linear, film-like S-shaped LUT instead of a power law (air and dense body compressed,
  the lung-to-soft-tissue mid-tones stretched);
- much stronger quantum noise (about 5x site B's), as from a low-dose or older detector;
- half of its files MONOCHROME1 instead of a fifth (undone by the reader: no shift after load).

The nodule stays visible to a reader at site C. Site C comes from its own random stream
and its own patients (new MRNs, new pseudonyms): ``manifest.csv``, ``dicom/`` and the holdout
are byte-identical whatever ``target_patients`` is.

The manifests use pseudonymous ids made with :data:`DEMO_SALT`, exactly as
``medtl manifest scan --salt`` would make them, so the scan of ``dicom/`` with
``labels.csv`` reproduces ``manifest.csv``. :data:`DEMO_SALT` is public and only for demo
data: real scans read the site's secret with :func:`medtl.deid.load_salt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

from medtl.deid import identifying_values, pseudonymize

__all__ = [
    "DEMO_SALT",
    "DEMO_CLASSES",
    "DEMO_TRANSFER_SYNTAXES",
    "DemoData",
    "make_demo_data",
    "demo_phi_values",
]

# Public, documented, demo-only key for pseudonyms (never used for real data).
DEMO_SALT = "medtl-demo-salt-public-not-secret"
DEMO_CLASSES = ("normal", "nodule")
DEMO_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
)
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's prefix for generated UIDs
_CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
_DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
_POSITIVE_FRACTION = 0.3  # of patients; images come out at ~25-30% positive
_MONOCHROME1_FRACTION = 0.2
_BITS = 12


@dataclass(frozen=True)
class DemoData:
    """Paths of one generated demo dataset (manifests hold paths relative to ``root``)."""

    root: Path
    dicom_dir: Path
    manifest_csv: Path  # 2D radiographs: image,label,patient_id,study_id,site,sex,modality
    labels_csv: Path  # AccessionNumber,label,site: what a radiology export would give
    holdout_dicom_dir: Path
    holdout_manifest_csv: Path  # separate patients, same columns as manifest_csv
    manifest_3d_csv: Path | None
    nifti_dir: Path | None
    # The shifted third site (None when target_patients=0): its own export and patients.
    target_dicom_dir: Path | None = None
    target_manifest_csv: Path | None = None  # same columns as manifest_csv, site "site_c"
    target_unlabelled_csv: Path | None = None  # the same rows without the label column


@dataclass(frozen=True)
class _Shift:
    """Scanner changes of the shifted site that a percentile clip cannot undo."""

    native_fraction: float  # detector matrix side as a fraction of image_size (same field)
    blur: float  # Gaussian MTF sigma, in native pixels, applied before the noise
    lut_slope: float  # S-shaped LUT: logistic of (att - lut_center) / lut_slope, rescaled
    lut_center: float
    monochrome1_fraction: float


@dataclass(frozen=True)
class _Site:
    name: str
    institution: str
    station: str
    modality: str
    sop_class: UID
    offset: float
    gain: float
    gamma: float
    noise: float
    shift: _Shift | None = None  # None: the source sites' plain power-law look


_SITES = (
    _Site(
        "site_a",
        "St. Brendan's General Hospital",
        "SBGH-CR01",
        "CR",
        _CR_STORAGE,
        0.04,
        0.92,
        1.0,
        0.008,
    ),
    _Site(
        "site_b",
        "Northfield Regional Medical Center",
        "NRMC-DX07",
        "DX",
        _DX_STORAGE,
        0.16,
        0.70,
        1.45,
        0.022,
    ),
)
_TARGET_SITE = _Site(
    "site_c",
    "Lakeside Valley Community Hospital",
    "LVCH-DR03",
    "DX",
    _DX_STORAGE,
    0.10,
    0.80,
    1.0,
    0.12,  # quantum noise ~5x site B's: a low-dose / older detector
    # Calibrated with benchmarks/site_shift.py: a clear AUROC gap that AdaBN partly closes,
    # the nodule still plain to see (see the module docstring).
    _Shift(
        native_fraction=0.75,
        blur=0.5,
        lut_slope=0.12,
        lut_center=0.35,
        monochrome1_fraction=0.5,
    ),
)
# The target site's random stream: its own, so the source outputs never move.
_TARGET_STREAM = 12

_LAST = (
    "HARTLEY ODONNELL VASQUEZ KOWALSKI LINDQVIST ABERNATHY NAKAMURA OKAFOR FITZGERALD "
    "MORETTI PETROVIC DUBOIS HALVORSEN ACHEBE CASTELLANOS WINTERBOTTOM BRANNIGAN SOKOLOV "
    "THORNBURY MACALLISTER ESPINOZA KAPOOR ROSENTHAL VANDERMEER QUIGLEY LAUTENBACH"
).split()
_FIRST = {
    "F": "MARGARET ELEANOR PRIYA INGRID ROSALIND BEATRIX YOLANDA GWENDOLYN".split(),
    "M": "THEODORE AUGUSTIN RAJESH LEOPOLD CORNELIUS BARTHOLOMEW EZEKIEL FERDINAND".split(),
}


def _uid(seed: int, *parts: object) -> UID:
    """Deterministic UID (pydicom's generator hashes the entropy sources)."""
    return generate_uid(_UID_PREFIX, entropy_srcs=["medtl-demo", str(seed), *map(str, parts)])


def _hex(rng: np.random.Generator, n: int = 8) -> str:
    return "".join(rng.choice(list("0123456789ABCDEF"), n))


def _date(rng: np.random.Generator, first_year: int, last_year: int) -> str:
    day = np.datetime64(f"{first_year}-01-01") + int(
        rng.integers(0, 365 * (last_year - first_year + 1))
    )
    return str(day).replace("-", "")


def _soft(inside: np.ndarray, edge: float) -> np.ndarray:
    """Smooth 0..1 mask from a signed 'how far inside' field (positive inside)."""
    return 1.0 / (1.0 + np.exp(-inside / edge))


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float):
    return 1.0 - np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)


def _radiograph(
    rng: np.random.Generator, size: int, nodule: tuple[float, float, float, float] | None
) -> np.ndarray:
    """Attenuation map in [0, 1] of a chest radiograph phantom (bone bright, lungs dark).

    ``nodule`` is ``(x, y, radius, contrast)`` in normalised coordinates ([-1, 1] across).
    """
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    cx, cy = rng.normal(0, 0.03, 2)
    scale = rng.uniform(0.93, 1.04)
    xx, yy = (x - cx) / scale, (y - cy) / scale
    edge = 0.02
    body = _soft(_ellipse(xx, yy, 0, 0.1, 0.86, 1.05), edge)
    lung_r = _soft(_ellipse(xx, yy, -0.37, -0.02, 0.27, 0.56), edge)
    lung_l = _soft(_ellipse(xx, yy, 0.38, 0.0, 0.26, 0.53), edge)
    heart = _soft(_ellipse(xx, yy, 0.1, 0.3, 0.27, 0.22), 0.04)
    lungs = np.clip(lung_r + lung_l, 0, 1) * (1 - heart)
    att = 0.04 + 0.52 * body - 0.33 * lungs
    att += 0.12 * _soft(0.07 - np.abs(xx - 0.01), 0.01) * body  # spine
    att += 0.06 * _soft(0.16 - np.abs(xx), 0.03) * body  # mediastinum
    # Ribs: curved bands across each lung, period and phase vary per image.
    period = rng.uniform(0.17, 0.21)
    phase = rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (yy + 0.35 * xx**2) / period + phase)
    att += 0.07 * ribs**3 * lungs
    # Vessels/texture: smoothed noise inside the lungs.
    tex = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=max(size / 48, 1.0))
    att += 0.05 * tex / (tex.std() + 1e-6) * lungs
    if nodule is not None:
        nx, ny, radius, contrast = nodule
        d = np.sqrt((xx - nx) ** 2 + (yy - ny) ** 2)
        att += contrast * _soft(radius - d, 0.15 * radius)
    return np.clip(att, 0.0, 1.0)


def _to_stored(att: np.ndarray, site: _Site, rng: np.random.Generator) -> np.ndarray:
    """Site look (offset, gain, gamma, noise) and 12-bit quantisation; higher = brighter."""
    gain = site.gain * rng.uniform(0.95, 1.05)
    value = site.offset + gain * att**site.gamma
    value = value + rng.normal(0, site.noise, att.shape)
    top = 2**_BITS - 1
    return np.clip(np.round(value * top), 0, top).astype(np.uint16)


def _logistic(x: np.ndarray | float, center: float, slope: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.asarray(x) - center) / slope))


def _to_stored_shifted(
    rng: np.random.Generator, site: _Site, image_size: int, nodule: tuple | None
) -> np.ndarray:
    """The shifted site's scanner: coarser matrix, blur, S-shaped LUT, stronger noise."""
    shift = site.shift
    assert shift is not None
    # JPEG 2000 (openjpeg, 6 resolution levels) needs at least 32 pixels a side.
    native = min(image_size, max(32, round(image_size * shift.native_fraction)))
    att = _radiograph(rng, native, nodule)
    if shift.blur > 0:
        att = ndimage.gaussian_filter(att, shift.blur)
    lo, hi = (
        _logistic(0.0, shift.lut_center, shift.lut_slope),
        _logistic(1.0, shift.lut_center, shift.lut_slope),
    )
    lut = (_logistic(att, shift.lut_center, shift.lut_slope) - lo) / (hi - lo)
    gain = site.gain * rng.uniform(0.95, 1.05)
    value = site.offset + gain * lut**site.gamma
    value = value + rng.normal(0, site.noise, att.shape)
    top = 2**_BITS - 1
    return np.clip(np.round(value * top), 0, top).astype(np.uint16)


def _site_pixels(
    rng: np.random.Generator, site: _Site, image_size: int, nodule: tuple | None
) -> np.ndarray:
    """Stored pixels of one study as ``site``'s scanner makes them."""
    if site.shift is not None:
        return _to_stored_shifted(rng, site, image_size, nodule)
    return _to_stored(_radiograph(rng, image_size, nodule), site, rng)


def _nodule_site(rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A nodule centre well inside one lung, with radius and contrast."""
    if rng.random() < 0.5:
        x, y = -0.37 + rng.uniform(-0.12, 0.12), -0.02 + rng.uniform(-0.35, 0.3)
    else:
        x, y = 0.38 + rng.uniform(-0.1, 0.1), rng.uniform(-0.35, 0.1)
    return (x, y, rng.uniform(0.06, 0.11), rng.uniform(0.14, 0.3))


@dataclass
class _Study:
    patient: int
    study: int
    label: str
    accession: str
    study_uid: str
    study_date: str
    transfer_syntax: UID
    monochrome1: bool
    rel_path: str


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    patient: dict,
    study: _Study,
    site: _Site,
    seed: int,
    tag: str,
) -> None:
    """One radiograph as a DICOM file with realistic (fake) identifying headers."""
    sop_uid = _uid(seed, tag, "sop", study.patient, study.study)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = site.sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = site.sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = patient["study_time"]
    ds.AccessionNumber = study.accession
    ds.Modality = site.modality
    if site.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "MEDTL PHANTOM"
    ds.InstitutionName = site.institution
    ds.StationName = site.station
    ds.ReferringPhysicianName = patient["referrer"]
    ds.StudyDescription = "XR CHEST PA"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["mrn"]
    ds.PatientBirthDate = patient["birth_date"]
    ds.PatientSex = patient["sex"]
    age = int(study.study_date[:4]) - int(patient["birth_date"][:4])
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = _uid(seed, tag, "series", study.patient, study.study)
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.4 * 2048 / pixels.shape[0]] * 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if study.monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS
    ds.HighBit = _BITS - 1
    ds.PixelRepresentation = 0
    top = 2**_BITS - 1
    # MONOCHROME1: the file stores "higher = darker"; the reader must invert it back.
    stored = (top - pixels) if study.monochrome1 else pixels
    center, width = float(np.median(pixels)), float(np.percentile(pixels, 99.5) - pixels.min())
    if study.monochrome1:
        center = top - center
    ds.WindowCenter, ds.WindowWidth = round(center, 1), round(max(width, 1.0), 1)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ts = study.transfer_syntax
    if ts.is_compressed:
        ds.compress(ts, stored.astype(np.uint16), generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = ts
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _make_patients(
    rng: np.random.Generator,
    n: int,
    seed: int,
    tag: str,
    mrn_pool: set[str],
    site: _Site | None = None,
) -> list[dict]:
    """Fake patient identities and per-study labels (most patients keep one label); every
    patient at ``site`` when given, else at site A or B at random."""
    n_pos = max(1, round(_POSITIVE_FRACTION * n)) if n > 1 else 0
    positive = set(rng.permutation(n)[:n_pos].tolist())
    patients = []
    for i in range(n):
        sex = "F" if rng.random() < 0.5 else "M"
        while True:
            mrn = f"MRN{int(rng.integers(1_000_000, 9_999_999))}"
            if mrn not in mrn_pool:
                mrn_pool.add(mrn)
                break
        n_studies = int(rng.integers(1, 5))
        pos = i in positive
        labels = ["nodule" if pos else "normal"] * n_studies
        if pos and n_studies > 1 and rng.random() < 0.2:
            labels[0] = "normal"  # an earlier study before the nodule appeared
        patients.append(
            {
                "index": i,
                "name": f"{rng.choice(_LAST)}^{rng.choice(_FIRST[sex])}",
                "mrn": mrn,
                "birth_date": _date(rng, 1932, 1992),
                "sex": sex,
                # The draw stays in this place in the stream: source outputs must not move.
                "site": site or (_SITES[0] if rng.random() < 0.55 else _SITES[1]),
                "referrer": f"{rng.choice(_LAST)}^{rng.choice(_FIRST['M' if rng.random() < 0.5 else 'F'])}^^DR",
                "study_time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
                "labels": labels,
                "nodule": _nodule_site(rng) if pos else None,
                "tag": tag,
            }
        )
    return patients


def _write_2d_set(
    out_dir: Path,
    tree: Path,
    patients: list[dict],
    image_size: int,
    seed: int,
    tag: str,
    rng: np.random.Generator,
    acc_pool: set[str],
    monochrome1_fraction: float = _MONOCHROME1_FRACTION,
) -> pd.DataFrame:
    """Write every study of ``patients`` under ``tree``; return the manifest rows."""
    plan: list[tuple[dict, _Study]] = []
    for p in patients:
        p_dir = tree / _hex(rng)
        dates = sorted(_date(rng, 2015, 2021) for _ in p["labels"])
        for s, label in enumerate(p["labels"]):
            while True:
                acc = f"ACC{int(rng.integers(10_000_000, 99_999_999))}"
                if acc not in acc_pool:
                    acc_pool.add(acc)
                    break
            name = f"IM{s + 1:04d}" + (".dcm" if rng.random() < 0.3 else "")
            rel = (p_dir / _hex(rng) / _hex(rng) / name).relative_to(out_dir).as_posix()
            study = _Study(
                patient=p["index"],
                study=s,
                label=label,
                accession=acc,
                study_uid=_uid(seed, tag, "study", p["index"], s),
                study_date=dates[s],
                transfer_syntax=ExplicitVRLittleEndian,
                monochrome1=False,
                rel_path=rel,
            )
            plan.append((p, study))
    # Quotas rather than coin flips, so even a tiny set holds every syntax and MONOCHROME1.
    n = len(plan)
    syntaxes = [DEMO_TRANSFER_SYNTAXES[i % len(DEMO_TRANSFER_SYNTAXES)] for i in range(n)]
    mono1 = np.zeros(n, bool)
    mono1[: max(1, round(monochrome1_fraction * n))] = True
    order_ts, order_m1 = rng.permutation(n), rng.permutation(n)
    rows = []
    for k, (p, study) in enumerate(plan):
        study.transfer_syntax = syntaxes[order_ts[k]]
        study.monochrome1 = bool(mono1[order_m1[k]])
        img_rng = np.random.default_rng([seed, 7, len(tag), p["index"], study.study])
        nodule = None
        if study.label == "nodule":
            nx, ny, r, c = p["nodule"]
            grow = 1.0 + 0.08 * study.study
            nodule = (nx, ny, r * grow, c)
        pixels = _site_pixels(img_rng, p["site"], image_size, nodule)
        _write_dicom(out_dir / study.rel_path, pixels, p, study, p["site"], seed, tag)
        rows.append(
            {
                "image": study.rel_path,
                "label": study.label,
                "patient_id": pseudonymize(p["mrn"], DEMO_SALT),
                "study_id": pseudonymize(study.study_uid, DEMO_SALT, prefix="S-"),
                "site": p["site"].name,
                "sex": p["sex"],
                "modality": p["site"].modality,
                "_accession": study.accession,
            }
        )
    return pd.DataFrame(rows)


def _ct_volume(rng: np.random.Generator, shape: tuple[int, int, int], lesion: bool) -> np.ndarray:
    """A CT-like chest volume in HU (air, body, two lungs, spine, optional lung lesion)."""
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    vol = np.full(shape, -1000.0)
    body = (i / 0.9) ** 2 + (j / 0.7) ** 2 <= 1
    vol[body] = 40.0
    for cx in (-0.42, 0.42):
        lung = ((i - cx) / 0.33) ** 2 + (j / 0.5) ** 2 + (k / 1.2) ** 2 <= 1
        vol[lung] = -850.0
    spine = (i / 0.12) ** 2 + ((j - 0.5) / 0.12) ** 2 <= 1
    vol[spine] = 450.0
    vol += rng.normal(0, 20, shape)
    if lesion:
        cx = (-0.42 if rng.random() < 0.5 else 0.42) + rng.uniform(-0.1, 0.1)
        cj, ck = rng.uniform(-0.2, 0.2), rng.uniform(-0.5, 0.5)
        r = rng.uniform(0.15, 0.25)
        ball = ((i - cx) / r) ** 2 + ((j - cj) / r) ** 2 + ((k - ck) / (2 * r)) ** 2 <= 1
        vol[ball] = rng.uniform(10, 60) + rng.normal(0, 20, int(ball.sum()))
    return np.clip(np.round(vol), -1024, 3071).astype(np.int16)


def _write_3d_set(root: Path, n: int, seed: int, rng: np.random.Generator) -> pd.DataFrame:
    """CT-like NIfTI volumes (32x32x16, 1.2x1.2x2.5 mm, RAS) and their manifest rows."""
    import nibabel as nib

    nifti_dir = root / "nifti"
    nifti_dir.mkdir(parents=True, exist_ok=True)
    n_pos = max(1, n // 2)
    positive = set(rng.permutation(n)[:n_pos].tolist())
    spacing = (1.2, 1.2, 2.5)
    shape = (32, 32, 16)
    rows = []
    for p in range(n):
        lesion = p in positive
        vol = _ct_volume(np.random.default_rng([seed, 3, p]), shape, lesion)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = [-(s - 1) * sp / 2 for s, sp in zip(shape, spacing, strict=True)]
        img = nib.Nifti1Image(vol, affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        rel = f"nifti/ct_{p + 1:03d}.nii.gz"
        nib.save(img, root / rel)
        rows.append(
            {
                "image": rel,
                "label": "nodule" if lesion else "normal",
                "patient_id": pseudonymize(f"CT-{seed}-{p}", DEMO_SALT),
                "site": _SITES[p % 2].name,
                "sex": "F" if rng.random() < 0.5 else "M",
                "modality": "CT",
            }
        )
    return pd.DataFrame(rows)


def _write_junk(tree: Path) -> None:
    """Files a real export contains next to the images; scans must skip them quietly."""
    (tree / "EXPORT_LOG.TXT").write_text("export finished: 0 errors\n")
    (tree / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))


def _write_target_site(
    root: Path, n: int, image_size: int, seed: int, mrns: set[str], accessions: set[str]
) -> tuple[Path, Path, Path]:
    """The shifted site's own export: ``target/`` and its labelled and unlabelled manifests.

    Drawn from its own random stream (``[seed, _TARGET_STREAM]``) after every source output is
    written; the identifier pools only keep its MRNs and accession numbers new.
    """
    rng = np.random.default_rng([seed, _TARGET_STREAM])
    tree = root / "target"
    patients = _make_patients(rng, n, seed, "target", mrns, site=_TARGET_SITE)
    shift = _TARGET_SITE.shift
    assert shift is not None
    rows = _write_2d_set(
        root,
        tree,
        patients,
        image_size,
        seed,
        "target",
        rng,
        accessions,
        monochrome1_fraction=shift.monochrome1_fraction,
    )
    _write_junk(tree)
    labelled, unlabelled = root / "target_manifest.csv", root / "target_unlabelled.csv"
    rows = rows.drop(columns="_accession")
    rows.to_csv(labelled, index=False)
    rows.drop(columns="label").to_csv(unlabelled, index=False)
    return tree, labelled, unlabelled


def _write_info(
    root: Path, n_patients: int, image_size: int, seed: int, target_patients: int
) -> None:
    """``demo_info.json``: how the dataset was made (no identifiers)."""
    info = {
        "generator": "medtl.demo_data.make_demo_data",
        "n_patients": n_patients,
        "image_size": image_size,
        "seed": seed,
        "classes": list(DEMO_CLASSES),
        "pseudonym_salt": DEMO_SALT,
        "note": "synthetic phantoms; every name, ID, date and UID is fake",
    }
    if target_patients:  # only then, so a demo without site C keeps its old info file
        info["target_patients"] = target_patients
        info["target_site"] = _TARGET_SITE.name
    (root / "demo_info.json").write_text(json.dumps(info, indent=2) + "\n")


def make_demo_data(
    out_dir: str | Path,
    n_patients: int = 40,
    image_size: int = 96,
    seed: int = 0,
    with_3d: bool = True,
    n_holdout: int = 8,
    n_3d: int = 12,
    target_patients: int = 30,
) -> DemoData:
    """Write the demo dataset under ``out_dir``; same seed and sizes give the same bytes.

    Args:
        out_dir: folder to create (existing demo files in it are overwritten).
        n_patients: patients in the 2D training manifest (1-4 studies each).
        image_size: side of the square radiographs in pixels.
        seed: controls every random choice, identity and UID.
        with_3d: also write NIfTI CT-like volumes and ``manifest_3d.csv``.
        n_holdout: extra patients (separate files and manifest) for evaluate/predict.
        n_3d: patients (one volume each) in the 3D manifest.
        target_patients: patients of the shifted site C (its own export and manifests, see
            the module docstring); 0 writes none. It never changes the other outputs.

    Returns:
        The paths of the dataset, see :class:`DemoData`.
    """
    if n_patients < 2 or image_size < 32 or target_patients < 0 or target_patients == 1:
        raise ValueError(
            f"make_demo_data needs n_patients >= 2, image_size >= 32 and target_patients 0 "
            f"(none) or >= 2, got n_patients={n_patients}, image_size={image_size}, "
            f"target_patients={target_patients}"
        )
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mrns: set[str] = set()
    accessions: set[str] = set()

    dicom_dir = root / "dicom"
    train_patients = _make_patients(rng, n_patients, seed, "train", mrns)
    train = _write_2d_set(
        root, dicom_dir, train_patients, image_size, seed, "train", rng, accessions
    )
    _write_junk(dicom_dir)
    manifest_csv = root / "manifest.csv"
    train.drop(columns="_accession").to_csv(manifest_csv, index=False)
    labels_csv = root / "labels.csv"
    labels = train.rename(columns={"_accession": "AccessionNumber"})
    labels[["AccessionNumber", "label", "site"]].to_csv(labels_csv, index=False)

    holdout_dir = root / "holdout"
    holdout_patients = _make_patients(rng, max(n_holdout, 2), seed, "holdout", mrns)
    holdout = _write_2d_set(
        root, holdout_dir, holdout_patients, image_size, seed, "holdout", rng, accessions
    )
    holdout_csv = root / "holdout_manifest.csv"
    holdout.drop(columns="_accession").to_csv(holdout_csv, index=False)

    manifest_3d_csv = nifti_dir = None
    if with_3d:
        vols = _write_3d_set(root, n_3d, seed, rng)
        manifest_3d_csv = root / "manifest_3d.csv"
        vols.to_csv(manifest_3d_csv, index=False)
        nifti_dir = root / "nifti"

    target: tuple[Path, Path, Path] | tuple[None, None, None] = (None, None, None)
    if target_patients:
        target = _write_target_site(root, target_patients, image_size, seed, mrns, accessions)

    _write_info(root, n_patients, image_size, seed, target_patients)
    return DemoData(
        root=root,
        dicom_dir=dicom_dir,
        manifest_csv=manifest_csv,
        labels_csv=labels_csv,
        holdout_dicom_dir=holdout_dir,
        holdout_manifest_csv=holdout_csv,
        manifest_3d_csv=manifest_3d_csv,
        nifti_dir=nifti_dir,
        target_dicom_dir=target[0],
        target_manifest_csv=target[1],
        target_unlabelled_csv=target[2],
    )


def demo_phi_values(demo: DemoData, min_length: int = 6) -> set[str]:
    """Every identifying header value written into the demo DICOM files (for PHI-leak tests).

    Values shorter than ``min_length`` and digit-only values shorter than a date (times such
    as "093012") are left out: they would match by chance in any text and prove nothing.
    """
    import pydicom

    values: set[str] = set()
    trees = (demo.dicom_dir, demo.holdout_dicom_dir, demo.target_dicom_dir)
    for tree in (t for t in trees if t is not None):
        for path in sorted(tree.rglob("*")):
            if not path.is_file() or path.name.startswith(".") or path.suffix == ".TXT":
                continue
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            values |= identifying_values(ds)
    # Pure digit strings shorter than a date (times) would also match inside any long number.
    return {v for v in values if len(v) >= min_length and (len(v) >= 8 or not v.isdigit())}
