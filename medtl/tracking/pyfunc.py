"""The MLflow pyfunc flavour of a medtl bundle: what a logged or served model takes and gives.

Input: a table, one image per row (a DataFrame, a dict of columns each holding one value per
row, a list of row dicts, or a list of path strings), each row giving one of:

- ``path`` (or ``image``, as ``medtl predict`` writes it): a DICOM file, a DICOM series folder,
  a NIfTI or a PNG/JPEG file on the machine that serves the model;
- ``b64``: the base64 of a file's bytes: DICOM (any transfer syntax the logged decoders read),
  PNG/JPEG, NIfTI ``.nii`` or gzipped ``.nii.gz``; the format is recognised from the bytes;
- ``array``: a raw image as ``medtl.load_image(path).array`` gives it, in the modality's units
  (higher = brighter): channel first, ``(C, H, W)``, or ``(H, W)`` for grey; volumes (2.5D/3D
  models) ``(C, D, H, W)`` or ``(D, H, W)``. It goes through the bundle's deterministic
  transforms after the file reader (window, resize, pad, channels, normalisation); it carries
  no file window or affine, so give volumes in the model's orientation.

Output: one row per input row, in order: ``image`` (the path, or ``b64[i]`` / ``array[i]``),
``prob_<class>``..., ``pred`` and ``error``: None, or why that row could not be read. A bad
row never fails the request; the other rows are still predicted.

Logged "from code" (see ``medtl.tracking.model_package``), so nothing is pickled; the bundle is
the ``bundle`` artifact and is loaded from safetensors.
"""

from __future__ import annotations

import base64
import binascii
import math
import tempfile
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medtl.bundle import Bundle, load_bundle
from medtl.errors import MedtlError
from medtl.inference import predict
from medtl.tracking.store import import_mlflow

if TYPE_CHECKING:
    from mlflow.pyfunc import PythonModel
else:  # mlflow is imported only through import_mlflow (offline environment first)
    PythonModel = import_mlflow().pyfunc.PythonModel

__all__ = ["INPUT_COLUMNS", "MedtlPyfunc", "predict_rows", "sniff_suffix"]

#: Input columns a row may fill (one per row; ``b64`` wins over ``array`` over a path).
INPUT_COLUMNS = ("path", "image", "b64", "array")
_VOLUME_PRESETS = ("ct_2p5d", "ct_3d")
_NIFTI1_MAGIC = (b"n+1\x00", b"ni1\x00")  # at byte 344
_NIFTI2_MAGIC = (b"n+2\x00", b"ni2\x00")  # at byte 4


def sniff_suffix(data: bytes) -> str | None:
    """The file ending for these bytes (``.dcm``, ``.png``, ``.jpg``, ``.nii``, ``.nii.gz``).

    None when no reader recognises them. Gzip is taken to be NIfTI, the one gzipped format
    the readers open.
    """
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if data[128:132] == b"DICM":
        return ".dcm"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if data[344:348] in _NIFTI1_MAGIC or data[4:8] in _NIFTI2_MAGIC:
        return ".nii"
    return None


@dataclass
class _Row:
    """One input row resolved to a file to read (``path``) or the reason it cannot be."""

    display: str
    path: Path | None = None
    is_array: bool = False
    error: str | None = None


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def _b64_row(i: int, value: Any, tmp: Path) -> _Row:
    display = f"b64[{i}]"
    try:
        data = base64.b64decode("".join(str(value).split()), validate=True)
    except (binascii.Error, ValueError) as err:
        return _Row(display, error=f"b64 is not valid base64 ({err})")
    suffix = sniff_suffix(data)
    if suffix is None:
        return _Row(
            display,
            error="b64 bytes are no known image format: expected DICOM (DICM preamble), "
            "PNG, JPEG or NIfTI (.nii, .nii.gz)",
        )
    path = tmp / f"input_{i}{suffix}"
    path.write_bytes(data)
    return _Row(display, path=path)


def _array_row(i: int, value: Any, tmp: Path, dims: int) -> _Row:
    display = f"array[{i}]"
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as err:
        return _Row(display, error=f"array is not a numeric (nested) list ({err})"[:300])
    if arr.ndim == dims:
        arr = arr[None]
    if arr.ndim != dims + 1 or min(arr.shape) < 1:
        want = "(H, W) or (C, H, W)" if dims == 2 else "(D, H, W) or (C, D, H, W)"
        return _Row(display, error=f"array has shape {tuple(arr.shape)}; this model takes {want}")
    if not np.isfinite(arr).all():
        return _Row(display, error="array holds NaN or infinite values")
    path = tmp / f"input_{i}.npy"
    np.save(path, arr, allow_pickle=False)
    return _Row(display, path=path, is_array=True)


def _resolve_row(i: int, rec: Mapping[str, Any], tmp: Path, dims: int) -> _Row:
    if _present(rec.get("b64")):
        return _b64_row(i, rec["b64"], tmp)
    if rec.get("array") is not None and not (
        isinstance(rec["array"], float) and math.isnan(rec["array"])
    ):
        return _array_row(i, rec["array"], tmp, dims)
    for col in ("path", "image"):
        if _present(rec.get(col)):
            return _Row(str(rec[col]), path=Path(str(rec[col])))
    return _Row(f"row[{i}]", error=f"row gives none of the input columns {list(INPUT_COLUMNS)}")


def _as_records(model_input: Any) -> list[dict[str, Any]]:
    """Rows of a DataFrame, a dict of columns (each a list, one value per row) or of one row's
    values, a list of row dicts, or a list of paths."""
    if isinstance(model_input, pd.DataFrame):
        return [{str(k): v for k, v in r.items()} for r in model_input.to_dict("records")]
    if isinstance(model_input, Mapping):
        cols = {str(k): v for k, v in model_input.items()}
        if not all(isinstance(v, list | tuple | np.ndarray) for v in cols.values()):
            return [cols]  # one row's values
        lengths = {len(v) for v in cols.values()}
        if len(lengths) != 1:
            raise MedtlError(
                f"input columns differ in length: { {k: len(v) for k, v in cols.items()} }"
            )
        return [{k: v[i] for k, v in cols.items()} for i in range(lengths.pop())]
    if isinstance(model_input, list | tuple):
        if all(isinstance(v, str) for v in model_input):
            return [{"path": v} for v in model_input]
        if all(isinstance(v, Mapping) for v in model_input):
            return [{str(k): v for k, v in r.items()} for r in model_input]
    raise MedtlError(
        f"cannot read model input of type {type(model_input).__name__}: give a table "
        f"(DataFrame, dict of columns or list of rows) with one of {list(INPUT_COLUMNS)} per row"
    )


class _LoadArrayd:
    """Stands in for the file reader: ``.npy`` (channel first) -> MetaTensor (no affine)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        arr = np.load(d["image"], allow_pickle=False)
        d["image"] = MetaTensor(arr, meta={"filename_or_obj": "array", "source": "array"})
        return d


def _array_transform(bundle: Bundle) -> Any:
    """The bundle's deterministic transforms with the file reader swapped for ``_LoadArrayd``."""
    from monai.transforms import Compose

    from medtl.inference import _default_transform  # the very preprocessing predict uses
    from medtl.transforms import LoadMedtld

    ops = list(getattr(_default_transform(bundle), "transforms", ()))  # a MONAI Compose
    if not ops or not isinstance(ops[0], LoadMedtld):
        raise MedtlError("the bundle's transforms do not start with the file reader")
    return Compose([_LoadArrayd(), *ops[1:]])


def _text(value: Any) -> str | None:
    """A string cell of ``predict``'s table; missing values (None or pandas' NaN) -> None."""
    return value if isinstance(value, str) else None


def _merge(
    rows: list[_Row], results: dict[int, Mapping[Hashable, Any]], bundle: Bundle
) -> pd.DataFrame:
    out = []
    prob_cols = [f"prob_{c}" for c in bundle.classes]
    for i, row in enumerate(rows):
        rec: dict[str, Any] = {"image": row.display, **dict.fromkeys(prob_cols, np.nan)}
        rec.update(pred=None, error=row.error)
        if i in results:
            res = results[i]
            rec.update({c: res[c] for c in prob_cols}, pred=_text(res["pred"]))
            error = _text(res["error"])  # name the row in it, not a temporary file
            rec["error"] = error.replace(str(row.path), row.display) if error else None
        out.append(rec)
    table = pd.DataFrame(out, columns=["image", *prob_cols, "pred", "error"])
    for col in ("image", "pred", "error"):  # None stays None (JSON null), not NaN
        table[col] = pd.Series([rec[col] for rec in out], index=table.index, dtype=object)
    return table


def predict_rows(bundle: Bundle, model_input: Any, array_transform: Any = None) -> pd.DataFrame:
    """Predict a pyfunc input table (see the module doc): one output row per input row."""
    records = _as_records(model_input)
    dims = 3 if bundle.cfg.transforms.preset in _VOLUME_PRESETS else 2
    with tempfile.TemporaryDirectory(prefix="medtl-serve-") as tmp:
        rows = [_resolve_row(i, r, Path(tmp), dims) for i, r in enumerate(records)]
        results: dict[int, Mapping[Hashable, Any]] = {}
        for is_array in (False, True):
            idx = [i for i, r in enumerate(rows) if r.path is not None and r.is_array == is_array]
            if not idx:
                continue
            tf = (array_transform or _array_transform(bundle)) if is_array else None
            table = predict(bundle, [str(rows[i].path) for i in idx], transform=tf)
            for i, res in zip(idx, table.to_dict("records"), strict=True):
                results[i] = res
        return _merge(rows, results, bundle)


class MedtlPyfunc(PythonModel):
    """MLflow pyfunc over a medtl bundle: rows of ``path``/``b64``/``array`` -> probabilities."""

    def load_context(self, context: Any) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"])
        self._array_transform: Any = None

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        if self._array_transform is None and _has_arrays(model_input):
            self._array_transform = _array_transform(self.bundle)
        return predict_rows(self.bundle, model_input, self._array_transform)


def _has_arrays(model_input: Any) -> bool:
    if isinstance(model_input, pd.DataFrame | Mapping):
        return "array" in model_input
    return isinstance(model_input, list | tuple) and any(
        isinstance(r, Mapping) and "array" in r for r in model_input
    )
