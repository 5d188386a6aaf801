"""User-facing errors.

Anything a user can cause (a bad config key, a missing file, a corrupt image, a wrong checkpoint)
raises a subclass of :class:`UserError`. The CLI prints its message on one line and exits non-zero,
without a traceback; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""

    exit_code: int = 2


class ConfigError(UserError):
    """Unknown config key, wrong type, bad value or missing config file."""


class DataError(UserError):
    """Missing or empty dataset, corrupt image, unknown preset or dataset name."""


class ModelError(UserError):
    """Unknown model name or an input a model cannot take."""


class CheckpointError(UserError):
    """Missing, truncated, unsafe or incompatible checkpoint or teacher file."""


class RunDirError(UserError):
    """An output directory that would be overwritten, or a resume that does not match."""


class TrainingError(UserError):
    """A run stopped on purpose, e.g. a NaN loss (the last good checkpoint is kept)."""


def few(names: Iterable[str], n: int = 4, *, sort: bool = True) -> str:
    """The first ``n`` of ``names`` joined for an error message, with ``(+k more)`` for the rest.

    Sorted by default, so a message lists the same keys whatever the file's key order.
    """
    names = sorted(names) if sort else list(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
