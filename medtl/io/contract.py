"""The one contract every reader keeps: a file loads, or it raises its own
``UnreadableImageError`` with a one-line reason; nothing else escapes.

Hospital exports always hold some broken files, and one of them must never end a batch job.
Decoders (pydicom, nibabel, Pillow, and the native plugins under them) raise dozens of
exception types for corrupt input, and a Rust decoder's panic is a ``BaseException``
(``pyo3_runtime.PanicException``) that ``except Exception`` does not catch. ``reader`` wraps a
loader so that every failure, of any type, becomes that file's ``UnreadableImageError`` (the
original chained as ``__cause__``); only ``KeyboardInterrupt`` and ``SystemExit`` pass (and ``ConfigError``,
which is the run's mistake, not the file's).

``check_pixel_budget`` refuses an absurd header (0 or 10^9 rows) before anything is allocated.
What a segfault or abort in native code does is beyond any ``except``: the decoding pool
(``medtl.preparation.pool``) isolates it in a worker process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from medtl.errors import ConfigError, UnreadableImageError
from medtl.io.base import ReadPolicy

P = ParamSpec("P")
R = TypeVar("R")
# A config mistake (an invalid reorientation) is the run's, not the file's: it names its key.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit, ConfigError)
_MAX_REASON = 300


def failure_reason(err: BaseException, doing: str = "cannot read file") -> str:
    """One line for a failure no reader explained: what was being done, the exception's type
    and the first line of its message (``cannot read file (ValueError: cannot reshape ...)``)."""
    if isinstance(err, MemoryError):
        return f"{doing}: not enough memory to decode it (MemoryError)"
    text = str(err).strip()
    first = text.splitlines()[0].strip() if text else ""
    kind = type(err).__name__
    return f"{doing} ({kind}: {first})"[:_MAX_REASON] if first else f"{doing} ({kind})"


def as_unreadable(path: Any, err: BaseException, doing: str = "cannot read file") -> Exception:
    """``err`` as the file's ``UnreadableImageError`` (returned, for ``raise ... from err``);
    an ``UnreadableImageError`` is returned as it is, with its reason kept to one line."""
    if isinstance(err, UnreadableImageError):
        if "\n" in err.reason:
            return UnreadableImageError(err.path, err.reason.splitlines()[0][:_MAX_REASON])
        return err
    return UnreadableImageError(str(path), failure_reason(err, doing))


def reader(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a loader whose first argument is the path (or a list of paths) so that it
    keeps the contract above."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except BaseException as err:  # noqa: BLE001 - the contract: every failure is the file's
            where = args[0] if args else kwargs.get("path", "?")
            if isinstance(where, Sequence) and not isinstance(where, str | bytes):
                where = Path(str(where[0])).parent if len(where) else "?"
            bad = as_unreadable(where, err)
            if bad is err:
                raise
            raise bad from err

    return wrapper


def check_pixel_budget(
    path: Any, shape: Sequence[int], policy: ReadPolicy, what: str = "header"
) -> None:
    """Refuse, before anything is allocated, a ``shape`` (rows, columns, frames, samples...)
    with a zero or negative size or whose float32 pixels exceed ``policy.max_image_bytes``."""
    dims = [int(s) for s in shape]
    if any(d <= 0 for d in dims):
        raise UnreadableImageError(path, f"{what} gives an empty image (size {dims})")
    need = 4  # readers hand out float32
    for d in dims:
        need *= d
    if need > policy.max_image_bytes:
        raise UnreadableImageError(
            path,
            f"{what} implies {need / 2**20:,.0f} MiB of pixels (size {dims}), more than "
            f"data.max_image_bytes={policy.max_image_bytes:,}; raise it if the image is real",
        )
