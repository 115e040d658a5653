"""The review trail of registered models in MLflow: append a signed review, check a model's
chain, its anchor, alias ``approved`` and the model bytes, and answer the predict gate.

- ``review`` appends a :class:`~medtl.tracking.review_chain.ReviewRecord` to the model's
  chain, stored as registered-model tags ``medtl.review_chain.<seq>``, re-signs the chain's
  head into the anchor file (:mod:`medtl.tracking.audit_keys`) and moves alias ``approved``:
  the only way it moves. Registered-model tags because they live in the store's database
  beside the aliases they justify, show in the MLflow UI, survive a version's deletion and
  are written in one transaction each; they are mutable, which the chain makes evident.
  Review notes are free text: write no patient identifiers in them.
- ``integrity_section`` is the check ``medtl audit`` reports (``docs/audit_schema.md``).
- ``approval_status`` is the approval gate of ``medtl predict``: the same checks, one answer.

The model's identity is ``medtl.model_sha256`` (:func:`medtl.bundle.bundle_sha256` of the
registered bundle), recorded at registration and recomputed from the artifact store here.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from medtl.config import TrackingConfig
from medtl.errors import ConfigError, MedtlError, look_up_option
from medtl.tracking.audit_keys import AuditKey, anchor_book, anchor_file, load_key, read_anchor
from medtl.tracking.review_chain import (
    Anchor,
    ChainBreak,
    ChainCheck,
    ReviewRecord,
    key_id,
    last_records,
    new_record,
    sign_anchor,
    status_of,
    verify_chain,
)
from medtl.tracking.store import import_mlflow, make_client, resolve_tracking_uri

__all__ = [
    "ALIAS_APPROVED",
    "DECISIONS",
    "MODEL_SHA_TAG",
    "Approval",
    "ChainState",
    "approval_status",
    "chain_entries",
    "describe_break",
    "get_version",
    "integrity_section",
    "logged_bundle_sha256",
    "model_chain",
    "model_id_of",
    "redact_uri",
    "review",
]

ALIAS_APPROVED = "approved"
DECISIONS = ("approve", "reject")
MODEL_SHA_TAG = "medtl.model_sha256"
_CHAIN_TAG = re.compile(r"^medtl\.review_chain\.(\d+)$")
# A record must fit a registered-model tag (5000 characters in MLflow's database schema).
MAX_BY_CHARS = 200
MAX_NOTE_CHARS = 2000


def redact_uri(uri: str) -> str:
    """A tracking URI without ``user:password@`` credentials."""
    return re.sub(r"://[^/@]+@", "://", uri)


def logged_bundle_sha256(client: Any, mlflow: Any, uri: str, model_id: str) -> str:
    """:func:`medtl.bundle.bundle_sha256` of a logged model's bundle, downloaded now."""
    from medtl.bundle import bundle_sha256, find_bundle_dir

    loc = client.get_logged_model(model_id).artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="medtl-audit-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{loc}/artifacts/bundle", dst_path=tmp, tracking_uri=uri
        )
        return bundle_sha256(find_bundle_dir(path))


def get_version(client: Any, name: str, version: str | int) -> Any:
    """The model version, or an error listing the valid versions (or registered models)."""
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
            names = sorted(m.name for m in client.search_registered_models(max_results=100))
            raise MedtlError(
                f"no registered model '{name}' in this MLflow store. Registered models: "
                f"{', '.join(names) or 'none'}"
            ) from None
        raise MedtlError(
            f"model '{name}' has no version '{version}'. Valid versions: "
            f"{', '.join(map(str, versions))}"
        ) from None


def chain_entries(tags: Mapping[str, str]) -> list[tuple[int, str]]:
    """The review records among a registered model's tags: ``(seq, JSON)``, in order."""
    out = []
    for key, value in tags.items():
        m = _CHAIN_TAG.match(key)
        if m:
            out.append((int(m.group(1)), value))
    return sorted(out)


def _chain_tag(seq: int) -> str:
    return f"medtl.review_chain.{seq:06d}"  # zero-padded: the MLflow UI sorts tags as text


def describe_break(b: ChainBreak) -> str:
    """One line for a break: where, what kind, the detail."""
    where = f"record #{b.seq}" if b.seq is not None else "chain"
    return f"{where}: {b.kind} ({b.detail})"


def model_id_of(mv: Any) -> str | None:
    if getattr(mv, "model_id", None):
        return str(mv.model_id)
    src = str(mv.source or "")
    return src.removeprefix("models:/") if src.startswith("models:/m-") else None


def _version_sha256(client: Any, uri: str, mv: Any) -> str:
    """The registered version's bundle digest, recomputed from the artifact store now."""
    model_id = model_id_of(mv)
    if not model_id:
        raise MedtlError(
            f"model '{mv.name}' version {mv.version} is not a medtl logged model; it cannot be "
            "reviewed or audited"
        )
    return logged_bundle_sha256(client, import_mlflow(), uri, model_id)


def _review_text(by: str, note: str) -> tuple[str, str]:
    by, note = by.strip(), note.strip()
    if not by:
        raise ConfigError("a review needs a reviewer: --by 'name or role'")
    if len(by) > MAX_BY_CHARS or len(note) > MAX_NOTE_CHARS:
        raise ConfigError(
            f"--by has {len(by)} characters (at most {MAX_BY_CHARS}), --note {len(note)} (at "
            f"most {MAX_NOTE_CHARS}); put longer findings in a document and cite it in the note"
        )
    return by, note


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers without a passwd entry for the uid
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _apply_decision(client: Any, name: str, version: str, decision: str) -> None:
    """Status tag for the MLflow UI; approve moves ``approved`` here, reject takes it off."""
    status = "approved" if decision == "approve" else "rejected"
    client.set_model_version_tag(name, version, "medtl.status", status)
    aliases = client.get_registered_model(name).aliases
    if decision == "approve":
        client.set_registered_model_alias(name, ALIAS_APPROVED, version)
    elif str(aliases.get(ALIAS_APPROVED)) == version:
        client.delete_registered_model_alias(name, ALIAS_APPROVED)


def _bytes_to_review(client: Any, uri: str, mv: Any) -> str:
    """The digest a reviewer approves; refused when the bytes changed since registration."""
    digest = _version_sha256(client, uri, mv)
    registered = mv.tags.get(MODEL_SHA_TAG)
    if registered and registered != digest:
        raise MedtlError(
            f"model '{mv.name}' version {mv.version}: the bundle in the artifact store (sha256 "
            f"{digest[:16]}...) is not the one registered ({registered[:16]}...); it was "
            f"modified or swapped. Run `medtl audit {mv.name}/{mv.version}`; do not review it"
        )
    return digest


def review(
    name: str,
    version: str | int,
    decision: str,
    by: str,
    note: str = "",
    tcfg: TrackingConfig | None = None,
) -> dict[str, Any]:
    """Append a signed review record; approve moves alias ``approved`` to the version.

    Reject removes ``approved`` when it pointed at this version. Refused when the chain is
    already broken or the model bytes differ from the registered ones. Returns the record
    (``seq, decision, by, at, model_sha256, hash, ...``) plus ``key_created``: the key file
    this review created, or None.
    """
    decision = look_up_option(decision, DECISIONS, "review decision")
    by, note = _review_text(by, note)
    uri = resolve_tracking_uri(tcfg)
    client = make_client(uri)
    mv = get_version(client, name, version)
    digest = _bytes_to_review(client, uri, mv)
    key = load_key(create=True)
    if key is None:  # create=True always gives a key; this keeps the type checker honest
        raise MedtlError("no audit key could be created")
    store = redact_uri(uri)
    with anchor_book(anchor_file()) as book:
        check = verify_chain(
            chain_entries(client.get_registered_model(name).tags),
            key.key,
            book.get(store, name),
            store=store,
            model=name,
        )
        if not check.ok:
            raise MedtlError(
                f"the review chain of '{name}' is broken ({describe_break(check.breaks[0])}); "
                f"no review is appended to a broken chain. Run `medtl audit {name}`"
            )
        rec = new_record(
            check.records[-1] if check.records else None,
            key.key,
            model=name,
            version=str(mv.version),
            model_sha256=digest,
            decision=decision,
            by=by,
            note=note,
            os_user=_os_user(),
            host=socket.gethostname(),
            at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        client.set_registered_model_tag(name, _chain_tag(rec.seq), rec.to_json())
        if client.get_registered_model(name).tags.get(_chain_tag(rec.seq)) != rec.to_json():
            raise MedtlError(
                f"another review of '{name}' was written as record #{rec.seq} at the same time; "
                f"run `medtl audit {name}` and review again"
            )
        book.set(store, name, sign_anchor(key.key, store, name, rec.seq, rec.hash, rec.at))
    _apply_decision(client, name, str(mv.version), decision)
    return {**rec.to_dict(), "key_created": str(key.created) if key.created else None}


@dataclass(frozen=True)
class Approval:
    """The approval gate's answer for one version and the bytes about to be used."""

    approved: bool
    reason: str  # one line: who approved when, or why not
    record: dict[str, Any] | None = None  # the deciding review record


@dataclass(frozen=True)
class ChainState:
    """A model's checked chain and what it was checked with (key, anchor, anchor file)."""

    check: ChainCheck
    key: AuditKey | None
    anchor: Anchor | None
    anchor_path: str


def model_chain(client: Any, uri: str, name: str) -> ChainState:
    """The model's chain verified with the key and anchor from their files (never created)."""
    key = load_key(create=False)
    store = redact_uri(uri)
    path = anchor_file()
    anchor = read_anchor(path, store, name)
    check = verify_chain(
        chain_entries(client.get_registered_model(name).tags),
        key.key if key else None,
        anchor,
        store=store,
        model=name,
    )
    return ChainState(check, key, anchor, str(path))


def approval_status(
    name: str, version: str | int, model_sha256: str | None, tcfg: TrackingConfig | None = None
) -> Approval:
    """Whether ``name`` version ``version`` with bundle digest ``model_sha256`` is approved:
    the chain verifies (key, anchor) and the version's last record approves these bytes."""
    uri = resolve_tracking_uri(tcfg)
    check = model_chain(make_client(uri), uri, name).check
    if not check.ok:
        return Approval(
            False,
            f"the review chain of '{name}' cannot be trusted ({describe_break(check.breaks[0])});"
            f" run `medtl audit {name}`",
        )
    rec = last_records(check.records).get(str(version))
    if rec is None:
        return Approval(False, f"'{name}' version {version} has not been reviewed")
    when = f"by {rec.by} at {rec.at} (review record #{rec.seq})"
    if rec.decision != "approve":
        note = f": {rec.note}" if rec.note else ""
        return Approval(
            False, f"'{name}' version {version} was rejected {when}{note}", rec.to_dict()
        )
    if rec.model_sha256 != model_sha256:
        return Approval(
            False,
            f"'{name}' version {version} was approved {when} as sha256 "
            f"{rec.model_sha256[:16]}..., the bytes loaded are {str(model_sha256)[:16]}...",
            rec.to_dict(),
        )
    return Approval(True, f"approved {when}", rec.to_dict())


def _bytes_check(
    client: Any, uri: str, mv: Any, records: Sequence[ReviewRecord]
) -> tuple[dict[str, Any], list[ChainBreak]]:
    """The version's bundle digest now, against its registration tag and its review records."""
    from mlflow.exceptions import MlflowException

    registered = mv.tags.get(MODEL_SHA_TAG)
    reviewed = [r for r in records if r.version == str(mv.version)]
    section = {
        "registered": registered,
        "computed": None,
        "reviewed": sorted({r.model_sha256 for r in reviewed}),
    }
    try:
        computed = _version_sha256(client, uri, mv)
    except (MedtlError, MlflowException, OSError, ValueError) as err:
        detail = f"the registered bundle cannot be read: {str(err)[:200]}"
        return section, [ChainBreak(None, "weights_mismatch", detail)]
    section["computed"] = computed
    breaks = []
    bad = [r for r in reviewed if r.model_sha256 != computed]
    if bad:
        breaks.append(
            ChainBreak(
                bad[0].seq,
                "weights_mismatch",
                f"record #{bad[0].seq} {bad[0].decision}d sha256 {bad[0].model_sha256}; the "
                f"artifact store now holds {computed}",
            )
        )
    if registered and registered != computed:
        breaks.append(
            ChainBreak(
                None,
                "weights_mismatch",
                f"registered as sha256 {registered}; the artifact store now holds {computed}",
            )
        )
    return section, breaks


def _alias_breaks(rm: Any, last: Mapping[str, ReviewRecord]) -> list[ChainBreak]:
    """Alias ``approved`` must point at a version whose last record approves it."""
    approved = rm.aliases.get(ALIAS_APPROVED)
    if approved is None:
        return []
    rec = last.get(str(approved))
    if rec is not None and rec.decision == "approve":
        return []
    has = "no review record" if rec is None else f"last record #{rec.seq}, a {rec.decision}"
    return [
        ChainBreak(
            None,
            "alias_without_approval",
            f"alias 'approved' points at version {approved}, which has {has}; the alias moves "
            "only through `medtl review`",
        )
    ]


def _status_breaks(versions: Sequence[Any], last: Mapping[str, ReviewRecord]) -> list[ChainBreak]:
    """Each version's ``medtl.status`` tag (what the MLflow UI shows) against its records."""
    out = []
    for v in versions:
        tag = v.tags.get("medtl.status")
        chain = status_of(last, v.version)
        if tag and tag != "unknown" and tag != chain:
            out.append(
                ChainBreak(
                    None,
                    "status_mismatch",
                    f"version {v.version}: tag medtl.status is '{tag}', its review records "
                    f"say '{chain}'",
                )
            )
    return out


def integrity_section(
    client: Any, uri: str, rm: Any, mv: Any, versions: Sequence[Any], chain: ChainState
) -> dict[str, Any]:
    """The ``integrity`` section of an audit: every break found, first bad record first."""
    check, key, anchor = chain.check, chain.key, chain.anchor
    last = last_records(check.records)
    sha, weight_breaks = _bytes_check(client, uri, mv, check.records)
    breaks = [
        *check.breaks,
        *_alias_breaks(rm, last),
        *_status_breaks(versions, last),
        *weight_breaks,
    ]
    breaks.sort(key=lambda b: (b.seq is None, b.seq or 0))
    return {
        "ok": not breaks,
        "first_break": breaks[0].to_dict() if breaks else None,
        "breaks": [b.to_dict() for b in breaks],
        "chain": {"records": len(check.records), "head": check.head},
        "anchor": {
            "path": chain.anchor_path,
            "count": anchor.count if anchor else None,
            "head": anchor.head if anchor else None,
            "signed_at": anchor.at if anchor else None,
        },
        "key": {
            "source": key.source if key else None,
            "key_id": key_id(key.key) if key else None,
        },
        "model_sha256": sha,
    }
