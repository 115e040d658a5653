"""DICOM files (single images and multi-frame) -> ``LoadedImage``, using pydicom's pixel code.

Decoding, colour conversion, palettes and the modality LUT are pydicom's own functions;
medtl only picks the fastest installed decoder, orders the steps, and turns every failure
into ``UnreadableImageError(path, reason)`` with a one-line reason.

Steps per file: decode (YBR_FULL/YBR_FULL_422 become RGB once, inside pydicom) ->
palette -> RGB through the palette -> grey: modality LUT (RescaleSlope/Intercept, Modality
LUT Sequence, or the enhanced multi-frame functional groups) -> MONOCHROME1 inverted as
``lo + hi - x`` where ``[lo, hi]`` is the stored range after the modality LUT.
VOI windowing is never applied here; the file's first window is reported in the metadata.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.uid as dcm_uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space, get_decoder
from pydicom.pixels.utils import as_pixel_options, get_nr_frames

from medtl.errors import UnreadableImageError
from medtl.io.base import DEFAULT_POLICY, ImageMeta, LoadedImage, ReadPolicy, affine_tuple
from medtl.io.contract import check_pixel_budget, reader
from medtl.io.geometry import GeometryError, slice_normal, sort_slices, volume_affine


def _syntax_table() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for uid in dcm_uid.JPEGLSTransferSyntaxes:
        table[uid] = ("pyjpegls", "pylibjpeg")  # pyjpegls (CharLS) ~4x faster than libjpeg
    for uid in dcm_uid.RLETransferSyntaxes:
        table[uid] = ("pylibjpeg", "pydicom")  # pylibjpeg-rle (Rust) before pure numpy
    for uid in dcm_uid.JPEGTransferSyntaxes:
        table[uid] = ("pylibjpeg", "pillow")  # libjpeg handles 12-bit and lossless
    for uid in dcm_uid.JPEG2000TransferSyntaxes:
        table[uid] = ("pylibjpeg", "pillow")  # openjpeg
    return table


#: Decoding plugins per compressed transfer syntax, fastest first. The first installed one
#: is tried; if it fails, pydicom tries every available plugin. The single place to tune.
DECODER_PREFERENCE: dict[str, tuple[str, ...]] = _syntax_table()

_REQUIRED_PIXEL_ATTRS = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class DecodedPixels:
    """Pixels of one DICOM file, ``(frames, rows, cols, samples)`` float32, ready to use."""

    frames: np.ndarray
    photometric_interpretation: str
    window_center: float | None
    window_width: float | None
    rescale_applied: bool
    stored_dtype: str
    transfer_syntax: str


def is_dicom(path: str | Path) -> bool:
    """True when the file has the DICOM Part 10 preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_dicom_header(path: str | Path) -> Dataset:
    """Read a DICOM header without the pixel data (fast; for manifest scans).

    The returned pydicom ``Dataset`` holds identifying values: keep it inside the scan
    code and never log or export it.

    Raises:
        UnreadableImageError: not a DICOM file or a corrupt header.
    """
    return read_dataset(path, stop_before_pixels=True)


def choose_decoding_plugin(transfer_syntax: str) -> str:
    """The preferred installed plugin for ``transfer_syntax`` ("" = let pydicom choose)."""
    prefs = DECODER_PREFERENCE.get(transfer_syntax, ())
    if not prefs:
        return ""
    available = set(get_decoder(transfer_syntax).available_plugins)
    return next((p for p in prefs if p in available), "")


@reader
def load_dicom(path: str | Path, policy: ReadPolicy = DEFAULT_POLICY) -> LoadedImage:
    """Load one DICOM file: ``(C, rows, cols)`` or, multi-frame, ``(C, frames, rows, cols)``.

    Multi-frame files with per-frame positions (enhanced CT/MR, RT dose grids) are sorted
    along the slice normal and get a RAS affine; others keep file order without affine.

    Raises:
        UnreadableImageError: the file cannot be read or decoded, its header is absurd or
            refused by ``policy`` (burned-in annotation); ``reason`` says why.
    """
    ds = read_dataset(path)
    decoded = decode_pixels(ds, path, policy)
    frames = decoded.frames
    n_frames = frames.shape[0]
    spacing2d = pixel_spacing(ds)
    affine = None
    if n_frames == 1:
        array = np.ascontiguousarray(np.moveaxis(frames[0], -1, 0))
        spacing: tuple[float, ...] = spacing2d
        spatial_dims = 2
    else:
        geometry = _frame_geometry(ds, n_frames)
        step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
        if geometry is not None:
            orientation, first_pos, stack = geometry
            frames = frames[stack.order]
            step = stack.step
            affine = volume_affine(orientation, first_pos, spacing2d, step, stack.normal)
        array = np.ascontiguousarray(np.moveaxis(frames, -1, 0))
        spacing = (step, *spacing2d)
        spatial_dims = 3
    meta = build_meta(ds, decoded, path, "DICOM", array, spacing, spatial_dims, n_frames, affine)
    return LoadedImage(array, meta)


def decode_pixels(
    ds: Dataset, path: str | Path, policy: ReadPolicy = DEFAULT_POLICY
) -> DecodedPixels:
    """Check the header against ``policy``, then decode, colour-convert and apply the
    modality LUT (and MONOCHROME1 inversion)."""
    ts = _check_decodable(ds, path)
    n_frames = frame_count(ds, path)
    check_header(ds, path, policy, n_frames, ts)
    arr, pi = _decode(ds, ts, path)
    stored_dtype = str(arr.dtype.newbyteorder("="))
    rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel)
    try:
        if pi == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        elif pi.startswith("YBR"):
            # pydicom already turned YBR_FULL(_422) into RGB during decoding; this is only
            # for what it leaves (YBR_PARTIAL_*), so nothing is converted twice.
            arr = convert_color_space(arr, pi, "RGB")
    except (ValueError, NotImplementedError, AttributeError, KeyError) as err:
        raise UnreadableImageError(path, f"cannot convert {pi} to RGB: {_short(err)}") from err
    samples = arr.shape[-1] if arr.ndim == (4 if n_frames > 1 else 3) else 1
    arr = arr.reshape(n_frames, rows, cols, samples)
    center, width = _window(ds)
    rescaled = False
    if samples == 1 and spp == 1:
        arr, rescaled = _modality_lut(arr, ds, n_frames)
        arr = arr.astype(np.float32, copy=False)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            lo, hi = _stored_range(ds)
            arr = (lo + hi) - arr
            if center is not None:
                center = lo + hi - center
    return DecodedPixels(
        frames=arr.astype(np.float32, copy=False),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "")),
        window_center=center,
        window_width=width,
        rescale_applied=rescaled,
        stored_dtype=stored_dtype,
        transfer_syntax=ts.name,
    )


def pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(row spacing, column spacing) in mm: PixelSpacing, ImagerPixelSpacing, or 1.0."""
    for source in (ds, _fg_item(ds, "PixelMeasuresSequence")):
        if source is None:
            continue
        for key in ("PixelSpacing", "ImagerPixelSpacing"):
            value = source.get(key)
            if value is not None and len(value) == 2:
                return (float(value[0]), float(value[1]))
    return (1.0, 1.0)


# ------------------------------------------ helpers (the first three are shared with series.py)


def read_dataset(path: str | Path, stop_before_pixels: bool = False) -> Dataset:
    """``pydicom.dcmread`` with every failure turned into ``UnreadableImageError``."""
    p = Path(path)
    if not p.is_file():
        raise UnreadableImageError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Part 10 files without the 128-byte preamble exist in old archives; accept
            # them only when the name says DICOM, never for arbitrary files.
            force = p.suffix.lower() in (".dcm", ".dicom") and not is_dicom(p)
            return pydicom.dcmread(p, stop_before_pixels=stop_before_pixels, force=force)
    except InvalidDicomError as err:
        raise UnreadableImageError(path, "not a DICOM file (no 'DICM' preamble)") from err
    except (EOFError, OSError) as err:
        raise UnreadableImageError(path, f"truncated or unreadable file ({_short(err)})") from err
    except Exception as err:  # pydicom raises many types for corrupt headers
        raise UnreadableImageError(path, f"corrupt DICOM header: {_short(err)}") from err


def _short(err: BaseException) -> str:
    """First line of an exception message, without pydicom's advice tail."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split(" - ", 1)[0].rstrip(":. ")
    return text[:200]


def _check_decodable(ds: Dataset, path: str | Path) -> dcm_uid.UID:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        kind = ds.get("SOPClassUID")
        # Only standard SOP class names are shown; an unknown class would print its UID.
        known = kind is not None and kind.name != str(kind)
        what = f" ({kind.name})" if known else ""
        raise UnreadableImageError(path, f"no pixel data: not an image{what}")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not ts:
        raise UnreadableImageError(path, "file meta information has no Transfer Syntax UID")
    missing = [k for k in _REQUIRED_PIXEL_ATTRS if k not in ds]
    if missing:
        raise UnreadableImageError(path, f"missing required pixel attribute(s): {missing}")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as err:
        raise UnreadableImageError(
            path, f"transfer syntax '{ts.name}' is not supported by pydicom"
        ) from err
    if not decoder.is_available:
        raise UnreadableImageError(
            path,
            f"no decoder installed for '{ts.name}'; install one of the plugins pydicom lists "
            "for it (pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls)",
        )
    return ts


def check_burned_in(ds: Dataset, path: str | Path, policy: ReadPolicy) -> None:
    """Refuse a file whose header says its pixels carry burned-in annotation, unless allowed:
    names and dates drawn into the pixels pass every header whitelist and text search."""
    if policy.burned_in_annotation == "allow":
        return
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise UnreadableImageError(
            path,
            "BurnedInAnnotation (0028,0301) is YES: the pixels may show identifying text, so "
            "the image is left out; set data.burned_in_annotation=allow (predict: "
            "--allow-burned-in) to use such images",
        )


def check_header(
    ds: Dataset, path: str | Path, policy: ReadPolicy, n_frames: int, ts: dcm_uid.UID
) -> None:
    """Refuse an absurd or policy-refused header before decoding allocates anything: an
    empty or oversized image, or uncompressed pixel data shorter than the header says."""
    check_burned_in(ds, path, policy)
    rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel)
    check_pixel_budget(path, (n_frames, rows, cols, spp), policy, "DICOM header")
    data = ds.get("PixelData")
    if ts in dcm_uid.JPEG2000TransferSyntaxes and isinstance(data, bytes):
        _check_jp2_boxes(data, path, n_frames)
    if ts.is_encapsulated or not isinstance(data, bytes):
        return
    if str(ds.get("PhotometricInterpretation", "")).startswith("YBR_FULL_422"):
        return  # subsampled: pydicom knows its length rule
    bits = int(ds.BitsAllocated)
    need = (n_frames * rows * cols * spp * bits + 7) // 8
    if len(data) < need:
        raise UnreadableImageError(
            path,
            f"pixel data is {len(data):,} bytes but the header ({rows}x{cols}, "
            f"{n_frames} frame(s), {spp} sample(s), {bits} bits) needs {need:,}: truncated?",
        )


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


def _check_jp2_boxes(pixel_data: bytes, path: str | Path, n_frames: int) -> None:
    """Refuse a JPEG 2000 frame whose JP2 box list pydicom cannot walk: it adds each box's
    length to find the codestream (``pixels.utils.get_j2k_parameters``), so a box of length 0
    before the ``jp2c`` box loops forever, a hang no ``except`` can stop. Mirrors that walk."""
    from pydicom.encaps import generate_frames

    for index, frame in enumerate(generate_frames(pixel_data, number_of_frames=n_frames)):
        if not frame.startswith(_JP2_SIGNATURE):
            continue
        offset = 12
        while offset < len(frame):
            if frame[offset + 4 : offset + 8] == b"jp2c":
                break
            length = int.from_bytes(frame[offset : offset + 4], "big")
            if length == 0:
                raise UnreadableImageError(
                    path,
                    f"JPEG 2000 frame {index + 1}: a JP2 box of length 0 at byte {offset} before "
                    "the codestream (corrupt file; the decoder would never finish)",
                )
            offset += length


def frame_count(ds: Dataset, path: str | Path) -> int:
    """NumberOfFrames (1 when absent); a malformed value is an ``UnreadableImageError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return max(int(get_nr_frames(ds, warn=False)), 1)
    except (ValueError, TypeError) as err:
        raise UnreadableImageError(path, f"invalid NumberOfFrames value ({_short(err)})") from err


def _decode(ds: Dataset, ts: dcm_uid.UID, path: str | Path) -> tuple[np.ndarray, str]:
    """Decode with the preferred plugin, then any; return the array and its colour space."""
    decoder = get_decoder(ts)
    plugins = [choose_decoding_plugin(ts)]
    if plugins[0]:
        plugins.append("")  # fall back to every available plugin
    error: BaseException | None = None
    for plugin in plugins:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opts = as_pixel_options(ds)
                # raw=False: pydicom converts YBR_FULL(_422) to RGB exactly once and says
                # so in `changes`; as_rgb stays at its default (True).
                arr, changes = decoder.as_array(
                    ds, validate=True, raw=False, decoding_plugin=plugin, **opts
                )
        except Exception as err:  # decoders raise RuntimeError/ValueError/plugin-specific
            error = err
            continue
        pi = str(changes.get("photometric_interpretation", ds.PhotometricInterpretation))
        return arr, pi
    assert error is not None
    reason = _short(error)
    if "all available plugins" in str(error):
        details = [ln.strip() for ln in str(error).splitlines()[1:] if ln.strip()]
        reason = details[0] if details else reason
    raise UnreadableImageError(path, f"cannot decode {ts.name} pixel data: {reason[:200]}")


def _fg_item(ds: Dataset, sequence: str, frame: int = 0) -> Dataset | None:
    """The functional-group item ``sequence`` for ``frame``: per-frame first, then shared."""
    for group, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(group)
        if items and len(items) > index:
            inner = items[index].get(sequence)
            if inner:
                return inner[0]
    return None


def _modality_lut(arr: np.ndarray, ds: Dataset, n_frames: int) -> tuple[np.ndarray, bool]:
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        if "ModalityLUTSequence" not in ds:
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
            if slope == 1.0 and intercept == 0.0:
                return arr, False
        return apply_modality_lut(arr, ds), True
    # Enhanced multi-frame keeps slope/intercept in functional groups, which
    # apply_modality_lut does not read; apply them per frame.
    params = []
    for i in range(n_frames):
        item = _fg_item(ds, "PixelValueTransformationSequence", i)
        if item is None:
            params.append((1.0, 0.0))
        else:
            params.append(
                (float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0)))
            )
    if all(p == (1.0, 0.0) for p in params):
        return arr, False
    slopes = np.array([p[0] for p in params]).reshape(-1, 1, 1, 1)
    intercepts = np.array([p[1] for p in params]).reshape(-1, 1, 1, 1)
    return arr * slopes + intercepts, True


def _stored_range(ds: Dataset) -> tuple[float, float]:
    """The representable stored range, mapped through the modality LUT."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)):
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    else:
        ends = np.array([0, 2**bits - 1], dtype=np.int64)
    mapped, _ = _modality_lut(ends.reshape(1, 1, 1, 2), ds, 1)
    return float(np.min(mapped)), float(np.max(mapped))


def _window(ds: Dataset) -> tuple[float | None, float | None]:
    source = ds if "WindowCenter" in ds else _fg_item(ds, "FrameVOILUTSequence")
    if source is None:
        return None, None

    def first(key: str) -> float | None:
        value = source.get(key)
        if value is None or value == "":
            return None
        try:
            return float(value[0] if isinstance(value, MultiValue) else value)
        except (TypeError, ValueError):
            return None

    return first("WindowCenter"), first("WindowWidth")


def _frame_geometry(ds: Dataset, n_frames: int):
    """(orientation, first position, SliceStack) for multi-frame files, or None."""
    try:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and len(per_frame) == n_frames:
            positions, orientations = [], []
            for i in range(n_frames):
                pos = _fg_item(ds, "PlanePositionSequence", i)
                ori = _fg_item(ds, "PlaneOrientationSequence", i)
                if pos is None or ori is None:
                    return None
                positions.append(np.asarray(pos.ImagePositionPatient, dtype=float))
                orientations.append(np.asarray(ori.ImageOrientationPatient, dtype=float))
        elif "GridFrameOffsetVector" in ds and "ImagePositionPatient" in ds:
            # RT dose grids: frame k lies at ImagePositionPatient + offset[k] * normal.
            orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
            normal = slice_normal(orientation)
            offsets = np.asarray(ds.GridFrameOffsetVector, dtype=float)
            if len(offsets) != n_frames:
                return None
            origin = np.asarray(ds.ImagePositionPatient, dtype=float)
            positions = [origin + off * normal for off in offsets]
            orientations = [orientation] * n_frames
        else:
            return None
        stack = sort_slices(orientations, positions)
    except (GeometryError, AttributeError, ValueError, TypeError):
        return None
    return orientations[0], positions[stack.order[0]], stack


def build_meta(
    ds: Dataset,
    decoded: DecodedPixels,
    source: str | Path,
    fmt: str,
    array: np.ndarray,
    spacing: tuple[float, ...],
    spatial_dims: int,
    n_frames: int,
    affine: np.ndarray | None,
) -> ImageMeta:
    """The whitelisted, non-identifying metadata of a decoded DICOM image."""
    bits = ds.get("BitsStored")
    return ImageMeta(
        source=str(source),
        format=fmt,
        spatial_dims=spatial_dims,
        shape=tuple(int(s) for s in array.shape),
        spacing=tuple(float(s) for s in spacing),
        affine=affine_tuple(affine),
        modality=str(ds.get("Modality")) if ds.get("Modality") else None,
        photometric_interpretation=decoded.photometric_interpretation or None,
        n_frames=n_frames,
        window_center=decoded.window_center,
        window_width=decoded.window_width,
        bits_stored=int(bits) if bits is not None else None,
        rescale_applied=decoded.rescale_applied,
        transfer_syntax=decoded.transfer_syntax,
        stored_dtype=decoded.stored_dtype,
    )
