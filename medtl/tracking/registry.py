"""Model registry: register a run's model, record clinical review decisions, audit lineage.

- ``register`` creates a model version from the parent run's logged model, tags it with the
  pooled metrics (value and CI) and the lineage tags, points alias ``candidate`` at it and
  attaches a model card (Markdown + HTML) to the run.
- ``review`` appends a decision to the version's history (``medtl.review.<n>.decision/by/
  note/at``, UTC) and moves alias ``approved``. Review notes are free text: write no patient
  identifiers in them.
- ``audit`` gathers data, code, weights, metrics, review history and run ids for a version.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medtl.config import TrackingConfig
from medtl.errors import ConfigError, MedtlError, look_up_option
from medtl.tracking.lineage import LINEAGE_KEYS
from medtl.tracking.model_card import build_model_card, format_metric, group_metrics
from medtl.tracking.store import import_mlflow, make_client, resolve_tracking_uri

__all__ = [
    "ALIAS_APPROVED",
    "ALIAS_CANDIDATE",
    "DECISIONS",
    "audit",
    "parse_model_spec",
    "register",
    "render_audit",
    "review",
    "review_history",
]

ALIAS_CANDIDATE = "candidate"
ALIAS_APPROVED = "approved"
DECISIONS = ("approve", "reject")
_REVIEW_TAG = re.compile(r"^medtl\.review\.(\d+)\.(decision|by|note|at)$")


def _redact_uri(uri: str) -> str:
    """A tracking URI without ``user:password@`` credentials."""
    return re.sub(r"://[^/@]+@", "://", uri)


def _run_ref(run_id_or_dir: str | Path, tcfg: TrackingConfig | None) -> tuple[str, str]:
    """``(run_id, tracking_uri)`` from a run id or a run folder's ``run_info.json``."""
    p = Path(run_id_or_dir)
    if p.is_dir():
        info_file = p / "run_info.json"
        if not info_file.is_file():
            raise MedtlError(
                f"'{p}' has no run_info.json: give a medtl run folder or an MLflow run id"
            )
        ml = json.loads(info_file.read_text()).get("mlflow") or {}
        if not ml.get("parent_run_id"):
            raise MedtlError(
                f"run '{p}' was trained with tracking disabled; re-run with tracking.enabled=true"
            )
        uri = resolve_tracking_uri(tcfg) if (tcfg and tcfg.uri) else None
        return ml["parent_run_id"], uri or ml.get("tracking_uri") or resolve_tracking_uri(tcfg)
    return str(run_id_or_dir), resolve_tracking_uri(tcfg)


def _download_json(mlflow: Any, uri: str, artifact_uri: str) -> dict[str, Any] | None:
    """A JSON artifact, or None when the run did not log it."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=uri
            )
        except Exception:  # absent artifact: MlflowException or OSError depending on the store
            return None
        return json.loads(Path(path).read_text())


def _card_info(client: Any, mlflow: Any, uri: str, run: Any, meta: Mapping[str, Any]) -> dict:
    run_info = _download_json(mlflow, uri, f"runs:/{run.info.run_id}/run_info.json") or {}
    metrics_json = _download_json(mlflow, uri, f"runs:/{run.info.run_id}/metrics.json") or {}
    tags = run.data.tags
    cfg = meta.get("config", {})
    data = {
        "images": tags.get("medtl.data.n_images"),
        "patients": tags.get("medtl.data.n_patients"),
        "class_counts": json.loads(tags.get("medtl.data.class_counts") or "{}"),
    }
    return {
        "description": cfg.get("description") or None,
        "task": meta.get("task"),
        "classes": meta.get("classes", []),
        "backbone": meta.get("backbone"),
        "strategy": cfg.get("strategy", {}).get("name"),
        "created": meta.get("created"),
        "data": data,
        "metrics": group_metrics(run.data.metrics),
        "ci": cfg.get("evaluation", {}).get("ci", 0.95),
        "subgroups": metrics_json.get("subgroups"),
        "threshold": meta.get("threshold"),
        "threshold_method": run_info.get("threshold_method") or meta.get("threshold_method"),
        "lineage": {k: v for k, v in tags.items() if k.startswith("medtl.") and k in LINEAGE_KEYS},
    }


def _bundle_meta(client: Any, mlflow: Any, uri: str, model_id: str) -> dict[str, Any]:
    loc = client.get_logged_model(model_id).artifact_location.rstrip("/")
    meta = _download_json(mlflow, uri, f"{loc}/artifacts/bundle/medtl_model.json")
    if meta is None:
        raise MedtlError(f"logged model {model_id} holds no medtl bundle (medtl_model.json)")
    return meta


def register(
    run_id_or_dir: str | Path,
    name: str,
    tcfg: TrackingConfig | None = None,
    *,
    intended_use: str | None = None,
    limitations: list[str] | None = None,
) -> dict[str, Any]:
    """Register the run's logged model as a new version of ``name`` (alias ``candidate``).

    Returns ``{"name", "version", "run_id", "model_id", "model_uri", "alias", "model_card"}``.
    Raises MedtlError when the run has no logged model.
    """
    from mlflow.exceptions import MlflowException

    run_id, uri = _run_ref(run_id_or_dir, tcfg)
    mlflow = import_mlflow()
    client = make_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise MedtlError(f"no MLflow run '{run_id}' at {_redact_uri(uri)}") from None
    model_id = run.data.tags.get("medtl.model_id")
    if not model_id:
        raise MedtlError(
            f"run '{run_id}' has no logged model (was tracking.log_model false, or did the run "
            "fail before the final model?)"
        )
    meta = _bundle_meta(client, mlflow, uri, model_id)
    info = _card_info(client, mlflow, uri, run, meta)

    tags: dict[str, str] = {k: str(v) for k, v in info["lineage"].items()}
    for metric, m in info["metrics"].items():
        tags[f"medtl.metric.{metric}"] = format_metric(m, digits=4)
    tags["medtl.run_id"] = run_id
    tags["medtl.threshold"] = json.dumps(meta.get("threshold"))
    tags["medtl.classes"] = json.dumps(meta.get("classes"))
    tags["medtl.task"] = str(meta.get("task"))
    tags["medtl.status"] = "pending_review"

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    headline = next(
        (f"{k} {format_metric(m)}" for k, m in info["metrics"].items() if "auroc" in k.lower()), ""
    )
    description = (
        f"medtl {meta.get('task')} classifier ({', '.join(meta.get('classes', []))}) on "
        f"{meta.get('backbone')}, strategy {info['strategy']}. {headline} "
        f"Model card: runs:/{run_id}/model_card/. Pending clinical review."
    ).replace("  ", " ")
    mv = client.create_model_version(
        name,
        source=f"models:/{model_id}",
        run_id=run_id,
        tags=tags,
        description=description,
        model_id=model_id,
    )
    client.set_registered_model_alias(name, ALIAS_CANDIDATE, mv.version)

    info.update(name=name, version=mv.version, intended_use=intended_use, limitations=limitations)
    md, html_text = build_model_card(info)
    stem = f"model_card/{_safe(name)}-v{mv.version}"
    client.log_text(run_id, md, f"{stem}.md")
    client.log_text(run_id, html_text, f"{stem}.html")
    client.set_model_version_tag(
        name, mv.version, "medtl.model_card", f"runs:/{run_id}/{stem}.html"
    )
    return {
        "name": name,
        "version": str(mv.version),
        "run_id": run_id,
        "model_id": model_id,
        "model_uri": f"models:/{name}/{mv.version}",
        "alias": ALIAS_CANDIDATE,
        "model_card": f"runs:/{run_id}/{stem}.html",
    }


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]", "_", name)


def review_history(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """Review entries from version tags, oldest first: ``{n, decision, by, note, at}``."""
    entries: dict[int, dict[str, Any]] = {}
    for key, value in tags.items():
        m = _REVIEW_TAG.match(key)
        if m:
            entries.setdefault(int(m.group(1)), {"n": int(m.group(1))})[m.group(2)] = value
    return [entries[n] for n in sorted(entries)]


def _get_version(client: Any, name: str, version: str | int) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        try:
            versions = sorted(
                int(v.version) for v in client.search_model_versions(f"name = '{name}'")
            )
        except MlflowException:
            versions = []
        if not versions:
            raise MedtlError(f"no registered model '{name}' in this MLflow store") from None
        raise MedtlError(
            f"model '{name}' has no version '{version}'. Valid versions: "
            f"{', '.join(map(str, versions))}"
        ) from None


def review(
    name: str,
    version: str | int,
    decision: str,
    by: str,
    note: str = "",
    tcfg: TrackingConfig | None = None,
) -> dict[str, Any]:
    """Record a review decision on a version; approve moves alias ``approved`` to it.

    Reject removes ``approved`` when it pointed at this version. Returns the new entry.
    """
    decision = look_up_option(decision, DECISIONS, "review decision")
    if not by.strip():
        raise ConfigError("a review needs a reviewer: --by 'name or role'")
    client = make_client(resolve_tracking_uri(tcfg))
    mv = _get_version(client, name, version)
    n = len(review_history(mv.tags)) + 1
    entry = {
        "n": n,
        "decision": decision,
        "by": by,
        "note": note,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for key in ("decision", "by", "note", "at"):
        client.set_model_version_tag(name, mv.version, f"medtl.review.{n}.{key}", entry[key])
    client.set_model_version_tag(
        name, mv.version, "medtl.status", "approved" if decision == "approve" else "rejected"
    )
    aliases = client.get_registered_model(name).aliases
    if decision == "approve":
        client.set_registered_model_alias(name, ALIAS_APPROVED, mv.version)
    elif str(aliases.get(ALIAS_APPROVED)) == str(mv.version):
        client.delete_registered_model_alias(name, ALIAS_APPROVED)
    return entry


def parse_model_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME`` / ``NAME@ALIAS`` / ``NAME/VERSION`` (optionally ``models:/``) -> parts."""
    s = spec.removeprefix("models:/")
    if "@" in s:
        name, alias = s.rsplit("@", 1)
        return name, alias, None
    if "/" in s:
        name, version = s.rsplit("/", 1)
        return name, None, version
    return s, None, None


def audit(spec: str, tcfg: TrackingConfig | None = None) -> dict[str, Any]:
    """Lineage of a model version: data, code, weights, metrics with CIs, reviews, run ids.

    ``NAME`` alone audits the ``approved`` version, else the newest one.
    """
    uri = resolve_tracking_uri(tcfg)
    client = make_client(uri)
    rm, mv, all_versions = _audited_version(client, spec, uri)
    tags = dict(mv.tags)
    run = _parent_run_facts(client, mv.run_id or tags.get("medtl.run_id"))
    lin = {
        **{k: v for k, v in run["tags"].items() if k in LINEAGE_KEYS},
        **{k: v for k, v in tags.items() if k in LINEAGE_KEYS},
    }
    return {
        "model": _model_section(rm, mv, tags),
        **_lineage_sections(lin),
        "metrics": group_metrics(run["metrics"]),
        "reviews": review_history(tags),
        "runs": {
            "tracking_uri": _redact_uri(uri),
            "experiment_id": run["experiment_id"],
            "parent_run_id": run["run_id"],
            "fold_run_ids": run["fold_ids"],
            "model_id": getattr(mv, "model_id", None)
            or (
                mv.source.removeprefix("models:/")
                if str(mv.source).startswith("models:/")
                else None
            ),
        },
        "versions": [
            {
                "version": str(v.version),
                "status": v.tags.get("medtl.status", "unknown"),
                "aliases": _aliases_of(rm, v.version),
            }
            for v in all_versions
        ],
    }


def _aliases_of(rm: Any, version: Any) -> list[str]:
    """The registered model's aliases that point at ``version``."""
    return sorted(a for a, v in rm.aliases.items() if str(v) == str(version))


def _audited_version(client: Any, spec: str, uri: str) -> tuple[Any, Any, list[Any]]:
    """The registered model, the version ``spec`` names (alias, number, else approved, else
    newest) and all its versions in order."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_spec(spec)
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        raise MedtlError(f"no registered model '{name}' at {_redact_uri(uri)}") from None
    if alias is not None:
        if alias not in rm.aliases:
            raise ConfigError(
                f"model '{name}' has no alias '{alias}'. Valid aliases: "
                f"{', '.join(sorted(rm.aliases)) or 'none'}"
            )
        version = str(rm.aliases[alias])
    all_versions = sorted(
        client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)
    )
    if version is None:
        if ALIAS_APPROVED in rm.aliases:
            version = str(rm.aliases[ALIAS_APPROVED])
        elif all_versions:
            version = str(all_versions[-1].version)
        else:
            raise MedtlError(f"model '{name}' has no versions yet")
    return rm, _get_version(client, name, version), all_versions


def _parent_run_facts(client: Any, run_id: str | None) -> dict[str, Any]:
    """Tags, metrics, experiment and fold run ids of the version's training run."""
    facts: dict[str, Any] = {
        "run_id": run_id,
        "tags": {},
        "metrics": {},
        "experiment_id": None,
        "fold_ids": [],
    }
    if not run_id:
        return facts
    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    folds = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    facts.update(
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        experiment_id=experiment_id,
        fold_ids=sorted(r.info.run_id for r in folds),
    )
    return facts


def _model_section(rm: Any, mv: Any, tags: Mapping[str, str]) -> dict[str, Any]:
    """The audited version itself: name, number, aliases, status, decisions it carries."""
    return {
        "name": rm.name,
        "version": str(mv.version),
        "aliases": _aliases_of(rm, mv.version),
        "status": tags.get("medtl.status", "unknown"),
        "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(
            timespec="seconds"
        ),
        "description": mv.description,
        "model_card": tags.get("medtl.model_card"),
        "task": tags.get("medtl.task"),
        "classes": json.loads(tags.get("medtl.classes", "[]")),
        "threshold": json.loads(tags.get("medtl.threshold", "null")),
    }


def _lineage_sections(lin: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The data, code and weights a version came from, out of its lineage tags."""
    return {
        "data": {
            "manifest_hash": lin.get("medtl.manifest_hash"),
            "n_images": lin.get("medtl.data.n_images"),
            "n_patients": lin.get("medtl.data.n_patients"),
            "class_counts": json.loads(lin.get("medtl.data.class_counts") or "{}"),
        },
        "code": {
            "git_commit": lin.get("medtl.git_commit"),
            "git_dirty": lin.get("medtl.git_dirty"),
            "medtl_version": lin.get("medtl.version"),
            "config_id": lin.get("medtl.config_id"),
            "seed": lin.get("medtl.seed"),
            "strategy": lin.get("medtl.strategy"),
        },
        "weights": {
            "backbone": lin.get("medtl.backbone"),
            "source": lin.get("medtl.weights_source"),
            "sha256": lin.get("medtl.weights_sha256"),
        },
    }


def render_audit(info: Mapping[str, Any]) -> str:
    """Readable Markdown of an :func:`audit` result (the `medtl audit` output)."""
    m = info["model"]
    lines = [
        f"# Audit: {m['name']} version {m['version']}",
        "",
        f"- status: {m['status']}; aliases: {', '.join(m['aliases']) or 'none'}",
        f"- created: {m['created']}; task: {m['task']}; classes: {', '.join(m['classes'])}",
        f"- operating threshold: {json.dumps(m['threshold'])}",
        f"- model card: {m.get('model_card') or 'none'}",
        "",
        "## Data",
    ]
    d = info["data"]
    lines += [
        f"- manifest sha256: {d['manifest_hash']}",
        f"- images: {d['n_images']}; patients: {d['n_patients']}",
        f"- class counts: {json.dumps(d['class_counts'], sort_keys=True)}",
        "",
        "## Code",
    ]
    lines += [f"- {k}: {v}" for k, v in info["code"].items()]
    lines += ["", "## Weights"] + [f"- {k}: {v}" for k, v in info["weights"].items()]
    lines += ["", "## Metrics (pooled out-of-fold, value and CI)"]
    lines += [f"- {k}: {format_metric(v)}" for k, v in info["metrics"].items()] or ["- none"]
    lines += ["", "## Review history"]
    lines += [
        f"- #{r['n']} {r.get('at', '?')}: {r.get('decision', '?')} by {r.get('by', '?')}"
        + (f" ({r['note']})" if r.get("note") else "")
        for r in info["reviews"]
    ] or ["- not reviewed yet"]
    r = info["runs"]
    lines += [
        "",
        "## Runs",
        f"- tracking: {r['tracking_uri']} (experiment {r['experiment_id']})",
        f"- parent run: {r['parent_run_id']}",
        f"- fold runs: {', '.join(r['fold_run_ids']) or 'none'}",
        f"- logged model: {r['model_id']}",
        "",
        "## All versions",
    ]
    lines += [
        f"- v{v['version']}: {v['status']}"
        + (f" [{', '.join(v['aliases'])}]" if v["aliases"] else "")
        for v in info["versions"]
    ]
    return "\n".join(lines) + "\n"
