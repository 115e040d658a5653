"""Helpers both the validation and the scan use: example lists in messages, progress bars."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

EXAMPLES = 5  # values quoted in one error message before "..."


def examples(items: Sequence[str]) -> str:
    """The first few ``items`` joined for a message, with a count of the rest."""
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f", ... ({len(items) - EXAMPLES} more)" if len(items) > EXAMPLES else "")


def iter_progress(
    items: Iterable[T], description: str, enabled: bool, total: int | None = None
) -> Iterator[T]:
    """Iterate ``items``, with a transient progress bar when enabled and on a terminal.

    ``total`` is the number of items, needed when ``items`` has no length (a generator).
    """
    if not enabled or not sys.stdout.isatty():  # live bars only on a terminal
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, total=total, transient=True)
