"""Model registry: register a run's model, record clinical review decisions, audit lineage.

- ``register`` creates a model version from the parent run's logged model, tags it with the
  pooled metrics (value and CI) and the lineage tags, points alias ``candidate`` at it and
  attaches a model card (Markdown + HTML) to the run.
  It records the model's identity, ``medtl.model_sha256`` (:func:`medtl.bundle.bundle_sha256`
  of the registered bundle).
- ``review`` appends a signed record to the model's review chain and moves alias
  ``approved``; ``approval_status`` is the predict gate (both in
  :mod:`medtl.tracking.review_trail`, re-exported here).
- ``audit`` gathers data, code, weights, metrics, review records and run ids for a version,
  and checks the chain, its anchor, the alias and the model bytes (``integrity``).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medtl.config import CardConfig, TrackingConfig
from medtl.errors import ConfigError, MedtlError
from medtl.tracking.lineage import is_lineage_key
from medtl.tracking.model_card import (
    build_model_card,
    format_metric,
    group_metrics,
    summary_metrics,
)
from medtl.tracking.review_chain import last_records, status_of
from medtl.tracking.review_trail import (
    ALIAS_APPROVED,
    DECISIONS,
    MODEL_SHA_TAG,
    Approval,
    approval_status,
    integrity_section,
    model_chain,
    model_id_of,
    review,
)
from medtl.tracking.review_trail import get_version as _get_version
from medtl.tracking.review_trail import logged_bundle_sha256 as _logged_bundle_sha256
from medtl.tracking.review_trail import redact_uri as _redact_uri
from medtl.tracking.store import import_mlflow, make_client, resolve_tracking_uri

__all__ = [
    "ALIAS_APPROVED",
    "ALIAS_CANDIDATE",
    "AUDIT_SCHEMA_VERSION",
    "DECISIONS",
    "MODEL_SHA_TAG",
    "Approval",
    "approval_status",
    "audit",
    "parse_model_spec",
    "register",
    "render_audit",
    "review",
    "review_history",
]

ALIAS_CANDIDATE = "candidate"
_REVIEW_TAG = re.compile(r"^medtl\.review\.(\d+)\.(decision|by|note|at)$")  # before the chain
AUDIT_SCHEMA_VERSION = "medtl-audit/1"


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
    """What the model card shows, from the run's tags, run_info.json and metrics.json."""
    run_info = _download_json(mlflow, uri, f"runs:/{run.info.run_id}/run_info.json") or {}
    metrics_json = _download_json(mlflow, uri, f"runs:/{run.info.run_id}/metrics.json") or {}
    tags = run.data.tags
    cfg = meta.get("config", {})
    data = {
        "images": tags.get("medtl.data.n_images"),
        "patients": tags.get("medtl.data.n_patients"),
        "class_counts": json.loads(tags.get("medtl.data.class_counts") or "{}"),
    }
    pooled = summary_metrics((metrics_json.get("pooled") or {}).get("summary") or {})
    before = summary_metrics((metrics_json.get("recalibration") or {}).get("before") or {})
    listed = run_info.get("n_images_listed")
    return {
        "description": cfg.get("description") or None,
        "task": meta.get("task"),
        "classes": meta.get("classes", []),
        "backbone": meta.get("backbone"),
        "strategy": cfg.get("strategy", {}).get("name"),
        "created": meta.get("created"),
        "card": cfg.get("card") or {},
        "data": data,
        "participants": run_info.get("data_summary") or {},
        "quarantine": {
            "n": len(run_info.get("quarantine") or []),
            "listed": listed,
            "by": run_info.get("quarantine_breakdown") or {},
        }
        if listed is not None
        else None,
        "metrics": group_metrics(run.data.metrics),
        "performance": pooled,
        "calibration_before": before,
        "ci": cfg.get("evaluation", {}).get("ci", 0.95),
        "n_boot": metrics_json.get("n_boot"),
        "subgroups": metrics_json.get("subgroups"),
        "subgroups_missing": metrics_json.get("subgroups_missing"),
        "target": metrics_json.get("target"),
        "threshold": meta.get("threshold"),
        "threshold_method": run_info.get("threshold_method") or meta.get("threshold_method"),
        "threshold_source": run_info.get("threshold_source"),
        "selection": run_info.get("selection"),
        "lineage": {k: v for k, v in tags.items() if is_lineage_key(k)},
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
    card: CardConfig | None = None,
) -> dict[str, Any]:
    """Register the run's logged model as a new version of ``name`` (alias ``candidate``).

    The model card takes the pipeline's ``card:`` section, with the items set in ``card``
    (``medtl register --card``) in their place. Returns ``{"name", "version", "run_id",
    "model_id", "model_uri", "alias", "model_card"}``. Raises MedtlError when the run has no
    logged model.
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
    tags[MODEL_SHA_TAG] = _logged_bundle_sha256(client, mlflow, uri, model_id)

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

    if card is not None:  # the file's items win; the pipeline's stay for the rest
        info["card"] = {**info["card"], **card.model_dump(exclude_unset=True)}
    info.update(name=name, version=mv.version)
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
    """Lineage of a model version: data, code, weights, metrics with CIs, reviews, run ids,
    and ``integrity``: the review chain, its anchor, alias ``approved`` and the model bytes
    checked. ``ok`` is False on any break. Schema: ``docs/audit_schema.md``.

    ``NAME`` alone audits the ``approved`` version, else the newest one.
    """
    uri = resolve_tracking_uri(tcfg)
    client = make_client(uri)
    rm, mv, all_versions = _audited_version(client, spec, uri)
    tags = dict(mv.tags)
    run = _parent_run_facts(client, mv.run_id or tags.get("medtl.run_id"))
    lin = {
        **{k: v for k, v in run["tags"].items() if is_lineage_key(k)},
        **{k: v for k, v in tags.items() if is_lineage_key(k)},
    }
    chain = model_chain(client, uri, rm.name)
    last = last_records(chain.check.records)
    integrity = integrity_section(client, uri, rm, mv, all_versions, chain)
    return {
        "schema_version": AUDIT_SCHEMA_VERSION,
        "ok": integrity["ok"],
        "model": {**_model_section(rm, mv, tags), "status": status_of(last, mv.version)},
        "integrity": integrity,
        **_lineage_sections(lin),
        "metrics": group_metrics(run["metrics"]),
        "reviews": [r.to_dict() for r in chain.check.records if r.version == str(mv.version)],
        "legacy_reviews": review_history(tags),
        "runs": {
            "tracking_uri": _redact_uri(uri),
            "experiment_id": run["experiment_id"],
            "parent_run_id": run["run_id"],
            "fold_run_ids": run["fold_ids"],
            "model_id": model_id_of(mv),
        },
        "versions": [
            {
                "version": str(v.version),
                "status": status_of(last, v.version),
                "status_tag": v.tags.get("medtl.status"),
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
        # all null for a model trained without domain adaptation
        "adaptation": {
            key: lin.get(f"medtl.adaptation.{key}")
            for key in (
                "method",
                "target_manifest_sha256",
                "target_images",
                "target_patients",
                "parent_model",
                "parent_version",
            )
        },
    }


def _break_line(b: Mapping[str, Any]) -> str:
    where = f"record #{b['record']}" if b.get("record") is not None else "chain"
    return f"{where}: {b['kind']}: {b['detail']}"


def _integrity_lines(integrity: Mapping[str, Any]) -> list[str]:
    """The integrity section: every break when it failed; what was verified when not."""
    breaks = integrity["breaks"]
    if breaks:
        return [
            f"## Integrity: FAILED, {len(breaks)} problem(s)",
            f"- first bad: {_break_line(integrity['first_break'])}",
            *[f"- {_break_line(b)}" for b in breaks[1:]],
            "",
        ]
    chain, key, sha = integrity["chain"], integrity["key"], integrity["model_sha256"]
    recorded = (
        f"{chain['records']} record(s), head {chain['head'][:16]}..., signed with key "
        f"{key['key_id']} ({key['source']}) and matching the anchor in "
        f"{integrity['anchor']['path']}"
        if chain["records"]
        else "no review records yet"
    )
    return [
        "## Integrity: verified",
        f"- review chain: {recorded}",
        f"- model bytes: sha256 {sha['computed']}, as registered"
        + (" and as reviewed" if sha["reviewed"] else ""),
        "",
    ]


def render_audit(info: Mapping[str, Any]) -> str:
    """Readable Markdown of an :func:`audit` result (the `medtl audit` output); a failed
    audit says so in its title and lists every break before anything else."""
    m = info["model"]
    failed = not info["ok"]
    lines = [
        f"# Audit: {m['name']} version {m['version']}" + (" (FAILED)" if failed else ""),
        "",
        *_integrity_lines(info["integrity"]),
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
    lines += ["", "## Review history" + (" (untrusted: the integrity check failed)" * failed)]
    lines += [
        f"- #{r['seq']} {r['at']}: {r['decision']} by {r['by']}"
        + (f" ({r['note']})" if r.get("note") else "")
        + f"; os user {r['os_user']} on {r['host']}; sha256 {r['model_sha256'][:16]}..."
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
