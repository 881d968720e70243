"""Learning-rate schedules: the multiplier function and the components that drive an optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.schedules import Constant, CosineDecay, LinearDecay, warmup_decay_lambda


def test_warmup_then_linear_decay_to_zero():
    f = warmup_decay_lambda(total_steps=10, warmup_steps=2, decay="linear")
    assert [round(f(s), 4) for s in range(11)] == [
        0.5,
        1.0,
        1.0,
        0.875,
        0.75,
        0.625,
        0.5,
        0.375,
        0.25,
        0.125,
        0.0,
    ]
    g = warmup_decay_lambda(total_steps=4, decay="constant")
    assert [g(s) for s in range(4)] == [1.0] * 4


def test_the_schedule_components_set_the_optimizers_lr_at_every_step():
    """Each component drives a real optimizer: warm-up 0.25 of 8 steps, then its decay. Cosine
    to min_ratio 0.1: 1 at the end of the warm-up, 0.55 half-way through the rest, 0.1 + 0.9 x
    (1 + cos(pi * 5/6)) / 2 one step before the end."""

    def lrs(schedule):
        param = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([param], lr=2.0)
        scheduler = schedule(optimizer, 8)
        seen = []
        for _ in range(8):
            seen.append(optimizer.param_groups[0]["lr"] / 2.0)
            optimizer.step()
            scheduler.step()
        return seen

    assert lrs(Constant(warmup_ratio=0.25)) == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])
    assert lrs(LinearDecay(warmup_ratio=0.25)) == pytest.approx(
        [0.5, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    )
    cosine = lrs(CosineDecay(warmup_ratio=0.25, min_ratio=0.1))
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert cosine[5] == pytest.approx(0.55)
    assert cosine[7] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 5 / 6)) / 2)
