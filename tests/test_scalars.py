"""A run's scalars read back from its TensorBoard events (rlhf_lightning/scalars.py)."""

from __future__ import annotations

import pytest
from torch.utils.tensorboard import SummaryWriter

from rlhf_lightning.scalars import eval_rows, read_scalars


def test_a_step_logged_again_keeps_the_value_written_last(tmp_path):
    """A run that resumed logs some steps a second time, in a second event file: the later
    write wins whatever its value, and every step appears once."""
    first = SummaryWriter(str(tmp_path / "tb" / "a"))
    for step, value in ((0, 0.1), (2, 0.9), (4, 0.8)):
        first.add_scalar("val/gold_score", value, step, walltime=100.0 + step)
    first.close()
    resumed = SummaryWriter(str(tmp_path / "tb" / "b"))
    for step, value in ((2, 0.2), (4, 0.3), (6, 0.4)):
        resumed.add_scalar("val/gold_score", value, step, walltime=200.0 + step)
    resumed.close()

    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["val/gold_score"]] == [0, 2, 4, 6]
    assert [value for _, value in scalars["val/gold_score"]] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    rows = eval_rows(scalars)
    assert [row["val/gold_score"] for row in rows] == pytest.approx([0.1, 0.2, 0.3, 0.4])
