"""Learning-rate schedules: multiplier functions for ``torch.optim.lr_scheduler.LambdaLR`` and the
components that choose one (``algorithm.lr_schedule._target_``, ``conf/algorithm/lr_schedule/``).

Every schedule warms up linearly from 0 over the first ``warmup_ratio`` of the run's optimizer
steps, then holds the LR (:class:`Constant`), decays it linearly to 0 at the last step
(:class:`LinearDecay`, the N+ PPO schedule) or along a half cosine to ``min_ratio`` of it
(:class:`CosineDecay`). The scheduler steps once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_lightning.errors import require


def warmup_decay_lambda(
    total_steps: int, warmup_steps: int = 0, decay: str = "linear", min_ratio: float = 0.0
) -> Callable[[int], float]:
    """LR multiplier at optimizer step ``s``: linear warm-up from 0 over ``warmup_steps``, then
    ``"linear"`` decay to 0 at ``total_steps``, ``"cosine"`` decay to ``min_ratio``, or
    ``"constant"``.

    The multiplier of step ``s`` is the one used *by* step ``s + 1`` (LambdaLR starts at s = 0),
    so the first update gets ``1 / warmup_steps`` of the LR when warming up and the full LR
    otherwise; under linear decay the last of ``total_steps`` updates gets
    ``1 / (total_steps - warmup_steps)``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, {total_steps}), got {warmup_steps}")
    if decay not in ("linear", "constant", "cosine"):
        raise ValueError(f"decay must be 'linear', 'cosine' or 'constant', got {decay!r}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        remaining = max(total_steps - step, 0) / (total_steps - warmup_steps)  # 1 -> 0
        if decay == "linear":
            return remaining
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (1 - remaining)))

    return multiplier


class LRSchedule:
    """Base of the schedule components: ``schedule(optimizer, total_steps)`` -> a scheduler that
    steps once per optimizer step over a run of ``total_steps`` of them."""

    warmup_ratio: float = 0.0
    decay: str = "linear"

    def __post_init__(self) -> None:
        require(
            0 <= self.warmup_ratio < 1,
            "warmup_ratio",
            f"must be in [0, 1), got {self.warmup_ratio}",
        )

    def multiplier(self, total_steps: int) -> Callable[[int], float]:
        warmup = min(int(self.warmup_ratio * total_steps), total_steps - 1)
        return warmup_decay_lambda(total_steps, warmup, self.decay)

    def __call__(self, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.multiplier(total_steps))


@dataclass(frozen=True)
class LinearDecay(LRSchedule):
    """Warm-up, then linear decay to 0 at the last step (N+ PPO)."""

    warmup_ratio: float = 0.0
    decay = "linear"


@dataclass(frozen=True)
class Constant(LRSchedule):
    """Warm-up, then the LR itself."""

    warmup_ratio: float = 0.0
    decay = "constant"


@dataclass(frozen=True)
class CosineDecay(LRSchedule):
    """Warm-up, then a half cosine from the LR to ``min_ratio`` of it at the last step."""

    warmup_ratio: float = 0.0
    min_ratio: float = 0.0
    decay = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.min_ratio <= 1, "min_ratio", f"must be in [0, 1], got {self.min_ratio}")

    def multiplier(self, total_steps: int) -> Callable[[int], float]:
        warmup = min(int(self.warmup_ratio * total_steps), total_steps - 1)
        return warmup_decay_lambda(total_steps, warmup, "cosine", self.min_ratio)
