"""What a run folder keeps between the jobs that share it: the job record (config identity,
the manifests' content hashes, the MLflow parent run) and each finished fold's result.

Fold jobs (`medtl train --folds`) write here and `--collect` reads it back, so folds can run
as separate processes, on separate GPUs or nodes, into one run folder. Files are written to
a temporary name and renamed, so a reader never sees half a file; the job record is written
under an exclusive ``fcntl.flock`` on ``RUN/.medtl.lock``.

A job that logs to MLflow also holds a shared ``flock`` on ``RUN/.medtl.active`` for as long
as it runs (:func:`mark_job_active`). The kernel drops it when the process dies, SIGKILL
included, so :func:`tracked_job_alive` tells a live fold-job sibling (whose parent run must
stay open) from a killed job (whose runs the next job marks FAILED).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtl.config import PipelineConfig
from medtl.errors import MedtlError
from medtl.jobs.folds import FoldResult, fold_dir
from medtl.jobs.prepare import TrainData

JOB_FILE = "job.json"
LOCK_FILE = ".medtl.lock"
ACTIVE_FILE = ".medtl.active"
RESULT_JSON = "result.json"
RESULT_NPZ = "result.npz"
FORMAT = "medtl-fold-result/1"


@dataclass(frozen=True)
class JobIdentity:
    """What two jobs of one run must agree on: the config keys that decide what is computed
    (``PipelineConfig.identity_view``) and the content of the manifests (not their paths)."""

    config_identity: str
    config: dict[str, Any]
    data: dict[str, str | None]

    def to_dict(self) -> dict[str, Any]:
        return {"config_identity": self.config_identity, "config": self.config, "data": self.data}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobIdentity:
        return cls(str(d["config_identity"]), dict(d["config"]), dict(d["data"]))

    def differences(self, other: JobIdentity) -> list[str]:
        """``key: <this> here, <other> there`` for every differing key, config then data."""
        out = []
        for section, mine, theirs in (
            ("", self.config, other.config),
            ("data content ", self.data, other.data),
        ):
            for key in sorted(set(mine) | set(theirs)):
                a, b = mine.get(key, "<unset>"), theirs.get(key, "<unset>")
                if a != b:
                    out.append(f"{section}{key}: {_short(a)} here, {_short(b)} there")
        return out


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def job_identity(
    cfg: PipelineConfig, manifest_hash: str, target_hash: str | None = None
) -> JobIdentity:
    """The identity of a job on this resolved config and these manifests' contents."""
    data = {"manifest_sha256": manifest_hash, "target_manifest_sha256": target_hash}
    return JobIdentity(cfg.identity(), cfg.identity_view(), data)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (blocks until the job holding it lets go).

    ``flock`` is advisory and per open file: every medtl job takes it before it reads or
    writes the job record, so two fold jobs starting together cannot both be "first".
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class ActiveJob:
    """This process's shared lock on ``RUN/.medtl.active``: held while the job runs."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fh: io.TextIOWrapper | None = open(run_dir / ACTIVE_FILE, "a+")  # noqa: SIM115
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_SH)

    def release(self) -> None:
        """Let go (at the job's end; the kernel does it too if the process dies)."""
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def mark_job_active(run_dir: Path) -> ActiveJob:
    """Say that a tracked job runs in ``run_dir`` until :meth:`ActiveJob.release`.

    Call it under :func:`run_lock`, after :func:`tracked_job_alive`: a job's own lock would
    count as a live sibling (``flock`` locks conflict between open files of one process too).
    """
    return ActiveJob(run_dir)


def tracked_job_alive(run_dir: Path) -> bool:
    """Whether another job that logs to MLflow is running in ``run_dir`` right now.

    ``flock`` holds on one machine and on file systems that pass it on (NFSv4, Lustre); the
    run folder lock assumes the same.
    """
    path = run_dir / ACTIVE_FILE
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class JobRecord:
    """``RUN/job.json``: written by the first job into a run folder, read by every later one."""

    identity: JobIdentity
    parent_run_id: str | None = None
    tracking_uri: str | None = None


def read_job_record(run_dir: Path) -> JobRecord | None:
    """The run folder's job record, or None when no job has claimed it yet."""
    path = run_dir / JOB_FILE
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return JobRecord(
        JobIdentity.from_dict(d["identity"]), d.get("parent_run_id"), d.get("tracking_uri")
    )


def write_job_record(run_dir: Path, record: JobRecord) -> None:
    """Write ``RUN/job.json`` (call it holding :func:`run_lock`)."""
    d = {
        "identity": record.identity.to_dict(),
        "parent_run_id": record.parent_run_id,
        "tracking_uri": record.tracking_uri,
    }
    _atomic_write(run_dir / JOB_FILE, json.dumps(d, indent=2, sort_keys=True).encode())


def drop_checkpoints(run_dir: Path) -> list[Path]:
    """Remove every ``last.pt``/``best.pt`` and fold result under ``run_dir``: made from other
    data, they must not be resumed (the checkpoint identity is the config's alone)."""
    gone = []
    for pattern in ("last.pt", "best.pt", RESULT_JSON, RESULT_NPZ):
        for p in sorted(run_dir.rglob(pattern)):
            p.unlink()
            gone.append(p)
    return gone


@dataclass
class StoredFold:
    """A finished fold read back from ``folds/fold_<k>/``."""

    result: FoldResult
    identity: JobIdentity
    fold_run_id: str | None = None


def _record_keys(records: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """What names a record across jobs: its manifest row, image and patient (and label)."""
    if records is None:
        return None
    return [
        {
            "row": int(r["row"]),
            "image": str(r["image_rel"]),
            "patient_id": str(r["patient_id"]),
            "label": np.asarray(r["label"]).tolist(),
        }
        for r in records
    ]


def save_fold_result(
    run_dir: Path, result: FoldResult, identity: JobIdentity, fold_run_id: str | None = None
) -> Path:
    """Write fold ``k``'s result as ``result.npz`` (probabilities) and ``result.json`` (the
    rest, with the job identity and the npz's sha256); the json, written last, marks it done."""
    out = fold_dir(run_dir, result.fold)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"probs": np.asarray(result.probs)}
    if result.inner_probs is not None:
        arrays["inner_probs"] = np.asarray(result.inner_probs)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    npz = buf.getvalue()
    _atomic_write(out / RESULT_NPZ, npz)
    doc = {
        "format": FORMAT,
        "fold": result.fold,
        "identity": identity.to_dict(),
        "npz_sha256": hashlib.sha256(npz).hexdigest(),
        "best_epoch": int(result.best_epoch),
        "history": result.history,
        "val_records": _record_keys(result.val_records),
        "inner_records": _record_keys(result.inner_records),
        "fold_run_id": fold_run_id,
    }
    _atomic_write(out / RESULT_JSON, json.dumps(doc, indent=1, default=_json_default).encode())
    return out / RESULT_JSON


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def load_fold_result(run_dir: Path, k: int, data: TrainData) -> StoredFold | None:
    """Fold ``k``'s stored result with its records looked up in ``data`` (None when the fold
    has not finished). Raises MedtlError when the files disagree or name unknown images."""
    where = fold_dir(run_dir, k)
    if not (where / RESULT_JSON).is_file():
        return None
    doc = json.loads((where / RESULT_JSON).read_text())
    npz = (where / RESULT_NPZ).read_bytes() if (where / RESULT_NPZ).is_file() else b""
    if hashlib.sha256(npz).hexdigest() != doc.get("npz_sha256"):
        raise MedtlError(
            f"fold {k}: {where / RESULT_NPZ} is missing or does not match {RESULT_JSON} "
            "(written by another job?); delete both and rerun the fold"
        )
    arrays = np.load(io.BytesIO(npz))
    by_row = {int(r["row"]): r for r in data.records}
    result = FoldResult(
        fold=int(doc["fold"]),
        val_records=_lookup(doc["val_records"], by_row, k) or [],
        probs=arrays["probs"],
        history=list(doc["history"]),
        best_epoch=int(doc["best_epoch"]),
        inner_records=_lookup(doc["inner_records"], by_row, k),
        inner_probs=arrays["inner_probs"] if "inner_probs" in arrays.files else None,
    )
    identity = JobIdentity.from_dict(doc["identity"])
    return StoredFold(result, identity, doc.get("fold_run_id"))


def _lookup(
    keys: list[dict[str, Any]] | None, by_row: Mapping[int, dict[str, Any]], k: int
) -> list[dict[str, Any]] | None:
    """This job's records for a stored fold's record keys (same row and image, or an error)."""
    if keys is None:
        return None
    out = []
    for key in keys:
        rec = by_row.get(int(key["row"]))
        if rec is None or str(rec["image_rel"]) != key["image"]:
            raise MedtlError(
                f"fold {k}'s stored result names image '{key['image']}' (manifest row "
                f"{key['row']}), which this job's manifest does not list there or could not "
                "read; collect with the manifest the folds were trained on"
            )
        out.append(rec)
    return out


def adopt_stored_splits(data: TrainData, run_dir: Path) -> None:
    """Give ``data`` the folds the run's first job wrote (``fold_assignments.csv``), so every
    job of one run trains on the same patients, whatever its library versions.

    Raises MedtlError when the stored table lists other images than this manifest."""
    from medtl.cv import load_splits

    stored = load_splits(run_dir)
    mine = data.split_df["image"].astype(str).to_numpy()
    if len(stored) != len(mine) or not (stored["image"].to_numpy() == mine).all():
        raise MedtlError(
            f"{run_dir / 'fold_assignments.csv'} lists other images than this job's manifest "
            f"({len(stored)} rows there, {len(mine)} here); every job of one run needs the "
            "same manifest"
        )
    fold_of, split_of = stored["fold"].to_numpy(), stored["split"].to_numpy()
    for r in data.records:
        r["fold"], r["split"] = int(fold_of[r["row"]]), str(split_of[r["row"]])
    data.split_df = data.split_df.assign(fold=fold_of, split=split_of)
