"""Where MLflow data lives, and an offline, telemetry-free process to talk to it.

Resolution order for the tracking URI: ``tracking.uri`` in the pipeline config, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` with artifacts in
``<cwd>/mlartifacts``. The registry needs a database store (the file store is deprecated),
and SQLite locks under concurrent writers: fold runs logging in parallel belong on an
``mlflow server`` (``http://...`` URI). Clients from :func:`make_client` retry a locked store
with backoff and then say so (``medtl.tracking.lock_retry``).

Offline environment: :func:`offline_environment` sets these variables (only where unset)
before mlflow is imported, because mlflow reads some of them at import time:

- ``MLFLOW_DISABLE_TELEMETRY=true`` and ``DO_NOT_TRACK=true``: mlflow 3 sends usage telemetry
  by default; hospital networks must see no outbound traffic.
- ``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``: no model or
  data downloads through libraries mlflow or timm may pull in.
- ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false``: no progress bars in logs and CI.
- ``GIT_PYTHON_REFRESH=quiet``: mlflow imports GitPython; a machine without git must not warn.

Every medtl module imports mlflow through :func:`import_mlflow` (lazily: importing mlflow costs
seconds and never happens at ``medtl --help``). All logging goes through ``MlflowClient`` with
explicit run ids, never the global "active run", so fold runs can log from several threads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medtl.config import TrackingConfig
from medtl.errors import ConfigError
from medtl.tracking.lock_retry import DEFAULT_RETRY, LockRetry, RetryingClient

__all__ = [
    "OFFLINE_ENV",
    "ensure_experiment",
    "import_mlflow",
    "make_client",
    "offline_environment",
    "resolve_artifact_location",
    "resolve_tracking_uri",
    "sqlite_path",
]

OFFLINE_ENV: dict[str, str] = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def offline_environment() -> dict[str, str]:
    """Set the offline/no-telemetry variables (where unset) and return the values in effect."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in OFFLINE_ENV}


def import_mlflow() -> Any:
    """Import mlflow after :func:`offline_environment`; the only way medtl imports it."""
    offline_environment()
    import mlflow

    return mlflow


def resolve_tracking_uri(tcfg: TrackingConfig | None = None) -> str:
    """The tracking URI: config, else ``$MLFLOW_TRACKING_URI``, else SQLite in the cwd."""
    if tcfg is not None and tcfg.uri:
        uri = tcfg.uri
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    else:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if "://" not in uri and ":" not in uri[:3]:
        # A bare path: a SQLite file, not the deprecated file store.
        p = Path(uri).expanduser().resolve()
        if p.suffix not in (".db", ".sqlite", ".sqlite3"):
            raise ConfigError(
                f"tracking.uri '{uri}' is a plain folder; medtl needs a database store for the "
                "model registry. Use sqlite:///path/mlflow.db or http://host:port (mlflow server)"
            )
        return f"sqlite:///{p}"
    if uri.startswith("file:"):
        raise ConfigError(
            f"tracking.uri '{uri}' is the deprecated MLflow file store, which has no model "
            "registry. Use sqlite:///path/mlflow.db or http://host:port (mlflow server)"
        )
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def resolve_artifact_location(tcfg: TrackingConfig | None, uri: str) -> str | None:
    """Artifact root for a new experiment: config, else ``mlartifacts`` beside the SQLite file.

    None for a server URI: the server's ``--default-artifact-root``/``--artifacts-destination``
    decides there.
    """
    if tcfg is not None and tcfg.artifact_location:
        loc = tcfg.artifact_location
        if "://" in loc:
            return loc
        return Path(loc).expanduser().resolve().as_uri()
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts").resolve().as_uri()


def make_client(uri: str, retry: LockRetry = DEFAULT_RETRY) -> Any:
    """An ``MlflowClient`` bound to ``uri`` (tracking and registry), not the global default.

    Every method call retries "database is locked" with backoff (``retry``), then raises
    MedtlError advising a tracking server (:mod:`medtl.tracking.lock_retry`).
    """
    mlflow = import_mlflow()
    return RetryingClient(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri, retry)


def ensure_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``, creating it once; safe when several processes race."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments "
                "restore) or set tracking.experiment to another name"
            )
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
