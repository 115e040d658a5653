"""SQLite "database is locked": every medtl call into MLflow is retried with exponential
backoff; when the store stays locked, the error says to use a tracking server.

The SQLite store takes one writer at a time. Two medtl processes logging at once (fold jobs,
or a `medtl review` during a training) make one of them wait, and SQLite gives up with
"database is locked" either at once (two transactions that both want to write: SQLite
refuses one rather than deadlock) or when its busy wait runs out. Re-running the whole call
after a pause resolves both, since a locked call is rolled back and has written nothing.

:class:`RetryingClient` wraps the ``MlflowClient`` that :func:`medtl.tracking.store.make_client`
hands out, so the retry sits at that one edge instead of in every caller; :func:`retry_locked`
is the same wrapper for the few calls that go through mlflow's module-level API.

SQLite's own wait: mlflow sets ``PRAGMA busy_timeout = 20000`` at the start of every session,
so a call into a held store would first block 20 s per attempt, and six attempts two minutes.
Inside :func:`retry_locked` medtl swaps that value for ``LockRetry.busy_ms`` (a SQLAlchemy
statement hook, written by hand because mlflow has no setting for it), so the schedule below
is what a user waits, about 6 s by default, before being told what to do. mlflow logs a full
traceback for each lock error; those of calls being retried are filtered out.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from medtl.errors import MedtlError

__all__ = [
    "DEFAULT_RETRY",
    "LockRetry",
    "RetryingClient",
    "is_locked_error",
    "locked_store_advice",
    "retry_locked",
]

log = logging.getLogger("medtl")
T = TypeVar("T")

LOCKED_TEXT = "database is locked"


@dataclass(frozen=True)
class LockRetry:
    """How long a locked store is waited for: ``tries`` calls, ``first_s`` before the second,
    each pause ``factor`` times the last; SQLite's own busy wait is ``busy_ms`` per call."""

    tries: int = 6
    first_s: float = 0.1
    factor: float = 2.0
    busy_ms: int = 500

    def delays(self) -> list[float]:
        """The pauses between calls (``tries - 1`` of them)."""
        return [self.first_s * self.factor**i for i in range(max(self.tries - 1, 0))]

    def worst_case_s(self) -> float:
        """Seconds from the first call to the error when the store never frees up."""
        return sum(self.delays()) + self.tries * self.busy_ms / 1000


DEFAULT_RETRY = LockRetry()  # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s of pauses + 6 x 0.5 s waits ~ 6 s

# The busy wait of the call in progress on this thread (None: leave mlflow's value alone).
_BUSY_MS: contextvars.ContextVar[int | None] = contextvars.ContextVar("medtl_busy_ms", default=None)
_BUSY_PRAGMA = re.compile(r"^\s*PRAGMA\s+busy_timeout\s*=\s*\d+\s*;?\s*$", re.IGNORECASE)
_hook_lock = threading.Lock()
_hook_installed = False


def is_locked_error(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is SQLite's "database is locked".

    mlflow wraps sqlalchemy's ``OperationalError`` (itself wrapping sqlite3's) in an
    ``MlflowException``, and a tracking server backed by SQLite returns the same text.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        if LOCKED_TEXT in str(e).lower():
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def locked_store_advice(uri: str | None, tries: int, waited_s: float) -> str:
    """The error text for a store that stayed locked: what happened and the fix."""
    store = uri or "the MLflow tracking store"
    backend = uri if uri and uri.startswith("sqlite:") else "sqlite:///PATH/mlflow.db"
    return (
        f"{store} is still locked by another writer after {tries} tries over {waited_s:.1f} s "
        f"({LOCKED_TEXT}). The SQLite store does not take concurrent writers (fold jobs or "
        "trainings running at once, a review during a training). Run a tracking server: "
        "PostgreSQL behind `mlflow server` (docker/compose.yaml), or one server process in "
        f"front of this file (`mlflow server --backend-store-uri {backend} --workers 1 "
        "--host 127.0.0.1 --port 5000`), and set tracking.uri (or MLFLOW_TRACKING_URI) to "
        "http://127.0.0.1:5000 in every job"
    )


def retry_locked(
    fn: Callable[..., T],
    *args: Any,
    uri: str | None = None,
    retry: LockRetry = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)``; on "database is locked" pause and call again.

    Raises MedtlError (from the last lock error) with :func:`locked_store_advice` when every
    try found the store locked; any other error is raised at once, unchanged.
    """
    _install_busy_hook()
    pauses = retry.delays()
    t0 = time.monotonic()
    for attempt in range(retry.tries):
        token = _BUSY_MS.set(retry.busy_ms)
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not is_locked_error(err):
                raise
            if attempt >= len(pauses):
                waited = time.monotonic() - t0
                raise MedtlError(locked_store_advice(uri, retry.tries, waited)) from err
            name = getattr(fn, "__name__", "MLflow call")
            log.warning(
                "%s: %s is locked (try %d of %d); retrying in %.2f s",
                name,
                uri or "the tracking store",
                attempt + 1,
                retry.tries,
                pauses[attempt],
            )
        finally:
            _BUSY_MS.reset(token)
        sleep(pauses[attempt])
    raise MedtlError(locked_store_advice(uri, 0, 0.0))  # tries < 1: nothing was called


class RetryingClient:
    """An ``MlflowClient`` whose every public method goes through :func:`retry_locked`.

    Attributes that are not methods are passed through unchanged.
    """

    def __init__(self, client: Any, uri: str, retry: LockRetry = DEFAULT_RETRY):
        self._client = client
        self._uri = uri
        self._retry = retry

    @property
    def wrapped(self) -> Any:
        """The plain ``MlflowClient``."""
        return self._client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return retry_locked(attr, *args, uri=self._uri, retry=self._retry, **kwargs)

        return call


def _install_busy_hook() -> None:
    """Once per process: let :func:`retry_locked` set SQLite's busy wait (see module doc)."""
    global _hook_installed
    if _hook_installed:
        return
    with _hook_lock:
        if _hook_installed:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "before_cursor_execute", _swap_busy_timeout, retval=True)
        logging.getLogger("mlflow.store.db.utils").addFilter(_quiet_while_retrying)
        _hook_installed = True


def _quiet_while_retrying(record: logging.LogRecord) -> bool:
    """Drop mlflow's traceback for a lock error that :func:`retry_locked` is about to retry
    (its own warning says so); the last one is raised with its cause."""
    return _BUSY_MS.get() is None or LOCKED_TEXT not in record.getMessage().lower()


def _swap_busy_timeout(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    """mlflow's ``PRAGMA busy_timeout = 20000`` becomes the current call's ``busy_ms``."""
    busy = _BUSY_MS.get()
    if busy is not None and conn.dialect.name == "sqlite" and _BUSY_PRAGMA.match(statement):
        return f"PRAGMA busy_timeout = {int(busy)};", parameters
    return statement, parameters
