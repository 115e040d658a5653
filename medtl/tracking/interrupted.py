"""Runs a killed job left RUNNING: found by the run folder they belong to, marked FAILED.

A `medtl train` killed while it logs (SIGKILL, a lost node, an OOM kill) never ends its MLflow
runs, so the store shows them RUNNING for ever. Every parent and fold run carries
``medtl.run_folder_id`` (a hash of the run folder's path: the path itself may name a patient
or a user, and it is never logged); the next job of that folder finds the runs still RUNNING
and, when no job of the folder is alive (``medtl.jobs.run_store.tracked_job_alive``), marks
them FAILED with ``medtl.interrupted=true`` and, for a rerun, ``medtl.superseded_by``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "INTERRUPTED_TAG",
    "RUN_FOLDER_TAG",
    "SUPERSEDED_TAG",
    "mark_interrupted",
    "run_folder_id",
    "stale_runs",
]

RUN_FOLDER_TAG = "medtl.run_folder_id"
INTERRUPTED_TAG = "medtl.interrupted"
SUPERSEDED_TAG = "medtl.superseded_by"


def run_folder_id(run_dir: str | Path) -> str:
    """The tag value naming a run folder: sha256 of its resolved path, 16 hex digits."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def _running(client: Any, experiment_ids: list[str], tag: str, value: str) -> list[Any]:
    """Every RUNNING run of these experiments whose ``tag`` is ``value``."""
    found = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    return list(found)


def stale_runs(
    client: Any,
    experiment_id: str,
    folder_id: str,
    recorded_parent: str | None = None,
    keep: Iterable[str] = (),
) -> list[str]:
    """Ids of the RUNNING runs of this run folder: those tagged with ``folder_id`` in the
    experiment, the ``recorded_parent`` run (``job.json``'s, which may predate the tag) and
    the RUNNING children of every parent found; ``keep`` (a live parent) is left out."""
    keep = set(keep)
    runs = {r.info.run_id: r for r in _running(client, [experiment_id], RUN_FOLDER_TAG, folder_id)}
    if recorded_parent and recorded_parent not in runs:
        try:
            run = client.get_run(recorded_parent)
        except Exception:  # deleted, or never in this store: nothing to mark
            run = None
        if run is not None and run.info.status == "RUNNING":
            runs[recorded_parent] = run
    parents = {i for i, r in runs.items() if r.data.tags.get("medtl.run_kind") != "fold"}
    parents |= keep
    for parent in sorted(parents):
        exp = runs[parent].info.experiment_id if parent in runs else experiment_id
        for child in _running(client, [exp], "mlflow.parentRunId", parent):
            runs.setdefault(child.info.run_id, child)
    return sorted(i for i in runs if i not in keep)


def mark_interrupted(
    client: Any, run_ids: Iterable[str], superseded_by: str | None = None
) -> list[str]:
    """Tag each run interrupted (and superseded by ``superseded_by``) and end it FAILED."""
    done = []
    for run_id in run_ids:
        client.set_tag(run_id, INTERRUPTED_TAG, "true")
        if superseded_by:
            client.set_tag(run_id, SUPERSEDED_TAG, superseded_by)
        client.set_terminated(run_id, "FAILED")
        done.append(run_id)
    return done
