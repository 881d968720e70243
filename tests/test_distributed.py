"""Statistics across ranks: advantage whitening over the whole batch of all DDP ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_lightning.ops import masked_whiten
from rlhf_lightning.rollout.experience import global_masked_whiten


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whiten_on_rank(rank: int, world: int, port: int, x: torch.Tensor, mask: torch.Tensor, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = slice(rank * 3, rank * 3 + 3)
        out[rank] = global_masked_whiten(x[rows], mask[rows])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_whitening_uses_the_statistics_of_all_ranks():
    torch.manual_seed(0)
    # Rank 1's rows have a much larger mean: per-rank whitening would differ visibly.
    x = torch.randn(6, 5)
    x[3:] += 10.0
    mask = torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    x[~mask] = float("nan")  # padding never leaks into the statistics
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_whiten_on_rank, args=(2, _free_port(), x, mask, out), nprocs=2, join=True)
        gathered = torch.cat([out[0], out[1]])
    expected = masked_whiten(x, mask)
    torch.testing.assert_close(gathered[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert torch.all(gathered[~mask] == 0)
    per_rank = masked_whiten(x[:3], mask[:3])
    assert not torch.allclose(gathered[:3][mask[:3]], per_rank[mask[:3]], atol=0.1)


def test_single_process_whitening_equals_masked_whiten():
    x, mask = torch.randn(4, 6), torch.rand(4, 6) > 0.2
    mask[:, 0] = True
    torch.testing.assert_close(global_masked_whiten(x, mask), masked_whiten(x, mask))
