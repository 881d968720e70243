"""rlhf_lightning.stats: weighted means and maxima reduced exactly over ranks, collective
decisions, and errors one rank sees raised on every rank (one process, and 2 gloo processes)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_lightning.data.validation import DataValidationError
from rlhf_lightning.errors import UserError
from rlhf_lightning.stats import (
    Stats,
    agreed_error,
    all_ranks_sum,
    any_rank,
    stop_together,
    world_size,
)


def test_weighted_means_and_maxima_hand_values():
    stats = Stats()
    stats.add("loss", 6.0, 3.0)  # 3 observations summing to 6
    stats.add("loss", torch.tensor(1.0), torch.tensor(1.0))
    stats.add_mean("len", torch.tensor([1.0, 2.0, 6.0]))
    stats.add_max("ratio_max", torch.tensor(1.5))
    stats.add_max("ratio_max", 1.2)
    other = Stats()
    other.add("loss", 3.0, 1.0)
    other.add_max("ratio_max", 2.5)
    other.add("empty", 0.0, 0.0)
    stats.merge(other)
    out = stats.reduce()
    assert out["loss"] == pytest.approx((6 + 1 + 3) / 5)
    assert out["len"] == pytest.approx(3.0)
    assert out["ratio_max"] == 2.5
    assert set(out) == {"loss", "len", "ratio_max"}  # "empty" has no observation: undefined


def test_one_process_collectives_are_local():
    assert world_size() == 1
    assert all_ranks_sum(torch.tensor(2.5)).item() == 2.5
    assert all_ranks_sum(3).dtype == torch.float64
    assert any_rank(True) and not any_rank(False)
    assert agreed_error(None) is None and agreed_error("bad row 3") == "bad row 3"
    with stop_together():
        pass
    error = DataValidationError("data.jsonl, row 3: bad")
    with pytest.raises(DataValidationError) as raised, stop_together():
        raise error
    assert raised.value is error  # one process: the error itself, unchanged


def _stop_together_on(rank: int, failing: int):
    """What ``stop_together`` raises on this rank when rank ``failing`` raises in the block."""
    try:
        with stop_together():
            if rank == failing:
                raise DataValidationError(f"data.jsonl, row {rank + 3}: bad")
    except UserError as error:
        return type(error).__name__, str(error)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_rank(rank: int, world: int, port: int, out) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stats = Stats()
        if rank == 0:  # 1 token of loss 10; a max of 3
            stats.add("loss", 10.0, 1.0)
            stats.add_max("ratio_max", 3.0)
        else:  # 3 tokens of loss 2 each; a max of 1.5; a name rank 0 lacks
            stats.add("loss", 6.0, 3.0)
            stats.add_max("ratio_max", 1.5)
            stats.add("only_rank_1", 4.0, 2.0)
            stats.add_max("max_only_rank_1", -1.0)
        stats.add("empty", 0.0, 0.0)  # no observation on any rank
        out[rank] = {
            "reduced": stats.reduce(),
            "world": world_size(),
            "sum": float(all_ranks_sum(rank + 1.0)),
            "any_one": any_rank(rank == 1),
            "any_none": any_rank(False),
            "error_none": agreed_error(None),
            "error_one": agreed_error("bad row 7" if rank == 1 else None),
            "error_both": agreed_error(f"bad row {rank}"),
            "stop_one": _stop_together_on(rank, failing=1),
            "stop_none": _stop_together_on(rank, failing=-1),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_reduce_to_the_statistics_of_the_whole_batch():
    """The mean over all tokens of both ranks (not the mean of the two ranks' means), the
    maximum over ranks, names one rank lacks, and the same decisions on every rank."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_on_rank, args=(2, _free_port(), out), nprocs=2, join=True)
        ranks = [dict(out[0]), dict(out[1])]
    for got in ranks:
        assert got["world"] == 2 and got["sum"] == 3.0
        assert got["any_one"] is True and got["any_none"] is False
        reduced = got["reduced"]
        assert reduced["loss"] == pytest.approx((10 + 6) / 4)  # mean of means would be 6
        assert reduced["ratio_max"] == 3.0
        assert reduced["only_rank_1"] == pytest.approx(2.0)
        assert reduced["max_only_rank_1"] == -1.0
        assert "empty" not in reduced  # undefined: left out, not NaN
        # an error one rank sees: the same message on every rank, naming the rank
        assert got["error_none"] is None
        assert got["error_one"] == "bad row 7 (rank 1)"
        assert got["error_both"] == "bad row 0 (rank 0)"  # the lowest rank's
        assert got["stop_one"] == ("UserError", "data.jsonl, row 4: bad (rank 1)")
        assert got["stop_none"] is None
    assert ranks[0]["reduced"] == ranks[1]["reduced"]
