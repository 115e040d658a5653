"""Why a file is left out of a run: the quarantine entry and the one-line reasons for it.

The same reasons come from every decoding path (in-process, a pool worker, a worker that
crashed or hung), so a parallel preparation quarantines exactly what a serial one does.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from medtl.errors import MedtlError, UnreadableImageError


@dataclass(frozen=True)
class QuarantineEntry:
    """A file left out of the run and why (one human line)."""

    path: str
    reason: str


def root_cause(err: BaseException) -> BaseException:
    """The ``UnreadableImageError`` behind ``err`` (MONAI wraps transform errors), else the
    innermost cause."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UnreadableImageError):
            return err
        nxt = err.__cause__ or err.__context__
        if nxt is None:
            break
        err = nxt
    return err


def is_run_error(err: BaseException) -> bool:
    """True when ``err`` is the run's mistake, not one file's: a ``MedtlError`` other than
    ``UnreadableImageError`` (a config key, a setup problem) at its root."""
    root = root_cause(err)
    return isinstance(root, MedtlError) and not isinstance(root, UnreadableImageError)


# MONAI re-raises a transform's error as "applying transform <pkg.mod.Name object at 0x..>".
_MONAI_STEP = re.compile(r"applying transform <([\w.]+)")


def quarantine_reason(err: BaseException) -> str:
    """One line for the quarantine list: the reader's reason, else the failing transform's
    name (when MONAI says it) and the root error's type and first line."""
    root = root_cause(err)
    if isinstance(root, UnreadableImageError):
        return root.reason.strip().splitlines()[0][:300] if root.reason.strip() else "unreadable"
    msg = str(root).strip().splitlines()
    what = f"{type(root).__name__}: {msg[0] if msg else ''}"
    if isinstance(root, OSError):
        return what[:300]
    step = None
    cur: BaseException | None = err
    while cur is not None and step is None:
        found = _MONAI_STEP.search(str(cur))
        step = found.group(1).rsplit(".", 1)[-1] if found else None
        cur = cur.__cause__ or cur.__context__ if cur is not root else None
    where = f" in {step}" if step else ""
    return f"image read, but the preprocessing failed{where} ({what})"[:300]


def crash_reason(exitcode: int | None) -> str:
    """The reason for a file whose decoder process died: ``decoder crashed (signal 11,
    SIGSEGV)``; SIGKILL adds the usual cause (the kernel's out-of-memory killer)."""
    if exitcode is None or exitcode >= 0:
        return f"decoder process exited with code {exitcode} while reading this file"
    num = -exitcode
    try:
        name = signal.Signals(num).name
    except ValueError:
        name = "unknown signal"
    hint = "; out of memory?" if num == signal.SIGKILL else ""
    return f"decoder crashed (signal {num}, {name}{hint})"


def timeout_reason(timeout_s: float) -> str:
    """The reason for a file whose decoding hung past ``data.decode_timeout_s``."""
    return (
        f"decoding took longer than data.decode_timeout_s={timeout_s:g} s; the decoder was "
        "stopped (raise data.decode_timeout_s for very large files)"
    )
