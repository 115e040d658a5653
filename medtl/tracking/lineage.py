"""Lineage tags: which data, code, weights and config produced a model (counts only, no PHI).

The same tags go on the MLflow parent run, the bundle's ``medtl_model.json`` and the
registered model version, so ``medtl audit`` can answer "what made this model?" from any
of them. Data is described by the manifest's content hash and counts; never by identifiers
or image paths.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import medtl
from medtl.config import PipelineConfig

__all__ = ["LINEAGE_KEYS", "collect_lineage", "data_counts", "git_state"]

LINEAGE_KEYS = (
    "medtl.manifest_hash",
    "medtl.data.n_images",
    "medtl.data.n_patients",
    "medtl.data.class_counts",
    "medtl.git_commit",
    "medtl.git_dirty",
    "medtl.version",
    "medtl.backbone",
    "medtl.weights_source",
    "medtl.weights_sha256",
    "medtl.seed",
    "medtl.strategy",
    "medtl.config_id",
)

# Summary keys written by different manifest validators; the first one present wins.
_IMAGE_KEYS = ("n_images", "images", "n_rows", "rows", "n")
_PATIENT_KEYS = ("n_patients", "patients")
_CLASS_KEYS = ("class_counts", "label_counts", "classes", "labels")


def git_state(cwd: str | Path | None = None) -> tuple[str, str]:
    """``(commit, dirty)`` of the git work tree at ``cwd``; ``("unknown", "unknown")`` if none."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown", "unknown"
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", "unknown"
    dirty = "unknown" if status.returncode != 0 else str(bool(status.stdout.strip())).lower()
    return commit.stdout.strip(), dirty


def _first(summary: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in summary:
            return summary[k]
    return None


def data_counts(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """Counts from a manifest summary: ``n_images``, ``n_patients``, ``class_counts``,
    ``patients_per_class``.

    Only integers and ``{label: int}`` maps are kept, so an identifier that slipped into a
    summary can never reach a tag. Site names are left out (they name institutions).
    """
    summary = summary or {}
    out: dict[str, Any] = {}
    count_keys: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("n_images", _IMAGE_KEYS),
        ("n_patients", _PATIENT_KEYS),
    )
    for name, keys in count_keys:
        v = _first(summary, keys)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[name] = int(v)
    per_class_keys: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("class_counts", _CLASS_KEYS),
        ("patients_per_class", ("patients_per_class",)),
    )
    for name, keys in per_class_keys:
        per_class = _first(summary, keys)
        if isinstance(per_class, Mapping):
            counts = {str(k): int(v) for k, v in per_class.items() if isinstance(v, int | float)}
            if counts:
                out[name] = dict(sorted(counts.items()))
    return out


def collect_lineage(
    cfg: PipelineConfig,
    manifest_hash: str,
    data_summary: Mapping[str, Any] | None,
    weights_info: Mapping[str, Any] | None,
    cwd: str | Path | None = None,
) -> dict[str, str]:
    """All lineage tags as strings (MLflow tag values), keys listed in ``LINEAGE_KEYS``."""
    counts = data_counts(data_summary)
    weights_info = weights_info or {}
    commit, dirty = git_state(cwd)
    return {
        "medtl.manifest_hash": str(manifest_hash),
        "medtl.data.n_images": str(counts.get("n_images", "unknown")),
        "medtl.data.n_patients": str(counts.get("n_patients", "unknown")),
        "medtl.data.class_counts": json.dumps(counts.get("class_counts", {}), sort_keys=True),
        "medtl.git_commit": commit,
        "medtl.git_dirty": dirty,
        "medtl.version": medtl.__version__,
        "medtl.backbone": cfg.model.backbone,
        "medtl.weights_source": str(weights_info.get("source") or "none"),
        "medtl.weights_sha256": str(weights_info.get("sha256") or "none"),
        "medtl.seed": str(cfg.seed),
        "medtl.strategy": cfg.strategy.name,
        "medtl.config_id": cfg.identity(),
    }
