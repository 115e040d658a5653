"""MLflow runs of a `medtl train` job: one parent run, one nested run per fold, the model.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so
fold runs may log from several threads or processes at once against an ``mlflow server``.

What is logged (PHI rule, see also ``medtl.bundle``):

- params: the resolved config, flattened; ``data.manifest`` as its file name only.
- tags: lineage (manifest hash, counts, medtl's commit and the user's repository commit,
  weights sha256, config id) on the parent run and on every fold run; no identifiers.
- the dataset input: the manifest hash as digest and a profile of counts, never rows.
- artifacts: report, plots, metrics, OOF predictions, fold assignments, quarantine list,
  resolved config, ``environment.json``. Text artifacts are copied with absolute folder
  prefixes (manifest folder, run folder, cwd, home) replaced by ``<manifest_dir>`` etc., so
  image paths appear only relative to the manifest. The manifest's own ``image`` paths and
  ``patient_id`` values must therefore be pseudonymous (``medtl manifest scan`` writes them
  that way); a manifest with real MRNs or names in file names must be de-identified first.
- the model: a pyfunc "from code" wrapping the bundle (safetensors + JSON); no pickle. It
  carries medtl's code and pinned requirements, so it loads where medtl is not installed
  (``medtl.tracking.model_package``).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import medtl
from medtl.config import PipelineConfig, TrackingConfig
from medtl.errors import MedtlError
from medtl.tracking.interrupted import RUN_FOLDER_TAG, mark_interrupted, stale_runs
from medtl.tracking.lineage import data_counts, medtl_code_state
from medtl.tracking.lock_retry import retry_locked
from medtl.tracking.store import (
    ensure_experiment,
    import_mlflow,
    make_client,
    resolve_artifact_location,
    resolve_tracking_uri,
)

__all__ = [
    "ENVIRONMENT_PACKAGES",
    "FoldRun",
    "TrainTracker",
    "environment_info",
    "metric_key",
    "is_duplicate_dataset",
    "select_artifacts",
]

log = logging.getLogger("medtl")

ENVIRONMENT_PACKAGES = (
    "torch",
    "torchvision",
    "monai",
    "timm",
    "pydicom",
    "nibabel",
    "mlflow",
    "scikit-learn",
    "numpy",
    "pandas",
    "safetensors",
    "medtl",
)
MAX_PARAM_CHARS = 500
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch
_TEXT_SUFFIXES = (".md", ".html", ".json", ".csv", ".yaml", ".yml", ".txt")
_ARTIFACT_SUFFIXES = (*_TEXT_SUFFIXES, ".png", ".svg", ".pdf")
# gallery: patient images (pixels may carry burned-in names) stay in the run folder.
_SKIP_DIRS = ("model", "final", "checkpoints", ".cache", "gallery")


def metric_key(name: str) -> str:
    """A metric name MLflow accepts (alphanumerics, ``_ - . /`` and spaces)."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", str(name))[:250]


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            if hasattr(v, "item") and callable(v.item):
                v = v.item()
            else:
                continue
        if isinstance(v, int | float) and math.isfinite(float(v)):
            out[metric_key(k)] = float(v)
    return out


def environment_info() -> dict[str, Any]:
    """Python, platform and package versions, for ``environment.json`` (no host or user names)."""
    versions: dict[str, str | None] = {}
    for pkg in ENVIRONMENT_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["medtl"] = versions["medtl"] or medtl.__version__
    code = medtl_code_state()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "packages": versions,
        "medtl_code": {"commit": code.commit, "dirty": code.dirty, "source": code.source},
    }
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["cuda_available"] = bool(torch.cuda.is_available())
    except ImportError:
        pass
    return info


def select_artifacts(run_dir: str | Path) -> list[Path]:
    """Run-folder files worth logging (reports, plots, tables, config), relative to the folder.

    Model bundles (logged as the MLflow model), checkpoints and caches are left out.
    """
    root = Path(run_dir)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if _suffix(p) in _ARTIFACT_SUFFIXES:
            out.append(rel)
    return out


def _suffix(p: Path) -> str:
    return p.suffix.lower()


def _redactions(cfg: PipelineConfig, run_dir: Path) -> list[tuple[str, str]]:
    """Absolute folder prefixes to replace in text artifacts, longest first."""
    pairs = []
    if cfg.data.manifest:
        pairs.append((str(Path(cfg.data.manifest).expanduser().resolve().parent), "<manifest_dir>"))
    pairs.append((str(run_dir.resolve()), "<run_dir>"))
    pairs.append((str(Path.cwd().resolve()), "<cwd>"))
    pairs.append((str(Path.home()), "<home>"))
    pairs = [(a, b) for a, b in pairs if len(a) > 1]
    return sorted(pairs, key=lambda ab: -len(ab[0]))


def _stage_text(src: Path, dst: Path, redactions: list[tuple[str, str]]) -> None:
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        shutil.copyfile(src, dst)
        return
    for prefix, token in redactions:
        text = text.replace(prefix + os.sep, token + "/").replace(prefix, token)
    dst.write_text(text, encoding="utf-8")


def is_duplicate_dataset(err: BaseException) -> bool:
    """True for the unique-key error of MLflow's ``datasets`` table (PostgreSQL, MySQL or
    SQLite wording, direct or through a tracking server), whatever the exception type."""
    text = str(err)
    return "dataset" in text and any(
        m in text for m in ("duplicate key", "UNIQUE constraint failed", "Duplicate entry")
    )


class FoldRun:
    """A nested MLflow run for one CV fold; methods are safe to call from worker threads."""

    def __init__(self, tracking_uri: str, run_id: str, fold: int):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.fold = fold
        self._client = make_client(tracking_uri)
        self.ended = False

    def log_epoch(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Per-epoch metrics (non-numeric values are skipped); ``step`` defaults to ``epoch``."""
        if step is None:
            step = int(metrics.get("epoch", 0))
        self.log_metrics(metrics, step=step)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics in batches."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, int(step or 0)) for k, v in _numeric(metrics).items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def end(self, status: str = "FINISHED") -> None:
        """Mark the fold run finished (or FAILED/KILLED)."""
        if not self.ended:
            self._client.set_terminated(self.run_id, status)
            self.ended = True


class TrainTracker:
    """Parent run + fold runs + model logging for one training job."""

    def __init__(
        self,
        tcfg: TrackingConfig,
        cfg: PipelineConfig,
        lineage: Mapping[str, str],
        run_folder: str | None = None,
    ):
        """``run_folder``: the run folder's ``run_folder_id``, tagged on every run so that the
        next job of the folder finds the runs a killed job left RUNNING."""
        self.tcfg = tcfg
        self.cfg = cfg
        self.lineage = dict(lineage)
        if run_folder:
            self.lineage[RUN_FOLDER_TAG] = run_folder
        self.run_folder = run_folder
        self.tracking_uri = resolve_tracking_uri(tcfg)
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.run_name: str | None = None
        self._client: Any = None
        self._folds: list[FoldRun] = []
        self._lock = threading.Lock()

    # -- lifecycle
    def start(self) -> str:
        """Create the parent run with params (flattened config) and lineage tags."""
        from mlflow.entities import Param

        self._client = make_client(self.tracking_uri)
        self.experiment_id = ensure_experiment(
            self._client,
            self.tcfg.experiment,
            resolve_artifact_location(self.tcfg, self.tracking_uri),
        )
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.run_name = f"{self.cfg.name}-{stamp}"
        run = self._client.create_run(
            self.experiment_id,
            run_name=self.run_name,
            tags={**self.lineage, "medtl.run_kind": "parent"},
        )
        self.parent_run_id = run.info.run_id
        params = [Param(k, v) for k, v in self._params().items()]
        for i in range(0, len(params), _BATCH):
            self._client.log_batch(self.parent_run_id, params=params[i : i + _BATCH])
        return self.parent_run_id

    def attach(self, parent_run_id: str) -> None:
        """Use an existing parent run (another process started it), e.g. to add fold runs."""
        self._client = make_client(self.tracking_uri)
        run = self._client.get_run(parent_run_id)
        self.parent_run_id = parent_run_id
        self.experiment_id = run.info.experiment_id
        self.run_name = run.info.run_name

    def end_interrupted(
        self, recorded_parent: str | None, superseded_by: str | None = None
    ) -> list[str]:
        """End FAILED (tagged ``medtl.interrupted``) the runs of this run folder a killed job
        left RUNNING: ``recorded_parent`` (``job.json``'s), runs tagged with the folder and
        their fold runs; this job's own parent run stays open. Call it only when no other job
        of the folder is alive. Returns the ids it ended."""
        parent = self._require_started()
        if self.run_folder is None or self.experiment_id is None:
            return []
        ids = stale_runs(
            self._client, self.experiment_id, self.run_folder, recorded_parent, [parent]
        )
        return mark_interrupted(self._client, ids, superseded_by)

    def _params(self) -> dict[str, str]:
        from medtl.bundle import portable_config
        from medtl.config import flatten_dict

        # The bundle's scrub (file names only, no local folders or URIs), then drop what it blanked.
        flat = flatten_dict(portable_config(self.cfg))
        for key in ("data.cache_dir", "tracking.uri", "tracking.artifact_location"):
            flat.pop(key, None)
        out = {}
        for k, v in flat.items():
            s = json.dumps(v) if isinstance(v, list | dict) else str(v)
            out[k] = s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."
        return out

    def _require_started(self) -> str:
        if self.parent_run_id is None:
            raise MedtlError("TrainTracker.start() must be called before logging")
        return self.parent_run_id

    def fold_run(self, k: int) -> FoldRun:
        """A nested run for fold ``k`` (tag ``mlflow.parentRunId``)."""
        parent = self._require_started()
        run = self._client.create_run(
            self.experiment_id,
            run_name=f"{self.run_name}-fold{k}",
            tags={
                **self.lineage,  # every fold run names its data, code and weights too
                "mlflow.parentRunId": parent,
                "medtl.run_kind": "fold",
                "medtl.fold": str(k),
                "medtl.config_id": self.lineage.get("medtl.config_id", self.cfg.identity()),
            },
        )
        fr = FoldRun(self.tracking_uri, run.info.run_id, k)
        with self._lock:
            self._folds.append(fr)
        return fr

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the parent run and any fold run left open (with the same status)."""
        if self.parent_run_id is None:
            return
        for fr in self._folds:
            if not fr.ended:
                fr.end(status if status != "FINISHED" else "KILLED")
        self._client.set_terminated(self.parent_run_id, status)

    # -- logging
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Pooled (OOF) metrics on the parent run."""
        from mlflow.entities import Metric

        run_id = self._require_started()
        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, int(step or 0)) for k, v in _numeric(metrics).items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_artifacts(self, run_dir: str | Path) -> list[str]:
        """Log reports, plots, tables, config and ``environment.json``; returns logged paths."""
        run_id = self._require_started()
        run_dir = Path(run_dir)
        redactions = _redactions(self.cfg, run_dir)
        logged = []
        with tempfile.TemporaryDirectory(prefix="medtl-artifacts-") as tmp:
            stage = Path(tmp)
            for rel in select_artifacts(run_dir):
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if _suffix(rel) in _TEXT_SUFFIXES:
                    _stage_text(run_dir / rel, dst, redactions)
                else:
                    shutil.copyfile(run_dir / rel, dst)
                logged.append(rel.as_posix())
            (stage / "environment.json").write_text(json.dumps(environment_info(), indent=2))
            logged.append("environment.json")
            self._client.log_artifacts(run_id, str(stage))
        return logged

    def log_dataset(self, manifest_hash: str, summary: Mapping[str, Any] | None) -> None:
        """The training manifest as an MLflow dataset input: hash + counts, never rows."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        run_id = self._require_started()
        profile = {"manifest_hash": manifest_hash, **data_counts(summary)}
        ds = Dataset(
            name=f"{self.cfg.name}-manifest",
            digest=str(manifest_hash)[:36],
            source_type="medtl-manifest",
            source=json.dumps({"manifest_hash": manifest_hash}),
            profile=json.dumps(profile, sort_keys=True),
        )
        inputs = [DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])]
        try:
            self._client.log_inputs(run_id, datasets=inputs)
        except Exception as err:
            if not is_duplicate_dataset(err):
                raise
            # Two jobs of one experiment logged this manifest at the same moment: MLflow's
            # store looks the dataset up, then inserts it, so the later insert hits the unique
            # key (seen with two trainings against one PostgreSQL-backed `mlflow server`). The
            # row exists now, and the second call only links it to this run.
            log.info("dataset %s was logged by another job at once; linking it", ds.name)
            self._client.log_inputs(run_id, datasets=inputs)

    def log_model(self, bundle_dir: str | Path, input_example: Any = None) -> str:
        """Log the bundle as an MLflow pyfunc model linked to the parent run; returns its URI.

        ``input_example`` is only checked for an ``image`` column; no example is stored, since
        real image paths could identify patients. The signature documents the input instead.
        """
        run_id = self._require_started()
        mlflow = import_mlflow()
        from medtl.bundle import read_bundle_meta
        from medtl.tracking.model_package import log_pyfunc

        meta = read_bundle_meta(bundle_dir)
        if input_example is not None and "image" not in getattr(input_example, "columns", []):
            raise MedtlError("input_example must be a table with an 'image' column of paths")
        # Model.log reads the process-wide URI and experiment: set them to this run's.
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        mlflow.set_experiment(experiment_id=self.experiment_id)
        # mlflow's module-level API, not this tracker's client: retried here instead. A try
        # that met the lock after creating its LoggedModel leaves that entry unused.
        info = retry_locked(
            log_pyfunc, run_id, bundle_dir, meta["classes"], self.lineage, uri=self.tracking_uri
        )
        self._client.set_tag(run_id, "medtl.model_id", info.model_id)
        self._client.set_tag(run_id, "medtl.model_uri", info.model_uri)
        return info.model_uri
