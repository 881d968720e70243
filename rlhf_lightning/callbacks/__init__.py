"""Lightning callbacks of the tasks."""

from rlhf_lightning.callbacks.progress import ProgressLine

__all__ = ["ProgressLine"]
