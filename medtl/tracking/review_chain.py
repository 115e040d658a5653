"""The append-only review trail of a registered model: records, hashes and the chain check.

Every `medtl review` appends one :class:`ReviewRecord`. Its ``hash`` is the sha256 of its
canonical JSON (every field except ``hash`` and ``mac``), which includes the previous
record's hash and the record's position ``seq``; ``mac`` is HMAC-SHA256(audit key, hash).
What each tampering leaves behind:

- a field edited, hash not recomputed: the hash no longer matches (``edited``);
- a field edited and the hash recomputed by someone without the key: the mac no longer
  matches (``edited``); a record signed with another key: ``key_mismatch``;
- a record deleted from the middle: a gap in ``seq`` (``deleted``); records swapped or
  moved: ``seq`` or ``prev_hash`` point elsewhere (``reordered``);
- the last record(s) deleted: the chain itself still looks whole, so its head (count and
  hash, signed with the key) is anchored outside the tracking store (:class:`Anchor`,
  kept by :mod:`medtl.tracking.audit_keys`): ``truncated`` / ``head_mismatch``.

Pure: no files and no MLflow here (the registry stores records as tags, the key and
anchors live in files). Hashing and HMAC are the standard library's ``hashlib``/``hmac``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BREAK_KINDS",
    "GENESIS",
    "RECORD_FORMAT",
    "Anchor",
    "ChainBreak",
    "ChainCheck",
    "ReviewRecord",
    "canonical_json",
    "key_id",
    "last_records",
    "new_record",
    "record_from_json",
    "sign_anchor",
    "status_of",
    "verify_chain",
]

RECORD_FORMAT = "medtl-review/1"
GENESIS = "0" * 64  # the prev_hash of a model's first record

#: Every kind of break :func:`verify_chain` (and the audit) reports, with what it means.
BREAK_KINDS: dict[str, str] = {
    "malformed": "the record is not valid review JSON",
    "edited": "the record's content no longer matches its hash, or its hash its mac",
    "key_mismatch": "the record was signed with another audit key than the one in use",
    "deleted": "one or more records before this one are missing",
    "reordered": "the record sits at another position than the one it was written at",
    "truncated": "the anchor counts more records than the store holds: the last ones were deleted",
    "head_mismatch": "the last record is not the one the anchor signed",
    "anchor_missing": "the store holds review records but there is no anchor for them",
    "anchor_invalid": "the anchor's signature does not match (edited, or another key)",
    "key_missing": "no audit key: the records' macs and the anchor cannot be checked",
    "weights_mismatch": "the model bytes in the artifact store differ from those "
    "registered or reviewed",
    "alias_without_approval": "alias 'approved' points at a version whose last review "
    "record is not an approval",
    "status_mismatch": "the version's medtl.status tag disagrees with its review records",
}

_HASHED_FIELDS = (
    "format",
    "seq",
    "model",
    "version",
    "model_sha256",
    "decision",
    "by",
    "os_user",
    "host",
    "at",
    "note",
    "prev_hash",
    "key_id",
)


def canonical_json(obj: Any) -> str:
    """One byte-exact JSON text per value: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A short public fingerprint of the audit key (sha256 prefix), to tell keys apart."""
    return hashlib.sha256(b"medtl-audit-key:" + key).hexdigest()[:16]


@dataclass(frozen=True)
class ReviewRecord:
    """One review decision, immutable once written (see the module docstring)."""

    seq: int
    model: str
    version: str
    model_sha256: str
    decision: str
    by: str
    os_user: str
    host: str
    at: str  # UTC, ISO 8601
    note: str
    prev_hash: str
    key_id: str
    hash: str = ""
    mac: str = ""
    format: str = RECORD_FORMAT

    def content(self) -> dict[str, Any]:
        """The hashed fields (everything but ``hash`` and ``mac``)."""
        return {k: getattr(self, k) for k in _HASHED_FIELDS}

    def computed_hash(self) -> str:
        return _sha256(canonical_json(self.content()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return canonical_json(self.to_dict())


def new_record(
    prev: ReviewRecord | None,
    key: bytes,
    *,
    model: str,
    version: str,
    model_sha256: str,
    decision: str,
    by: str,
    note: str,
    os_user: str,
    host: str,
    at: str,
) -> ReviewRecord:
    """The record that follows ``prev`` (None: the model's first), hashed and signed."""
    rec = ReviewRecord(
        seq=1 if prev is None else prev.seq + 1,
        model=model,
        version=str(version),
        model_sha256=model_sha256,
        decision=decision,
        by=by,
        os_user=os_user,
        host=host,
        at=at,
        note=note,
        prev_hash=GENESIS if prev is None else prev.hash,
        key_id=key_id(key),
    )
    digest = rec.computed_hash()
    return dataclasses.replace(rec, hash=digest, mac=_mac(key, digest))


def record_from_json(text: str) -> ReviewRecord:
    """Parse a stored record. Raises ValueError when it is not a review record."""
    try:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(ReviewRecord)}
        if not isinstance(data, dict) or set(data) - names:
            raise ValueError(f"unexpected fields {sorted(set(data) - names)}")
        rec = ReviewRecord(**data)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(str(err)) from None
    if not isinstance(rec.seq, int):
        raise ValueError(f"seq {rec.seq!r} is not an integer")
    return rec


@dataclass(frozen=True)
class Anchor:
    """The signed head of a model's chain, held outside the tracking store."""

    count: int
    head: str
    at: str
    mac: str


def _anchor_message(store: str, model: str, count: int, head: str) -> str:
    return canonical_json({"store": store, "model": model, "count": count, "head": head})


def sign_anchor(key: bytes, store: str, model: str, count: int, head: str, at: str) -> Anchor:
    """The anchor for a chain of ``count`` records ending in ``head`` in ``store``."""
    return Anchor(count, head, at, _mac(key, _anchor_message(store, model, count, head)))


@dataclass(frozen=True)
class ChainBreak:
    """One problem: the record it is found at (``seq``; None for the chain as a whole)."""

    seq: int | None
    kind: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.seq, "kind": self.kind, "detail": self.detail}


@dataclass
class ChainCheck:
    """The parsed records (in stored order) and every break found, first bad record first."""

    records: list[ReviewRecord]
    breaks: list[ChainBreak] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def head(self) -> str | None:
        return self.records[-1].hash if self.records else None


def _check_record(
    rec: ReviewRecord,
    tag_seq: int,
    prev: ReviewRecord | None,
    key: bytes | None,
    hashes: set[str],
) -> ChainBreak | None:
    """The first problem of one record against its stored position and predecessor."""
    if rec.computed_hash() != rec.hash:
        return ChainBreak(tag_seq, "edited", "its content does not match its hash")
    if key is not None:
        if rec.key_id != key_id(key):
            return ChainBreak(
                tag_seq,
                "key_mismatch",
                f"signed with key {rec.key_id}, the audit key in use is {key_id(key)}",
            )
        if not hmac.compare_digest(rec.mac, _mac(key, rec.hash)):
            return ChainBreak(tag_seq, "edited", "its hash was recomputed without the audit key")
    if rec.seq != tag_seq:
        return ChainBreak(
            tag_seq, "reordered", f"written as record #{rec.seq}, stored as #{tag_seq}"
        )
    want_seq = 1 if prev is None else prev.seq + 1
    if rec.seq != want_seq:
        return ChainBreak(
            tag_seq, "deleted", f"record(s) #{want_seq}..#{rec.seq - 1} before it are missing"
        )
    want_prev = GENESIS if prev is None else prev.hash
    if rec.prev_hash != want_prev:
        if rec.prev_hash in hashes:
            return ChainBreak(
                tag_seq, "reordered", "it follows another record than the one before it"
            )
        return ChainBreak(tag_seq, "deleted", "the record it was written after is missing")
    return None


def _check_anchor(
    records: Sequence[ReviewRecord],
    key: bytes | None,
    anchor: Anchor | None,
    store: str,
    model: str,
) -> ChainBreak | None:
    """The chain's end against the anchor signed at the last review."""
    if anchor is None:
        if not records:
            return None
        return ChainBreak(
            None,
            "anchor_missing",
            f"{len(records)} record(s) in the store and no anchor for '{model}': give the "
            "anchor file the reviews wrote (MEDTL_AUDIT_ANCHOR)",
        )
    if key is None:
        return ChainBreak(None, "key_missing", "the anchor cannot be checked without the key")
    msg = _anchor_message(store, model, anchor.count, anchor.head)
    if not hmac.compare_digest(anchor.mac, _mac(key, msg)):
        return ChainBreak(None, "anchor_invalid", "the anchor's signature does not match")
    if anchor.count > len(records):
        return ChainBreak(
            None,
            "truncated",
            f"the anchor (signed {anchor.at}) counts {anchor.count} record(s), the store holds "
            f"{len(records)}: the last {anchor.count - len(records)} were deleted",
        )
    head = records[-1].hash if records else None
    if anchor.count < len(records) or head != anchor.head:
        return ChainBreak(
            records[-1].seq if records else None,
            "head_mismatch",
            f"the anchor signed record #{anchor.count} ({anchor.head[:12]}...), the store ends "
            f"at #{len(records)} ({(head or 'none')[:12]}...)",
        )
    return None


def verify_chain(
    entries: Iterable[tuple[int, str]],
    key: bytes | None,
    anchor: Anchor | None,
    *,
    store: str,
    model: str,
) -> ChainCheck:
    """Check a model's stored records (``(seq from the tag key, JSON)``) and its anchor.

    Breaks come sorted by record, so ``breaks[0]`` names the first bad record; breaks of
    the chain as a whole (anchor, key) follow. Without ``key`` the macs are not checked and
    a ``key_missing`` break is reported when there is anything to check.
    """
    stored = sorted(entries)
    check = ChainCheck(records=[])
    parsed: list[tuple[int, ReviewRecord]] = []
    for tag_seq, text in stored:
        try:
            parsed.append((tag_seq, record_from_json(text)))
        except ValueError as err:
            check.breaks.append(ChainBreak(tag_seq, "malformed", str(err)[:200]))
    hashes = {r.hash for _, r in parsed}
    prev: ReviewRecord | None = None
    for tag_seq, rec in parsed:
        problem = _check_record(rec, tag_seq, prev, key, hashes)
        if problem is not None:
            check.breaks.append(problem)
        check.records.append(rec)
        prev = rec
    if key is None and stored:
        check.breaks.append(
            ChainBreak(None, "key_missing", "record macs cannot be checked without the key")
        )
    end = _check_anchor(check.records, key, anchor, store, model)
    if end is not None and not (end.kind == "key_missing" and key is None and stored):
        check.breaks.append(end)
    check.breaks.sort(key=lambda b: (b.seq is None, b.seq or 0))
    return check


def last_records(records: Iterable[ReviewRecord]) -> dict[str, ReviewRecord]:
    """Each version's latest record (the one that decides its status)."""
    out: dict[str, ReviewRecord] = {}
    for rec in records:
        out[str(rec.version)] = rec
    return out


def status_of(last: Mapping[str, ReviewRecord], version: str | int) -> str:
    """``approved`` / ``rejected`` from the version's last record, else ``pending_review``."""
    rec = last.get(str(version))
    if rec is None:
        return "pending_review"
    return "approved" if rec.decision == "approve" else "rejected"
