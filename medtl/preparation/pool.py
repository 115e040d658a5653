"""The one place files are decoded: a crash-isolated process pool over the deterministic
transforms, streaming results back as they finish.

Hand-written rather than ``concurrent.futures.ProcessPoolExecutor``: when a worker of that
executor dies, every pending future fails with ``BrokenProcessPool`` and nothing says which
file killed it. Here each worker has its own pipe and holds one item at a time, so the parent
knows exactly which file a dead (segfault, abort, out-of-memory kill) or hung worker was
reading: that file becomes a quarantine entry, the worker is replaced, and the run goes on.
Holding one item per worker also bounds memory: at most ``workers`` decoded images are in
flight, whatever the number of records.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from medtl.decoder_server import PRELOAD, START_METHOD
from medtl.errors import ConfigError, MedtlError
from medtl.preparation.quarantine import QuarantineEntry, crash_reason, timeout_reason
from medtl.preparation.worker import Payload, Transform, decode_one, from_payload, worker_main

log = logging.getLogger("medtl")

Decoded = dict[str, Any]  # the transforms' output for one item (tensors as torch tensors)
Task = tuple[int, dict]
DEFAULT_TIMEOUT_S = 300.0
START_TIMEOUT_S = 600.0  # a worker not ready by then (imports hung) is a setup error
ATTEMPTS = 2  # a crash is retried once on a fresh worker: an outside kill is not the file's fault


def resolve_workers(setting: int | Literal["auto"], n_tasks: int | None = None) -> int:
    """Decoding processes for ``data.prepare_workers``: ``auto`` = the cores this process may
    use divided by the processes torchrun started on this node; 0 = decode in this process.
    Never more than ``n_tasks``."""
    if setting == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        n = max(1, cores // local)
    else:
        n = int(setting)
        if n < 0:
            raise ConfigError(
                f"data.prepare_workers={setting} is negative; use 0 (decode in this "
                "process), a number of processes, or 'auto'"
            )
    return min(n, n_tasks) if n_tasks is not None else n


@dataclass
class _Slot:
    process: BaseProcess
    conn: Connection
    task: Task | None = None
    started: float = 0.0  # when the worker began the task (its "ready", or the hand-over)
    attempts: int = 0
    ready: bool = False  # the worker has started (imported, unpickled the transforms)


class PoolStartError(MedtlError):
    """A decoding worker died before it could take any file: a setup problem, not a file's."""


def _start_error(code: int | None) -> PoolStartError:
    return PoolStartError(
        f"a decoding worker process exited while starting (exit code {code}), before reading "
        "any file. When medtl is called from a script, put the calls under `if __name__ == "
        "'__main__':` (worker processes are started with multiprocessing's forkserver, which "
        "imports the main module), make the transforms importable, or set "
        "data.prepare_workers=0 to decode in this process"
    )


class DecodePool:
    """``workers`` decoding processes, each running ``worker_main`` with ``transform``.

    Use as a context manager; ``imap`` streams ``(index, decoded | QuarantineEntry)`` in
    completion order. Workers start on the first task, so a run whose every image is already
    cached starts none.
    """

    def __init__(
        self, transform: Transform, workers: int, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {workers}")
        self.transform = transform
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self._ctx = mp.get_context(START_METHOD)
        self._slots: list[_Slot] = []
        self.restarts = 0

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- processes
    def _spawn(self) -> _Slot:
        self._ctx.set_forkserver_preload(list(PRELOAD))
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=worker_main, args=(child, self.transform), daemon=True, name="medtl-decode"
        )
        proc.start()
        child.close()
        return _Slot(proc, parent)

    def _replace(self, slot: _Slot) -> None:
        """Stop ``slot``'s process (if still alive) and put a fresh one in its place."""
        self._stop(slot, kill=True)
        fresh = self._spawn()
        slot.process, slot.conn, slot.ready = fresh.process, fresh.conn, False
        self.restarts += 1

    @staticmethod
    def _stop(slot: _Slot, kill: bool) -> None:
        if kill and slot.process.is_alive():
            slot.process.kill()
        slot.process.join(timeout=10)
        with contextlib.suppress(OSError):
            slot.conn.close()

    def close(self) -> None:
        """End every worker: idle ones are asked to stop, busy ones are killed."""
        for s in self._slots:
            if s.task is None and s.process.is_alive():
                with contextlib.suppress(OSError):
                    s.conn.send(None)
        for s in self._slots:
            self._stop(s, kill=s.task is not None)
            if s.process.is_alive():
                s.process.kill()
                s.process.join(timeout=10)
        self._slots = []

    # ----------------------------------------------------------------- tasks
    def _give(self, slot: _Slot, task: Task | None, attempts: int = 0) -> None:
        slot.task, slot.attempts = task, attempts
        if task is None:
            return
        for _ in range(2):  # a worker found dead when handed a task is replaced once
            try:
                slot.conn.send(task)
                break
            except (BrokenPipeError, OSError):
                self._replace(slot)
        slot.started = time.monotonic()

    def _collect(self, slot: _Slot) -> tuple[str, Any] | None:
        """The message ``slot`` sent, or None when its process died without one."""
        try:
            if slot.conn.poll():
                return slot.conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def _failed(self, slot: _Slot, reason: str) -> tuple[int, QuarantineEntry]:
        assert slot.task is not None
        index, item = slot.task
        log.warning("quarantined %s: %s", item.get("image"), reason)
        return index, QuarantineEntry(str(item["image"]), reason)

    def _on_ready(self, slot: _Slot, tasks: Iterator[Task]) -> tuple[int, Any] | None:
        """Handle a worker whose pipe or process sentinel fired; returns a finished result,
        or None when there is none yet (a worker that started, a crash being retried)."""
        got = self._collect(slot)
        if got is not None and got[0] == "ready":
            slot.ready, slot.started = True, time.monotonic()
            return None
        if got is not None:
            self._give(slot, next(tasks, None))  # keep the worker busy before yielding
            index, (kind, value) = got[1]
            if kind == "error":
                raise value
            return index, value
        slot.process.join(timeout=10)
        code = slot.process.exitcode
        if not slot.ready:
            raise _start_error(code)
        task, attempts = slot.task, slot.attempts + 1
        self._replace(slot)
        if attempts < ATTEMPTS:
            log.info("decoder process died (exit %s); retrying %s once", code, task)
            self._give(slot, task, attempts)
            return None
        out = self._failed(slot, crash_reason(code))
        self._give(slot, next(tasks, None))
        return out

    def _expire(self, tasks: Iterator[Task]) -> list[tuple[int, Any]]:
        """Quarantine the items that ran past the timeout; their workers are replaced."""
        out = []
        now = time.monotonic()
        for s in self._slots:
            if s.task is not None and not s.ready and now - s.started > START_TIMEOUT_S:
                raise PoolStartError(
                    f"a decoding worker process did not start within {START_TIMEOUT_S:g} s "
                    "(importing torch/MONAI hung?); set data.prepare_workers=0 to decode in "
                    "this process"
                )
            if s.task is not None and s.ready and now - s.started > self.timeout_s:
                out.append(self._failed(s, timeout_reason(self.timeout_s)))
                self._replace(s)
                self._give(s, next(tasks, None))
        return out

    def imap(self, tasks: Iterable[Task]) -> Iterator[tuple[int, Decoded | QuarantineEntry]]:
        """Decode every ``(index, item)`` of ``tasks`` (read lazily, ``workers`` at a time);
        yields ``(index, decoded dict | QuarantineEntry)`` as each finishes.

        Raises:
            PoolStartError: a worker died before it could take a file.
            Exception: the first error that does not come from a bad file, as raised in the
                worker.
        """
        it = iter(tasks)
        first = next(it, None)
        if first is None:
            return
        while len(self._slots) < self.workers:
            self._slots.append(self._spawn())
        self._give(self._slots[0], first)
        for s in self._slots[1:]:
            self._give(s, next(it, None))
        while True:
            busy = [s for s in self._slots if s.task is not None]
            if not busy:
                return
            # A task's clock starts at its worker's "ready"; a worker's start has its own limit.
            ends = [s.started + (self.timeout_s if s.ready else START_TIMEOUT_S) for s in busy]
            handles: list[Any] = [s.conn for s in busy] + [s.process.sentinel for s in busy]
            ready = set(wait(handles, timeout=max(0.0, min(ends) - time.monotonic())))
            for s in busy:
                if s.conn in ready or s.process.sentinel in ready:
                    done = self._on_ready(s, it)
                    if done is not None:
                        yield _restore(done)
            for done in self._expire(it):
                yield done


def _restore(done: tuple[int, Any]) -> tuple[int, Decoded | QuarantineEntry]:
    index, value = done
    return index, value if isinstance(value, QuarantineEntry) else from_payload(value)


def decode_indexed(
    tasks: Iterable[Task],
    transform: Transform,
    workers: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Iterator[tuple[int, Decoded | QuarantineEntry]]:
    """Decode ``(index, item)`` pairs through ``workers`` processes (0: in this process, no
    crash isolation); yields ``(index, decoded | QuarantineEntry)`` in completion order."""
    if workers == 0:
        for index, item in tasks:
            res: Payload | QuarantineEntry = decode_one(transform, item)
            yield index, res if isinstance(res, QuarantineEntry) else from_payload(res)
        return
    with DecodePool(transform, workers, timeout_s) as pool:
        yield from pool.imap(tasks)


def decode_stream(
    items: Iterable[dict],
    transform: Transform,
    workers: int | Literal["auto"] = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Iterator[tuple[int, Decoded | QuarantineEntry]]:
    """Decode ``items`` (``{"image": path, ...}`` dicts) with ``transform`` in a crash-isolated
    pool; yields ``(position in items, decoded dict | QuarantineEntry)`` as each finishes.

    For prediction, evaluation and Grad-CAM: a file whose decoder crashes or hangs past
    ``timeout_s`` comes back as its ``QuarantineEntry``, never as a dead or hung run.
    """
    return decode_indexed(enumerate(items), transform, resolve_workers(workers), timeout_s)
