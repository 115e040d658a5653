"""Preparation progress: a live bar with images/s and ETA on a terminal, one log line per
10% in batch logs (a live bar there would print a line per refresh)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("medtl")


def _eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PrepareProgress:
    """Counts finished images; ``advance()`` after each one. Use as a context manager."""

    def __init__(self, total: int, label: str, enabled: bool, tty: bool | None = None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.done = 0
        self._t0 = time.monotonic()
        self._next_tenth = 1
        self._bar: Any = None
        self._task: Any = None
        self.lines: list[str] = []  # the batch-log lines written (tests read them)

    def __enter__(self) -> PrepareProgress:
        if self.enabled and self.tty and self.total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} images/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def rate(self) -> float:
        """Images per second so far."""
        return self.done / max(time.monotonic() - self._t0, 1e-9)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more images finished (decoded, read from the cache or quarantined)."""
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{self.rate():.1f}")
            return
        if not self.total:
            return
        while self._next_tenth <= 10 and self.done * 10 >= self._next_tenth * self.total:
            rate = self.rate()
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            line = (
                f"{self.label}: {self.done}/{self.total} ({self._next_tenth * 10}%), "
                f"{rate:.1f} images/s, ETA {_eta(left)}"
            )
            self._next_tenth += 1
            self.lines.append(line)
            log.info(line)
            if self.enabled:
                print(line, flush=True)
