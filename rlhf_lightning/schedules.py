"""Learning-rate schedules as multiplier functions for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

from collections.abc import Callable


def warmup_decay_lambda(
    total_steps: int, warmup_steps: int = 0, decay: str = "linear"
) -> Callable[[int], float]:
    """LR multiplier at optimizer step ``s``: linear warm-up from 0 over ``warmup_steps``, then
    ``"linear"`` decay to 0 at ``total_steps`` (the N+ PPO schedule) or ``"constant"``.

    The multiplier of step ``s`` is the one used *by* step ``s + 1`` (LambdaLR starts at s = 0),
    so the first update gets ``1 / warmup_steps`` of the LR when warming up and the full LR
    otherwise; the last of ``total_steps`` updates gets ``1 / (total_steps - warmup_steps)``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, {total_steps}), got {warmup_steps}")
    if decay not in ("linear", "constant"):
        raise ValueError(f"decay must be 'linear' or 'constant', got {decay!r}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        remaining = total_steps - step
        return max(remaining, 0) / (total_steps - warmup_steps)

    return multiplier
