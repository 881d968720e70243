"""The errors a user can fix: each carries one message that says what is wrong and where.

``rlhf-train`` (and the other commands) print such an error as one short message and exit
non-zero; the traceback is shown only when asked for (``HYDRA_FULL_ERROR=1``). Anything else
keeps its traceback: it is a bug of ours, not a mistake of the user's.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class of the errors caused by the user's input (config, data, files, rewards)."""


class CheckpointError(UserError):
    """A checkpoint that cannot resume this run: unreadable, written by another task, or written
    with settings that change what it means. The message names the file and what is wrong."""


class TrainingStopped(UserError):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; the message says how to
    resume."""


class NonFiniteError(UserError, FloatingPointError):
    """A NaN or inf in a quantity training depends on; the message names it and where."""


class FieldError(UserError, ValueError):
    """An invalid constructor argument of a configurable component (an advantage estimator, a
    policy loss, a data module, ...). The config builder turns it into a ``ConfigError`` naming
    the full key, e.g. ``algorithm.advantage.lam``, so components need not know where they sit
    in the config; raised where no builder names it, it is still a user error (one line).
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def require(ok: bool, field: str, reason: str) -> None:
    """Raise :class:`FieldError` for ``field`` unless ``ok``."""
    if not ok:
        raise FieldError(field, reason)
