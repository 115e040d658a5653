"""A `medtl` job whose DICOM decoder dies in native code on one file: the crash-isolation test.

TEST-ONLY DECODER. At module level this script replaces ``medtl.io.registry.READERS["dicom"]``
with a wrapper that, for a file whose name contains ``CRASH_MARKER`` (``native_crash.dcm``),
reads address 0 through ctypes (``ctypes.string_at(0)``): a real SIGSEGV inside C code, as a
broken native decoder plugin gives, which no ``except`` can catch. Every other file goes to
the real reader. It is never installed outside this script.

Why module level: the decoding pool's workers are forked from multiprocessing's forkserver,
which runs the main module of the job again, as ``__mp_main__``, in every worker; so the wrapper
is in place in each worker (where decoding must happen) and in the job's own process (where a
decode outside the pool would kill the whole job, which is what the test would then catch).
It is applied only when this file runs as that main module, so a test that imports
``CRASH_NAME`` from it leaves the reader alone.

Usage (what argv says, through medtl's own CLI, ``medtl.cli.main``)::

    python tests/native_crash_job.py train PIPELINE MANIFEST OUT [--set k=v ...]
    python tests/native_crash_job.py predict MODEL INPUTS OUT_CSV [medtl predict flags ...]
    python tests/native_crash_job.py evaluate MODEL MANIFEST OUT_DIR [medtl evaluate flags ...]

Several commands may be chained with ``--then`` (``predict ... --then evaluate ...``): they run
one after another in this one process, which saves a Python, torch and forkserver start per
command. Each command's output follows a ``=== medtl VERB ===`` line on stdout and stderr. The
exit status is the first failing command's (0 when every one finished).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CRASH_MARKER = "native_crash"
CRASH_NAME = f"{CRASH_MARKER}.dcm"  # the file the test-only decoder crashes on
CRASH_REASON = "decoder crashed (signal 11, SIGSEGV)"  # what the pool quarantines it with


def crash_on_marker(load: Callable[..., Any]) -> Callable[..., Any]:
    """``load``, except that a path whose name contains ``CRASH_MARKER`` segfaults the process.

    Test-only: ``ctypes.string_at(0)`` makes C code read address 0 (SIGSEGV), the way a decoder
    bug in a native plugin kills its process.
    """

    def load_or_crash(path: Any, *args: Any, **kwargs: Any) -> Any:
        if CRASH_MARKER in Path(str(path)).name:
            ctypes.string_at(0)  # reads address 0: SIGSEGV in native code
        return load(path, *args, **kwargs)

    return load_or_crash


def install_crashing_dicom_reader() -> None:
    """Put the test-only crashing decoder in front of the real DICOM reader (looked up at call
    time by ``medtl.io.load_image``)."""
    from medtl.io import registry

    registry.READERS["dicom"] = crash_on_marker(registry.READERS["dicom"])


# Module level on purpose (see the docstring): the job process and every forkserver worker.
if __name__ in ("__main__", "__mp_main__"):
    install_crashing_dicom_reader()


def cli_args(argv: list[str]) -> list[str]:
    """This script's argv as the `medtl` command line it stands for."""
    usage = "usage: native_crash_job.py train|predict|evaluate A B OUT [options...]"
    if len(argv) < 4:
        raise SystemExit(usage)
    verb, a, b, out, *rest = argv
    if verb == "train":  # PIPELINE MANIFEST OUT
        return ["train", a, "--manifest", b, "--out", out, *rest]
    if verb == "predict":  # MODEL INPUTS OUT_CSV
        return ["predict", "--model", a, b, "--out", out, *rest]
    if verb == "evaluate":  # MODEL MANIFEST OUT_DIR
        return ["evaluate", "--model", a, "--manifest", b, "--out", out, *rest]
    raise SystemExit(f"unknown command {verb!r}; {usage}")


def split_commands(argv: list[str]) -> list[list[str]]:
    """``A ... --then B ...`` as ``[[A, ...], [B, ...]]``."""
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            commands.append([])
        else:
            commands[-1].append(arg)
    return commands


def run_command(args: list[str]) -> int:
    """One `medtl` command line through the real CLI; its exit status."""
    import click

    from medtl.cli import main

    for stream in (sys.stdout, sys.stderr):
        print(f"=== medtl {args[0]} ===", file=stream, flush=True)
    try:
        main(args, prog_name="medtl", standalone_mode=False)
    except SystemExit as done:  # medtl's own errors exit 2 with a one-line message
        return done.code if isinstance(done.code, int) else 1
    except click.ClickException as err:
        err.show()
        return err.exit_code
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


if __name__ == "__main__":
    codes = [run_command(cli_args(cmd)) for cmd in split_commands(sys.argv[1:])]
    sys.exit(next((c for c in codes if c != 0), 0))
