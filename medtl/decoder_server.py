"""The decoding processes' forkserver, startable before anything heavy is imported.

Decoding workers (``medtl.preparation.pool``) are forked from a forkserver that first imports
the decoding stack (torch, MONAI, the readers): seconds of start-up. ``start_decoder_server``
starts that server at once, in the background, so its imports run on another core while the
job imports and sets up its own (``medtl train`` calls it first thing). Light on purpose: it
imports nothing of medtl's heavy modules.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Final

# forkserver: workers are forked from a clean server process that imported only the decoding
# stack, never from the job's process, which may hold threads (MLflow, torch) that make a
# plain fork unsafe. Start-up is paid once per process; a restart after a crash is a fork.
START_METHOD: Final = "forkserver"
PRELOAD: Final = ["medtl.preparation.worker", "medtl.transforms", "medtl.io"]


def start_decoder_server() -> None:
    """Start the forkserver now (idempotent; a no-op once it runs)."""
    from multiprocessing import forkserver

    mp.get_context(START_METHOD).set_forkserver_preload(list(PRELOAD))
    forkserver.ensure_running()
