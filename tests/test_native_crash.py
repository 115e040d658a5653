"""Crash isolation end to end: a DICOM decoder that segfaults in native code, and a manifest
full of broken files, do not take `medtl train`, `medtl predict` or `medtl evaluate` down.

The jobs run as real subprocesses of ``tests/native_crash_job.py``, whose test-only decoder
reads address 0 (SIGSEGV) on ``native_crash.dcm``, in the job's process and in every decoding
worker alike. One train job (feature extraction, 2 folds, 48 px) reads the demo manifest plus
that file, the regression mutants (``tests/data/mutants/`` when committed, and six made here
from demo DICOM and PNG files) and a CT volume in the 2D manifest (it reads, then fails the 2D
transforms); its model then predicts and evaluates the demo hold-out patients plus the crash
file and the mutants. Each job must exit 0 and list every file it could not use with its
reason.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from native_crash_job import CRASH_NAME, CRASH_REASON

from medtl.preparation.quarantine import timeout_reason

ROOT = Path(__file__).parent.parent
JOB = Path(__file__).parent / "native_crash_job.py"
PIPELINE = ROOT / "pipelines/cxr_2d_feature_extraction.yaml"
COMMITTED_MUTANTS = Path(__file__).parent / "data" / "mutants"
VOLUME_NAME = "ct_volume_in_2d_manifest.nii"  # reads fine; the 2D transforms refuse it
# A committed mutant named *_hang* never returns from its decoder unless the reader refuses it
# first (README in that folder): the train job would stop it at data.decode_timeout_s; predict
# and evaluate have no such option and would wait the default 300 s, so it stays out of theirs.
DECODE_TIMEOUT_S = 30
# The cheapest whole train job: frozen features + logistic head, 2 folds, 48 px, no tracking.
SETTINGS = [
    "transforms.spatial_size=[48,48]",
    "cv.folds=2",
    "evaluation.bootstrap=20",
    "evaluation.gallery_per_cell=0",
    "train.progress=false",
    "train.device=cpu",
    "data.num_workers=0",
    "data.prepare_workers=2",
    "data.max_bad_fraction=0.5",
    "tracking.enabled=false",
    f"data.decode_timeout_s={DECODE_TIMEOUT_S}",
]


@dataclass
class Job:
    """A finished job subprocess: its exit status and output."""

    returncode: int
    stdout: str
    stderr: str

    def log(self) -> str:
        return f"exit {self.returncode}\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"

    def part(self, verb: str) -> Job:
        """The output of one command of a ``--then`` chain (after its ``=== medtl VERB ===``)."""

        def cut(text: str) -> str:
            after = text.split(f"=== medtl {verb} ===\n", 1)[-1]
            return after.split("=== medtl ", 1)[0]

        return Job(self.returncode, cut(self.stdout), cut(self.stderr))


def run_job(*args: str) -> Job:
    """``python tests/native_crash_job.py ARGS...`` from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, str(JOB), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Job(p.returncode, p.stdout, p.stderr)


# ----------------------------------------------------------------- broken files
def _made_mutants(good: Path, out: Path) -> list[Path]:
    """Five broken copies of a demo DICOM file and a PNG whose header lies, as a bad export
    gives them."""
    import pydicom
    from PIL import Image
    from pydicom.uid import ExplicitVRLittleEndian

    raw = good.read_bytes()
    made = {
        "truncated_half.dcm": raw[: len(raw) // 2],
        # every 7th byte of the header after the preamble inverted
        "header_bytes_flipped.dcm": bytes(
            b ^ 0xFF if 132 <= i < 600 and i % 7 == 0 else b for i, b in enumerate(raw)
        ),
        "not_dicom_at_all.dcm": bytes(np.random.default_rng(0).integers(0, 256, 700, np.uint8)),
        # the Transfer Syntax UID element's VR "UI" replaced by two bytes no VR has: pydicom
        # raises NotImplementedError reading even the header
        "unknown_vr_in_file_meta.dcm": raw.replace(
            b"\x02\x00\x10\x00UI", b"\x02\x00\x10\x00\x55\xb2", 1
        ),
    }
    png = io.BytesIO()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(png, "PNG")
    head = png.getvalue()  # its IHDR chunk's length field says 5 bytes, not 13: a ValueError
    made["ihdr_length_wrong.png"] = head[:8] + (5).to_bytes(4, "big") + head[12:]
    paths = []
    for name, data in made.items():
        (out / name).write_bytes(data)
        paths.append(out / name)
    ds = pydicom.dcmread(good)  # a valid header whose pixel data stops a third of the way
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = ds.PixelData[: (len(ds.PixelData) // 3) & ~1]
    ds.save_as(out / "pixel_data_cut_short.dcm", enforce_file_format=True)
    return [*paths, out / "pixel_data_cut_short.dcm"]


def _committed_mutants(out: Path) -> list[Path]:
    """The regression mutants of the reader fuzzer, when they are committed."""
    if not COMMITTED_MUTANTS.is_dir():
        return []
    paths = []
    for src in sorted(COMMITTED_MUTANTS.iterdir()):
        if src.is_file() and src.suffix.lower() not in (".md", ".txt", ".json"):
            paths.append(out / src.name)
            paths[-1].write_bytes(src.read_bytes())
    return paths


def _volume(out: Path) -> Path:
    """A small CT-like NIfTI volume: a valid file the 2D radiograph transforms cannot take."""
    import nibabel as nib

    vol = np.random.default_rng(0).normal(0, 100, (12, 12, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), out / VOLUME_NAME)
    return out / VOLUME_NAME


def hangs(path: Path) -> bool:
    """A mutant whose decoder never returns (it cannot be read in this process)."""
    return "_hang" in path.name


def reader_reason(path: Path) -> str | None:
    """What ``medtl.io.load_image`` says in this process: the reason of its
    ``UnreadableImageError``, or None when the file loads."""
    from medtl.errors import UnreadableImageError
    from medtl.io import load_image

    try:
        load_image(path)
    except UnreadableImageError as err:
        return err.reason
    return None


def _with_rows(df: pd.DataFrame, paths: list[Path]) -> pd.DataFrame:
    """``df`` plus one row per path, each a copy of a row of ``df`` (its label and patient)."""
    extra = df.iloc[[i % len(df) for i in range(len(paths))]].assign(image=[str(p) for p in paths])
    return pd.concat([df, extra], ignore_index=True)


@pytest.fixture(scope="module")
def bad_files(demo_data, tmp_path_factory):
    """The crash file, the reader mutants and the volume, outside the shared demo tree."""
    out = tmp_path_factory.mktemp("bad_export")
    df = pd.read_csv(demo_data.manifest_csv)
    good = demo_data.root / df["image"].iloc[1]
    crash = out / CRASH_NAME
    crash.write_bytes(good.read_bytes())  # a good file: only the test decoder makes it crash
    mutants = _made_mutants(good, out) + _committed_mutants(out)
    return crash, mutants, _volume(out)


@pytest.fixture(scope="module")
def train_job(demo_data, bad_files, tmp_path_factory):
    """One `medtl train` over the demo manifest plus every bad file."""
    work = tmp_path_factory.mktemp("crash_train")
    crash, mutants, volume = bad_files
    df = pd.read_csv(demo_data.manifest_csv)
    df["image"] = [str(demo_data.root / p) for p in df["image"]]
    manifest = work / "manifest.csv"
    _with_rows(df, [crash, *mutants, volume]).to_csv(manifest, index=False)
    sets = [a for s in [*SETTINGS, f"data.cache_dir={work / 'cache'}"] for a in ("--set", s)]
    job = run_job("train", str(PIPELINE), str(manifest), str(work / "run"), *sets)
    return job, work / "run", len(df)


# ----------------------------------------------------------------- tests
def test_train_finishes_and_quarantines_the_crash_and_each_mutant(train_job, bad_files):
    job, run, n_good = train_job
    crash, mutants, volume = bad_files
    assert job.returncode == 0, job.log()
    n_bad = 2 + len(mutants)
    assert f"{n_bad} unreadable file(s) quarantined" in job.stdout, job.log()

    q = pd.read_csv(run / "quarantine.csv")
    reasons = dict(zip(q["path"], q["reason"], strict=True))
    assert sorted(reasons) == sorted(str(p) for p in [crash, *mutants, volume])
    assert reasons[str(crash)] == CRASH_REASON  # the worker died; the job did not
    for m in mutants:
        why = reasons[str(m)]
        if hangs(m):  # stopped at the timeout (or refused by a reader that sees it coming)
            assert why == timeout_reason(DECODE_TIMEOUT_S) or "crashed" not in why, why
        else:  # the same one-line reason the reader gives in process: read, not killed
            assert why == reader_reason(m), m.name
    why = reasons[str(volume)]  # it read, and the deterministic transforms failed on it
    assert "ValueError" in why and "crashed" not in why, why
    assert all(r.strip() and "\n" not in r for r in reasons.values())

    info = json.loads((run / "run_info.json").read_text())
    assert {e["path"]: e["reason"] for e in info["quarantine"]} == reasons
    assert info["n_images_listed"] == n_good + n_bad
    report = (run / "report.md").read_text()
    assert f"{n_bad} file(s) could not be read" in report
    assert all(f"| {p} | {r} |" in report for p, r in reasons.items()), "each file and reason"


def test_train_trains_on_exactly_the_good_images(train_job):
    job, run, n_good = train_job
    assert job.returncode == 0, job.log()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_images"] == metrics["pooled"]["n"] == n_good
    oof = pd.read_csv(run / "oof_predictions.csv")
    assert len(oof) == n_good and not oof["image"].str.contains("bad_export").any()
    assert (run / "model" / "medtl_model.json").is_file()


@pytest.fixture(scope="module")
def holdout_with_crash(demo_data, bad_files, tmp_path_factory):
    """The demo hold-out patients (absolute paths), the crash file and the reader mutants."""
    df = pd.read_csv(demo_data.holdout_manifest_csv)
    df["image"] = [str(demo_data.holdout_manifest_csv.parent / p) for p in df["image"]]
    path = tmp_path_factory.mktemp("crash_holdout") / "holdout.csv"
    crash, mutants, _ = bad_files
    _with_rows(df, [crash, *[m for m in mutants if not hangs(m)]]).to_csv(path, index=False)
    return path, len(df)


@pytest.fixture(scope="module")
def predict_then_evaluate(train_job, holdout_with_crash, tmp_path_factory):
    """`medtl predict` then `medtl evaluate` of the trained model on the hold-out + crash file,
    chained in one job process (one Python, torch and forkserver start for both)."""
    assert train_job[0].returncode == 0, train_job[0].log()
    out = tmp_path_factory.mktemp("crash_predict")
    model, manifest = str(train_job[1] / "model"), str(holdout_with_crash[0])
    job = run_job(
        *("predict", model, manifest, str(out / "preds.csv"), "--allow-unapproved", "--then"),
        *("evaluate", model, manifest, str(out / "evaluation")),
    )
    return job, out


def test_predict_finishes_and_lists_each_unreadable_file(
    predict_then_evaluate, holdout_with_crash, bad_files
):
    job, out = predict_then_evaluate
    assert job.returncode == 0, job.log()
    n_good, (crash, mutants, _) = holdout_with_crash[1], bad_files
    mutants = [m for m in mutants if not hangs(m)]
    n_bad = 1 + len(mutants)
    said = job.part("predict").stdout
    assert f"{n_good + n_bad} predictions written" in said, job.log()
    assert f"({n_bad} unreadable" in said, job.log()
    preds = pd.read_csv(out / "preds.csv")
    errors = dict(zip(preds["image"], preds["error"], strict=True))
    assert errors[str(crash)] == CRASH_REASON
    for m in mutants:  # the reader's own reason, also for a header pydicom cannot parse
        assert errors[str(m)] == reader_reason(m), m.name
    good = preds[~preds["image"].isin([str(p) for p in [crash, *mutants]])]
    assert len(good) == n_good and good["error"].isna().all()
    assert good[["prob_normal", "prob_nodule"]].notna().all().all() and good["pred"].notna().all()


def test_evaluate_finishes_and_reports_the_good_images(predict_then_evaluate, holdout_with_crash):
    job, out = predict_then_evaluate
    assert job.returncode == 0, job.log()
    preds = pd.read_csv(out / "evaluation" / "predictions.csv")
    assert len(preds) == holdout_with_crash[1]  # every hold-out image, the bad files left out
    assert not preds["image"].str.contains("bad_export").any()
    # the pool's log line names the file and why, on stderr
    assert f"{CRASH_NAME}: {CRASH_REASON}" in job.part("evaluate").stderr, job.log()


def test_evaluate_report_lists_the_crashed_file_with_its_reason(predict_then_evaluate):
    job, out = predict_then_evaluate
    assert job.returncode == 0, job.log()
    report = (out / "evaluation" / "report.md").read_text()
    assert CRASH_NAME in report and CRASH_REASON in report
