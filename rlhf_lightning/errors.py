"""The errors a user can fix: each carries one message that says what is wrong and where.

``rlhf-train`` (and the other commands) print such an error as one short message and exit
non-zero; the traceback is shown only when asked for (``HYDRA_FULL_ERROR=1``). Anything else
keeps its traceback: it is a bug of ours, not a mistake of the user's.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class of the errors caused by the user's input (config, data, files, rewards)."""
