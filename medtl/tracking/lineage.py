"""Lineage tags: which data, code, weights and config produced a model (counts only, no PHI).

The same tags go on the MLflow parent run, every fold run, the bundle's ``medtl_model.json``
and the registered model version, so ``medtl audit`` can answer "what made this model?" from
any of them. Data is described by the manifest's content hash and counts; never by identifiers
or image paths.

Code is described twice, because they are different things:

- medtl's own code (``medtl.version``, ``medtl.git_commit``, ``medtl.git_dirty``,
  ``medtl.code.source``): from ``medtl/_build_info.py``, written when the package was built
  (``build_hooks.py``), else from git at the medtl package's own folder (an editable install or
  a source checkout), never from the process's working directory.
- the user's repository (``medtl.user_repo.commit``, ``medtl.user_repo.dirty``): the git work
  tree of the working directory when the job runs from one (their pipelines, scripts), else
  ``none``. Only the commit and dirty flag are kept, never the folder or the remote URL.
"""

from __future__ import annotations

import importlib
import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import medtl
from medtl.config import PipelineConfig

__all__ = [
    "CODE_SOURCES",
    "LINEAGE_KEYS",
    "CodeState",
    "collect_lineage",
    "data_counts",
    "git_state",
    "medtl_code_state",
    "user_repo_state",
]

LINEAGE_KEYS = (
    "medtl.manifest_hash",
    "medtl.data.n_images",
    "medtl.data.n_patients",
    "medtl.data.class_counts",
    "medtl.git_commit",
    "medtl.git_dirty",
    "medtl.version",
    "medtl.code.source",
    "medtl.user_repo.commit",
    "medtl.user_repo.dirty",
    "medtl.backbone",
    "medtl.weights_source",
    "medtl.weights_sha256",
    "medtl.seed",
    "medtl.strategy",
    "medtl.config_id",
)

#: Tags of a domain-adapted model (method, target manifest hash and counts, parent model), set
#: only when ``domain_adaptation`` or ``medtl adapt`` was used (``medtl.jobs.target``).
ADAPTATION_PREFIX = "medtl.adaptation."


def is_lineage_key(key: str) -> bool:
    """Whether an MLflow tag is one of medtl's lineage tags (fixed keys, or adaptation ones)."""
    return key in LINEAGE_KEYS or key.startswith(ADAPTATION_PREFIX)


#: ``medtl.code.source`` values: where medtl's commit was read.
CODE_SOURCES = ("build", "git", "unknown")
_BUILD_INFO_MODULE = "medtl._build_info"

# Summary keys written by different manifest validators; the first one present wins.
_IMAGE_KEYS = ("n_images", "images", "n_rows", "rows", "n")
_PATIENT_KEYS = ("n_patients", "patients")
_CLASS_KEYS = ("class_counts", "label_counts", "classes", "labels")


@dataclass(frozen=True)
class CodeState:
    """medtl's own version and commit, and where the commit was read (``CODE_SOURCES``)."""

    version: str
    commit: str
    dirty: str
    source: str


def _git(args: list[str], cwd: str | Path | None, timeout: float = 10) -> str | None:
    """stdout of ``git ARGS`` at ``cwd``, or None when git is missing or the command fails."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(cwd: str | Path | None = None, pathspec: str | None = None) -> tuple[str, str]:
    """``(commit, dirty)`` of the git work tree at ``cwd``; ``("unknown", "unknown")`` if none.

    ``pathspec`` limits the dirty check to tracked files under it (``"."``: ``cwd`` itself).
    """
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return "unknown", "unknown"
    status = ["status", "--porcelain", "--untracked-files=no"]
    changes = _git(status + (["--", pathspec] if pathspec else []), cwd, timeout=30)
    dirty = "unknown" if changes is None else str(bool(changes)).lower()
    return commit, dirty


def _build_info() -> dict[str, Any] | None:
    """The values ``build_hooks.py`` wrote into ``medtl/_build_info.py``, if it exists."""
    try:
        mod = importlib.import_module(_BUILD_INFO_MODULE)
    except ImportError:
        return None
    return {k: getattr(mod, k, None) for k in ("VERSION", "COMMIT", "DIRTY")}


def medtl_code_state(package_dir: str | Path | None = None) -> CodeState:
    """Which medtl code is running: build-time record first, else git at the package folder.

    The git fallback only counts when ``package_dir/__init__.py`` is tracked by that
    repository: a medtl installed into a virtualenv inside the user's repository must not
    report the user's commit as medtl's.
    """
    info = _build_info() if package_dir is None else None
    if info and info.get("COMMIT") and info["COMMIT"] != "unknown":
        version = str(info.get("VERSION") or medtl.__version__)
        return CodeState(version, str(info["COMMIT"]), str(info.get("DIRTY") or "unknown"), "build")
    pkg = Path(package_dir) if package_dir is not None else Path(medtl.__file__).resolve().parent
    if _git(["ls-files", "--error-unmatch", "__init__.py"], pkg) is not None:
        commit, dirty = git_state(pkg, pathspec=".")
        if commit != "unknown":
            return CodeState(medtl.__version__, commit, dirty, "git")
    return CodeState(medtl.__version__, "unknown", "unknown", "unknown")


def user_repo_state(cwd: str | Path | None = None) -> tuple[str, str]:
    """``(commit, dirty)`` of the git repository the job runs from; ``("none", "none")`` if the
    working directory is in no repository."""
    commit, dirty = git_state(cwd)
    return ("none", "none") if commit == "unknown" else (commit, dirty)


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
    """All lineage tags as strings (MLflow tag values), keys listed in ``LINEAGE_KEYS``.

    ``cwd`` is where the user's repository is looked for (default: the working directory);
    medtl's own commit never depends on it (see the module doc).
    """
    counts = data_counts(data_summary)
    weights_info = weights_info or {}
    code = medtl_code_state()
    repo_commit, repo_dirty = user_repo_state(cwd)
    return {
        "medtl.manifest_hash": str(manifest_hash),
        "medtl.data.n_images": str(counts.get("n_images", "unknown")),
        "medtl.data.n_patients": str(counts.get("n_patients", "unknown")),
        "medtl.data.class_counts": json.dumps(counts.get("class_counts", {}), sort_keys=True),
        "medtl.git_commit": code.commit,
        "medtl.git_dirty": code.dirty,
        "medtl.version": code.version,
        "medtl.code.source": code.source,
        "medtl.user_repo.commit": repo_commit,
        "medtl.user_repo.dirty": repo_dirty,
        "medtl.backbone": cfg.model.backbone,
        "medtl.weights_source": str(weights_info.get("source") or "none"),
        "medtl.weights_sha256": str(weights_info.get("sha256") or "none"),
        "medtl.seed": str(cfg.seed),
        "medtl.strategy": cfg.strategy.name,
        "medtl.config_id": cfg.identity(),
    }
