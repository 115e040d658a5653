"""The pyfunc's input forms (path, base64 file bytes, raw array) through the bundle's real
deterministic transforms, with a tiny real network: same image, same probabilities; a bad row
gets its own error and never fails the others."""

from __future__ import annotations

import base64
import gzip
import math

import numpy as np
import pytest
from tracking_helpers import tiny_cfg, tiny_factory, trained_tiny, write_pngs

from medtl.bundle import load_bundle, save_bundle
from medtl.errors import MedtlError
from medtl.io import load_image
from medtl.tracking.pyfunc import predict_rows, sniff_suffix


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyfunc_inputs")
    cfg = tiny_cfg()
    saved = save_bundle(root / "m", trained_tiny(), cfg, ["neg", "pos"], "binary", 0.42)
    pngs = write_pngs(root / "img", n=2)
    return load_bundle(saved, model_factory=tiny_factory), pngs


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_path_b64_and_array_of_one_image_give_the_same_probabilities(tiny):
    bundle, (png, other) = tiny
    arr = load_image(png).array
    out = predict_rows(
        bundle,
        {
            "path": [str(png), None, None, None, str(other)],
            "b64": [None, _b64(png), None, None, None],
            "array": [None, None, arr.tolist(), arr[0].tolist(), None],  # (C,H,W) and (H,W)
        },
    )
    assert list(out["image"]) == [str(png), "b64[1]", "array[2]", "array[3]", str(other)]
    assert out["error"].tolist() == [None] * 5
    np.testing.assert_allclose(out["prob_pos"][:4], [out["prob_pos"][0]] * 4, rtol=1e-6)
    assert abs(out["prob_pos"][4] - out["prob_pos"][0]) > 1e-4  # a different image differs
    np.testing.assert_allclose(out["prob_neg"] + out["prob_pos"], 1.0, rtol=1e-6)


def test_bad_rows_get_their_own_errors_and_the_good_row_is_still_predicted(tiny):
    bundle, (png, _) = tiny
    rows = [
        {"b64": "@@not base64@@"},
        {"b64": base64.b64encode(b"plain text, no image").decode()},
        {"array": [1.0, 2.0, 3.0]},
        {"array": [[1.0, float("nan")], [0.0, 1.0]]},
        {"path": "/no/such/file.dcm"},
        {"note": "nothing to read"},
        {"path": str(png)},
    ]
    out = predict_rows(bundle, rows)
    errors = out["error"].tolist()
    assert "not valid base64" in errors[0]
    assert "no known image format" in errors[1]
    assert "shape (3,)" in errors[2] and "(H, W) or (C, H, W)" in errors[2]
    assert "NaN" in errors[3]
    assert "FileNotFoundError" in errors[4]
    assert "none of the input columns" in errors[5] and "'b64'" in errors[5]
    assert errors[6] is None and out["pred"][6] in ("neg", "pos")
    assert all(math.isnan(p) for p in out["prob_pos"][:6]) and out["pred"][:6].isna().all()


def test_an_unreadable_b64_file_names_the_row_not_a_temporary_file(tiny):
    bundle, _ = tiny
    truncated_png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20
    out = predict_rows(bundle, {"b64": [base64.b64encode(truncated_png).decode()]})
    assert out["error"][0] and "medtl-serve-" not in out["error"][0]


def test_sniff_suffix_recognises_the_reader_formats():
    nifti1 = bytearray(352)
    nifti1[344:348] = b"n+1\x00"
    dicom = b"\x00" * 128 + b"DICM" + b"\x00" * 8
    assert sniff_suffix(dicom) == ".dcm"
    assert sniff_suffix(b"\x89PNG\r\n\x1a\n....") == ".png"
    assert sniff_suffix(b"\xff\xd8\xff\xe0....") == ".jpg"
    assert sniff_suffix(bytes(nifti1)) == ".nii"
    assert sniff_suffix(gzip.compress(bytes(nifti1))) == ".nii.gz"
    assert sniff_suffix(b"GIF89a....") is None


def test_input_of_an_unknown_kind_is_refused_with_the_valid_forms(tiny):
    bundle, _ = tiny
    with pytest.raises(MedtlError, match="path.*b64.*array"):
        predict_rows(bundle, 42)
    with pytest.raises(MedtlError, match="differ in length"):
        predict_rows(bundle, {"path": ["a", "b"], "b64": ["c"]})
