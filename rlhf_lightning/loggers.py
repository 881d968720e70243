"""Loggers with a first screen of learning curves.

Lightning adds an ``epoch`` scalar to every logging call; a PPO iteration is one Lightning epoch,
so in TensorBoard it is a card that only repeats the step, shown before the curves a user came
for (cards sort by name). :class:`TensorBoardLogger` leaves it out.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

LEFT_OUT = frozenset({"epoch"})


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger without the scalars in ``LEFT_OUT``."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        kept = {key: value for key, value in metrics.items() if key not in LEFT_OUT}
        if kept:
            super().log_metrics(kept, step)
