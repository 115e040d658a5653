"""Exception types shared by every stage, and the helper that makes option errors useful.

Every error names the bad value, lists the valid ones and suggests a fix, so that a
hospital engineer can act on one line of output without reading a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class MedtlError(Exception):
    """Base class: an error medtl explains itself (the CLI prints it as one line)."""


class ConfigError(MedtlError):
    """A pipeline config key or value is wrong; the message names the key."""


class UnreadableImageError(MedtlError):
    """An image file cannot be read; carries the path and the reason for quarantine lists."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(MedtlError):
    """A manifest is malformed (missing column, unreadable file, ...)."""


class WeightsError(MedtlError):
    """Pretrained weights are missing, tampered with, or do not fit the network."""


class TooManyBadFilesError(MedtlError):
    """More images failed to load than the configured fraction allows; ``quarantine`` holds
    every file found unreadable (the message names only the first few)."""

    def __init__(self, message: str, quarantine: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.quarantine = list(quarantine)


def look_up_option(value: str, options: Iterable[str], what: str = "option") -> str:
    """Return ``value`` if it is one of ``options``; else raise with suggestions.

    Mirrors MONAI's ``look_up_option`` message shape: "By 'x', did you mean 'y'?".
    """
    opts = list(options)
    if value in opts:
        return value
    close = difflib.get_close_matches(str(value), [str(o) for o in opts], n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown {what} '{value}'.{hint} Valid values: {', '.join(map(str, opts))}.")
