"""One decoding step, the same in this process and in a pool worker, and the worker's loop.

``decode_one`` runs the deterministic transforms on one item and sorts failures: anything that
goes wrong on one file becomes its ``QuarantineEntry`` (the same reason as the serial path
gives); only a config or setup mistake (a ``MedtlError`` that names its key) stops the run. A
bug that fails on every file is stopped by ``data.max_bad_fraction``. Arrays travel between processes as
NumPy arrays (pickled bytes), never as torch tensors: torch would pass them through shared
memory file descriptors, one per tensor, which is slower for many small images.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch

from medtl.preparation.quarantine import QuarantineEntry, is_run_error, quarantine_reason

# The decoded result of one item: the transforms' output dict with tensors as NumPy arrays.
Payload = dict[str, Any]
Transform = Callable[[dict], Mapping[str, Any]]


def to_payload(out: Mapping[str, Any]) -> Payload:
    """Tensors (MetaTensors included: their meta is dropped, as the disk cache does) to
    NumPy; other values as they are."""
    res: Payload = {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            t = v.as_tensor() if hasattr(v, "as_tensor") else v
            res[str(k)] = t.detach().cpu().numpy()
        else:
            res[str(k)] = v
    return res


def from_payload(p: Payload) -> dict[str, Any]:
    """NumPy arrays back to torch tensors (no copy), as a cache read gives them."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in p.items()}


def decode_one(transform: Transform, item: Mapping[str, Any]) -> Payload | QuarantineEntry:
    """Run ``transform`` on a copy of ``item``; any failure on this one file (its reader, or the
    deterministic transforms of a file that did read: too small to resize, wrong channel
    count) gives its quarantine entry with the reason.

    Raises:
        MedtlError: a config or setup mistake (not an ``UnreadableImageError``): the run's,
            not the file's, so it stops the run; KeyboardInterrupt and SystemExit.
    """
    try:
        out = transform(dict(item))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - a decoder panic is a BaseException too
        if is_run_error(err):
            raise
        return QuarantineEntry(str(item["image"]), quarantine_reason(err))
    return to_payload(out)


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a RuntimeError carrying its traceback text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any pickling failure
        text = "".join(traceback.format_exception(err))
        return RuntimeError(f"decoding failed in a worker process:\n{text}")


def _die_with_parent() -> None:
    """End this worker as soon as the process that started the pool dies (even by SIGKILL),
    also while a native decoder hangs: nothing else would stop it.

    Three parts, by hand because multiprocessing offers none of them as one call: a thread
    waits on the parent's sentinel (public API: ``parent_process().sentinel``); the forkserver's
    "clients alive" pipe end inherited from it is closed (a worker starts no processes, and
    holding it would keep the forkserver alive after the parent); and Linux
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` kills the worker when the forkserver then exits, which
    works even when a hung decoder holds the GIL and the thread cannot run.
    """
    parent = mp.parent_process()
    if parent is not None:

        def watch() -> None:
            wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=watch, name="medtl-parent-watch", daemon=True).start()
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive_fd, int):
        with contextlib.suppress(OSError):
            os.close(alive_fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


def worker_main(conn: Connection, transform: Transform) -> None:
    """Worker loop: say ``("ready", pid)`` once, then for each ``(index, item)`` received send
    ``("done", (index, ("ok", payload | entry)))`` or ``("done", (index, ("error", exc)))``;
    ``None`` or a closed pipe ends it."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, item = msg
        try:
            result: tuple[str, Any] = ("ok", decode_one(transform, item))
        except Exception as err:  # noqa: BLE001 - a run error: the parent raises it
            result = ("error", _portable(err))
        try:
            conn.send(("done", (index, result)))
        except (BrokenPipeError, OSError):
            return
