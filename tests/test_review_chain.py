"""The tamper-evident review trail: the pure chain check, then tampering with a real SQLite
MLflow store (edit and re-hash, delete, delete the last, reorder, swap the weights, move the
alias by hand), the `medtl review`/`medtl audit` commands, and the documented JSON schema."""

from __future__ import annotations

import dataclasses
import json
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from tracking_helpers import tiny_tracked_run

from medtl.config import TrackingConfig
from medtl.errors import ConfigError, MedtlError
from medtl.tracking.review_chain import (
    BREAK_KINDS,
    GENESIS,
    ReviewRecord,
    canonical_json,
    new_record,
    sign_anchor,
    verify_chain,
)

ROOT = Path(__file__).parent.parent
KEY = b"k" * 32
OTHER_KEY = b"o" * 32
STORE, MODEL = "sqlite:////tmp/x.db", "cxr"


# ---------------------------------------------------------------- pure chain
def _chain(n: int = 3, key: bytes = KEY) -> list[ReviewRecord]:
    out: list[ReviewRecord] = []
    for i in range(n):
        out.append(
            new_record(
                out[-1] if out else None,
                key,
                model=MODEL,
                version=str(1 + i // 2),
                model_sha256=f"{i:064x}",
                decision=("approve", "reject")[i % 2],
                by=f"Dr {i}",
                note="",
                os_user="u",
                host="h",
                at=f"2026-12-0{i + 1}T10:00:00+00:00",
            )
        )
    return out


def _entries(records: list[ReviewRecord]) -> list[tuple[int, str]]:
    return [(r.seq, r.to_json()) for r in records]


def _anchor(records: list[ReviewRecord], key: bytes = KEY):
    return sign_anchor(key, STORE, MODEL, len(records), records[-1].hash, "t")


def _rehash(rec: ReviewRecord, **changes) -> ReviewRecord:
    """An edit by someone without the key: content changed, hash recomputed, mac kept."""
    edited = dataclasses.replace(rec, **changes)
    return dataclasses.replace(edited, hash=edited.computed_hash())


def test_an_untouched_chain_verifies_and_links_each_record_to_the_one_before():
    recs = _chain(3)
    check = verify_chain(_entries(recs), KEY, _anchor(recs), store=STORE, model=MODEL)
    assert check.ok and check.head == recs[-1].hash
    assert recs[0].prev_hash == GENESIS and recs[2].prev_hash == recs[1].hash
    assert recs[1].hash == recs[1].computed_hash() != recs[0].hash
    # Canonical JSON is byte-exact: key order and spacing never change the hash.
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'


def _tampered(kind: str) -> tuple[list[tuple[int, str]], bytes | None, object]:
    """Stored entries, the key in use and the anchor after one kind of tampering."""
    recs = _chain(3)
    entries, key, anchor = _entries(recs), KEY, _anchor(recs)
    if kind == "edit_no_rehash":
        entries[1] = (2, recs[1].to_json().replace('"by":"Dr 1"', '"by":"Dr X"'))
    elif kind == "edit_rehash":
        entries[1] = (2, _rehash(recs[1], decision="approve").to_json())
    elif kind == "edit_rehash_all":  # edit #2 and re-link #3 to it: still needs the key
        r2 = _rehash(recs[1], decision="approve")
        entries[1:] = [(2, r2.to_json()), (3, _rehash(recs[2], prev_hash=r2.hash).to_json())]
    elif kind == "delete_middle":
        del entries[1]
    elif kind == "delete_last":
        del entries[2]
    elif kind == "reorder":
        entries[0], entries[1] = (1, entries[1][1]), (2, entries[0][1])
    elif kind == "other_key":
        key = OTHER_KEY
    elif kind == "anchor_edited":
        anchor = dataclasses.replace(anchor, count=2, head=recs[1].hash)
    elif kind == "no_anchor":
        anchor = None
    elif kind == "no_key":
        key = None
    elif kind == "malformed":
        entries[2] = (3, "{not json")
    return entries, key, anchor


@pytest.mark.parametrize(
    ("kind", "first_record", "first_kind"),
    [
        ("edit_no_rehash", 2, "edited"),
        ("edit_rehash", 2, "edited"),
        ("edit_rehash_all", 2, "edited"),
        ("delete_middle", 3, "deleted"),
        ("delete_last", None, "truncated"),
        ("reorder", 1, "reordered"),
        ("other_key", 1, "key_mismatch"),
        ("anchor_edited", None, "anchor_invalid"),
        ("no_anchor", None, "anchor_missing"),
        ("no_key", None, "key_missing"),
        ("malformed", 3, "malformed"),
    ],
)
def test_each_tampering_is_named_at_the_first_bad_record(kind, first_record, first_kind):
    entries, key, anchor = _tampered(kind)
    check = verify_chain(entries, key, anchor, store=STORE, model=MODEL)
    assert not check.ok
    first = check.breaks[0]
    assert (first.seq, first.kind) == (first_record, first_kind), check.breaks
    assert first.kind in BREAK_KINDS


def test_an_anchor_of_another_store_or_model_does_not_verify():
    recs = _chain(2)
    moved = sign_anchor(KEY, "sqlite:////elsewhere.db", MODEL, 2, recs[-1].hash, "t")
    check = verify_chain(_entries(recs), KEY, moved, store=STORE, model=MODEL)
    assert [b.kind for b in check.breaks] == ["anchor_invalid"]


# ---------------------------------------------------------------- against a SQLite store
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain_store")
    tcfg = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="medtl-chain")
    tracker, run_dir, _, _ = tiny_tracked_run(tcfg, root, n_folds=1)
    return {"tcfg": tcfg, "run_id": tracker.parent_run_id, "run_dir": run_dir}


def _fresh_run(store) -> str:
    """A new run logging its own copy of the bundle (for tests that alter its bytes)."""
    from tracking_helpers import tiny_cfg

    from medtl.tracking.runs import TrainTracker

    cfg = tiny_cfg()
    cfg.tracking = store["tcfg"]
    tracker = TrainTracker(store["tcfg"], cfg, {})
    tracker.start()
    tracker.log_model(store["run_dir"] / "model")
    tracker.end("FINISHED")
    return tracker.parent_run_id


@pytest.fixture
def keyed(tmp_path, monkeypatch):
    """A fresh key file and anchor file for one test (never the user's ~/.config)."""
    monkeypatch.delenv("MEDTL_AUDIT_KEY", raising=False)
    monkeypatch.setenv("MEDTL_AUDIT_KEY_FILE", str(tmp_path / "keys" / "audit.key"))
    monkeypatch.delenv("MEDTL_AUDIT_ANCHOR", raising=False)
    return tmp_path / "keys"


def _reviewed(store, name: str, run_id: str | None = None) -> dict:
    """``name`` v1 approved, rejected, approved again: three records."""
    from medtl.tracking.registry import register, review

    tcfg = store["tcfg"]
    register(run_id or store["run_id"], name, tcfg)
    first = review(name, "1", "approve", "Dr A", "first look", tcfg)
    review(name, "1", "reject", "Dr B", "site B drift", tcfg)
    review(name, "1", "approve", "Dr C", "drift explained", tcfg)
    return first


def _client(store):
    from medtl.tracking.store import make_client

    return make_client(store["tcfg"].uri)


def _tag(seq: int) -> str:
    return f"medtl.review_chain.{seq:06d}"


def test_reviews_append_signed_records_and_a_clean_audit_verifies(store, keyed):
    from medtl.tracking.registry import audit, render_audit

    first = _reviewed(store, "clean")
    # The first review made the key file, readable by its owner only.
    assert first["key_created"] == str(keyed / "audit.key")
    assert stat.S_IMODE((keyed / "audit.key").stat().st_mode) == 0o600
    info = audit("clean", store["tcfg"])
    assert info["ok"] and info["integrity"]["breaks"] == []
    assert [(r["seq"], r["decision"], r["by"]) for r in info["reviews"]] == [
        (1, "approve", "Dr A"), (2, "reject", "Dr B"), (3, "approve", "Dr C")
    ]  # fmt: skip
    assert info["reviews"][0]["os_user"] and info["reviews"][0]["at"].endswith("+00:00")
    sha = info["integrity"]["model_sha256"]
    assert sha["computed"] == sha["registered"] == info["reviews"][0]["model_sha256"]
    assert info["integrity"]["anchor"]["count"] == 3
    assert info["model"]["status"] == "approved" and "approved" in info["model"]["aliases"]
    text = render_audit(info)
    assert "Integrity: verified" in text and "FAILED" not in text


def _zero_weights(store, name: str) -> Path:
    """Zero 64 bytes of the registered weights.safetensors in the artifact store."""
    client = _client(store)
    mv = client.get_model_version(name, "1")
    model_id = mv.model_id or mv.source.removeprefix("models:/")
    loc = client.get_logged_model(model_id).artifact_location.removeprefix("file://")
    weights = Path(loc) / "artifacts" / "bundle" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))
    return weights


def _edit_and_rehash(store, name: str) -> None:
    client = _client(store)
    rec = json.loads(client.get_registered_model(name).tags[_tag(2)])
    rec["decision"] = "approve"
    content = {k: v for k, v in rec.items() if k not in ("hash", "mac")}
    rec["hash"] = ReviewRecord(**content).computed_hash()
    client.set_registered_model_tag(name, _tag(2), canonical_json(rec))


def _swap(store, name: str) -> None:
    client = _client(store)
    tags = client.get_registered_model(name).tags
    client.set_registered_model_tag(name, _tag(1), tags[_tag(2)])
    client.set_registered_model_tag(name, _tag(2), tags[_tag(1)])


TAMPERING = {
    "edit_and_rehash": (_edit_and_rehash, 2, "edited"),
    "delete_one": (lambda s, n: _client(s).delete_registered_model_tag(n, _tag(2)), 3, "deleted"),
    "delete_last": (
        lambda s, n: _client(s).delete_registered_model_tag(n, _tag(3)),
        None,
        "truncated",
    ),
    "reorder": (_swap, 1, "reordered"),
    "swap_weights": (_zero_weights, 1, "weights_mismatch"),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_audit_reports_tampering_in_the_store(store, keyed, how):
    from medtl.tracking.registry import audit, render_audit

    name = f"tamper-{how}"
    _reviewed(store, name, _fresh_run(store) if how == "swap_weights" else None)
    tamper, record, kind = TAMPERING[how]
    tamper(store, name)
    info = audit(name, store["tcfg"])
    assert not info["ok"] and not info["integrity"]["ok"]
    first = info["integrity"]["first_break"]
    assert (first["record"], first["kind"]) == (record, kind), info["integrity"]["breaks"]
    text = render_audit(info)
    assert "FAILED" in text and "verified" not in text.lower()


def test_alias_moved_outside_review_fails_the_audit(store, keyed):
    from medtl.tracking.registry import audit, register, review

    tcfg = store["tcfg"]
    register(store["run_id"], "alias-moved", tcfg)
    register(store["run_id"], "alias-moved", tcfg)
    review("alias-moved", "1", "approve", "Dr A", "", tcfg)
    review("alias-moved", "2", "reject", "Dr B", "", tcfg)
    assert audit("alias-moved", tcfg)["ok"]
    _client(store).set_registered_model_alias("alias-moved", "approved", "2")  # by hand
    kinds = {b["kind"] for b in audit("alias-moved/1", tcfg)["integrity"]["breaks"]}
    assert kinds == {"alias_without_approval"}


def test_no_review_is_appended_to_a_broken_chain_or_changed_bytes(store, keyed):
    from medtl.tracking.registry import review

    _reviewed(store, "no-append")
    _client(store).delete_registered_model_tag("no-append", _tag(3))
    with pytest.raises(MedtlError, match=r"chain of 'no-append' is broken \(chain: truncated"):
        review("no-append", "1", "reject", "Dr D", "", store["tcfg"])
    _reviewed(store, "changed-bytes", _fresh_run(store))
    _zero_weights(store, "changed-bytes")
    with pytest.raises(MedtlError, match="is not the one registered"):
        review("changed-bytes", "1", "reject", "Dr D", "", store["tcfg"])


def test_the_audit_key_must_be_long_and_private(store, keyed, monkeypatch):
    from medtl.tracking.audit_keys import load_key

    monkeypatch.setenv("MEDTL_AUDIT_KEY", "short")
    with pytest.raises(ConfigError, match="at least 32"):
        load_key()
    monkeypatch.delenv("MEDTL_AUDIT_KEY")
    assert load_key() is None  # an audit never creates a key
    key = load_key(create=True)
    assert key is not None and key.created is not None
    key.created.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_key()


# ---------------------------------------------------------------- the commands
@pytest.fixture
def cli(store, keyed, monkeypatch):
    from medtl.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["tcfg"].uri)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


def test_review_command_refuses_bad_input_in_one_line(store, cli):
    from medtl.tracking.registry import register

    register(store["run_id"], "cli-model", store["tcfg"])
    for args, message in [
        (["cli-model", "9", "--approve", "--by", "x"], "Valid versions: 1"),
        (["cli-model", "1", "--by", "x"], "neither of --approve and --reject"),
        (["cli-model", "1", "--approve", "--reject", "--by", "x"], "both of --approve"),
        (["cli-model", "1", "--approve"], "needs a reviewer"),
        (["no-such-model", "1", "--approve", "--by", "x"], "Registered models: "),
    ]:
        res = cli("review", *args)
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    ok = cli("review", "cli-model", "1", "--approve", "--by", "Dr CLI")
    assert ok.exit_code == 0 and ok.stdout.strip() == "cli-model version 1: approved by Dr CLI"
    assert "created audit key" in ok.stderr


def test_audit_command_exits_nonzero_and_names_the_first_bad_record(store, cli):
    _reviewed(store, "cli-broken")
    good = cli("audit", "cli-broken")
    assert good.exit_code == 0 and "Integrity: verified" in good.stdout
    _client(store).delete_registered_model_tag("cli-broken", _tag(2))
    for args in (["cli-broken"], ["cli-broken", "--json"]):
        res = cli("audit", *args)
        assert res.exit_code == 1
        assert "audit failed at record #3: deleted" in res.stderr
        assert "verified" not in res.stdout.lower() and '"ok": true' not in res.stdout
    info = json.loads(cli("audit", "cli-broken", "--json").stdout)
    assert info["schema_version"] == "medtl-audit/1" and info["ok"] is False


# ---------------------------------------------------------------- documented JSON schema
DYNAMIC = {"metrics", "data.class_counts"}  # keys that are metric or class names


def _paths(obj, prefix: str = "") -> set[str]:
    """Leaf key paths: ``a.b``, ``a[].b`` for lists of objects, ``<name>`` for dynamic maps."""
    if isinstance(obj, dict):
        if prefix in DYNAMIC:
            inner = next(iter(obj.values()), None)
            return _paths(inner, f"{prefix}.<name>") if inner is not None else {prefix}
        return set().union(*(_paths(v, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()))
    if isinstance(obj, list):
        if obj and isinstance(obj[0], dict):
            return set().union(*(_paths(v, f"{prefix}[]") for v in obj))
        return {f"{prefix}[]"}
    return {prefix}


def test_audit_json_keys_are_the_documented_ones(store, keyed):
    from medtl.tracking.registry import audit

    _reviewed(store, "schema")
    client = _client(store)
    client.set_model_version_tag("schema", "1", "medtl.review.1.decision", "approve")  # legacy
    for k in ("by", "note", "at"):
        client.set_model_version_tag("schema", "1", f"medtl.review.1.{k}", "x")
    client.delete_registered_model_tag("schema", _tag(3))  # so breaks and first_break fill
    info = audit("schema", store["tcfg"])
    doc = (ROOT / "docs" / "audit_schema.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", doc, flags=re.MULTILINE))
    assert _paths(info) == documented - {"integrity.first_break"}
    kinds = set(re.findall(r"^\| ([a-z_]+) \| ", doc, flags=re.MULTILINE)) - {"kind", "key"}
    assert kinds == set(BREAK_KINDS)
