"""The audit key and the review-chain anchors: files outside the tracking store.

Anyone who can write to the MLflow store can edit or delete review records; what they must
not also hold is the key that signs them and the anchor that records where each chain
ended. So both live on the reviewers' and auditors' side:

- key: ``$MEDTL_AUDIT_KEY`` (at least 32 characters), else the file ``$MEDTL_AUDIT_KEY_FILE``
  (default ``$XDG_CONFIG_HOME/medtl/audit.key``, i.e. ``~/.config/medtl/audit.key``). The
  first ``medtl review`` creates that file (mode 0600, 32 random bytes as hex); a file that
  group or others may read is refused, as ssh does with private keys.
- anchors: ``$MEDTL_AUDIT_ANCHOR``, else ``audit_anchors.json`` beside the key file. One
  signed ``{count, head}`` per (tracking store, model), rewritten by every review under a
  file lock and replaced atomically.

A team shares both through a location the tracking server's writers cannot change (an
access-controlled share, a secrets manager exporting ``MEDTL_AUDIT_KEY``).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medtl.errors import ConfigError, MedtlError
from medtl.tracking.review_chain import Anchor

__all__ = [
    "ANCHOR_ENV",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "AnchorBook",
    "AuditKey",
    "anchor_book",
    "anchor_file",
    "key_file",
    "load_key",
    "read_anchor",
]

KEY_ENV = "MEDTL_AUDIT_KEY"
KEY_FILE_ENV = "MEDTL_AUDIT_KEY_FILE"
ANCHOR_ENV = "MEDTL_AUDIT_ANCHOR"
MIN_KEY_CHARS = 32
ANCHOR_FORMAT = "medtl-audit-anchors/1"


def _config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "medtl"


def key_file() -> Path:
    """Where the key file is (or will be created): ``$MEDTL_AUDIT_KEY_FILE`` or the default."""
    env = os.environ.get(KEY_FILE_ENV)
    return Path(env).expanduser() if env else _config_dir() / "audit.key"


def anchor_file() -> Path:
    """Where the anchors are: ``$MEDTL_AUDIT_ANCHOR``, else beside the key file."""
    env = os.environ.get(ANCHOR_ENV)
    return Path(env).expanduser() if env else key_file().parent / "audit_anchors.json"


@dataclass(frozen=True)
class AuditKey:
    """The HMAC key, where it came from, and the file it was just created in (if so)."""

    key: bytes
    source: str
    created: Path | None = None


def _checked(text: str, where: str) -> bytes:
    if len(text) < MIN_KEY_CHARS:
        raise ConfigError(
            f"the audit key in {where} has {len(text)} characters; it needs at least "
            f"{MIN_KEY_CHARS} (e.g. the output of: python -c 'import secrets; "
            "print(secrets.token_hex(32))')"
        )
    return text.encode("utf-8")


def _read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"audit key file {path} can be read by group or others (mode "
            f"{stat.filemode(mode)}); restrict it: chmod 600 {path}"
        )
    return _checked(path.read_text().strip(), str(path))


def _create_key_file(path: Path) -> bool:
    """Write a new random key with mode 0600; False when another process won the race."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return True


def load_key(*, create: bool = False) -> AuditKey | None:
    """The audit key from ``$MEDTL_AUDIT_KEY`` or the key file; None when there is none.

    ``create`` (reviews only; an audit never makes a key) writes a new key file first.
    Raises ConfigError for a short key or a key file others may read.
    """
    env = os.environ.get(KEY_ENV)
    if env:
        return AuditKey(_checked(env, f"${KEY_ENV}"), f"${KEY_ENV}")
    path = key_file()
    if path.is_file():
        return AuditKey(_read_key_file(path), f"file {path}")
    if not create:
        return None
    created = _create_key_file(path)
    return AuditKey(_read_key_file(path), f"file {path}", path if created else None)


def _store_models(data: dict[str, Any], store: str) -> dict[str, Any]:
    return data.setdefault("anchors", {}).setdefault(store, {})


def _read_book(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"format": ANCHOR_FORMAT, "anchors": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MedtlError(
            f"anchor file {path} cannot be read ({err}); restore it from backup: without it "
            "deleted review records cannot be detected"
        ) from None
    if not isinstance(data, dict) or data.get("format") != ANCHOR_FORMAT:
        raise MedtlError(f"{path} is not a medtl anchor file (format {ANCHOR_FORMAT!r})")
    return data


def read_anchor(path: Path, store: str, model: str) -> Anchor | None:
    """The anchor of ``model`` in ``store`` from the anchor file, or None."""
    entry = _read_book(path).get("anchors", {}).get(store, {}).get(model)
    return Anchor(**entry) if entry else None


class AnchorBook:
    """The anchor file's contents while :func:`anchor_book` holds its lock."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.changed = False

    def get(self, store: str, model: str) -> Anchor | None:
        entry = self.data.get("anchors", {}).get(store, {}).get(model)
        return Anchor(**entry) if entry else None

    def set(self, store: str, model: str, anchor: Anchor) -> None:
        _store_models(self.data, store)[model] = asdict(anchor)
        self.changed = True


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path.lock`` (POSIX ``flock``; none where it does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: reviews from one machine are rarely concurrent
        yield
        return
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def anchor_book(path: Path) -> Iterator[AnchorBook]:
    """Read the anchor file under an exclusive lock; write it back atomically if changed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(path):
        book = AnchorBook(_read_book(path))
        yield book
        if book.changed:
            fd, tmp = tempfile.mkstemp(prefix=".anchors-", dir=path.parent)
            with os.fdopen(fd, "w") as f:  # mkstemp files are 0600
                json.dump(book.data, f, indent=2, sort_keys=True)
            os.replace(tmp, path)
