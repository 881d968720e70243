"""Across ranks: advantage whitening over the whole batch of all ranks, and loss denominators
counted over the whole minibatch on all ranks (2 gloo processes against one process)."""

from __future__ import annotations

import os
import socket
import statistics

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
        out[rank + world] = global_masked_whiten(x[rows], mask[rows], shift_mean=False)
        constant = torch.full_like(x[rows], 3.0)  # variance 0 (e.g. one score for every row)
        out[rank + 2 * world] = global_masked_whiten(constant, mask[rows])
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
        scaled = torch.cat([out[2], out[3]])
        of_constant = torch.cat([out[4], out[5]])
    real = x[mask].tolist()  # every rank's real values: the statistics of the whole batch
    mean, std = statistics.mean(real), statistics.stdev(real)
    expected = torch.tensor([(v - mean) / (std**2 + 1e-8) ** 0.5 for v in real])
    torch.testing.assert_close(gathered[mask], expected, rtol=1e-5, atol=1e-5)
    assert torch.all(gathered[~mask] == 0)
    # shift_mean=False scales only: the mean of all ranks is kept
    torch.testing.assert_close(scaled[mask], expected + mean, rtol=1e-5, atol=1e-5)
    assert torch.all(scaled[~mask] == 0)
    assert torch.equal(of_constant, torch.zeros_like(x))  # 0, not NaN: eps keeps it finite
    per_rank = masked_whiten(x[:3], mask[:3])
    assert not torch.allclose(gathered[:3][mask[:3]], per_rank[mask[:3]], atol=0.1)


def test_single_process_whitening_matches_a_python_reference():
    x, mask = torch.randn(4, 6, dtype=torch.float64), torch.rand(4, 6) > 0.2
    mask[:, 0] = True
    real = x[mask].tolist()
    mean, std = statistics.mean(real), statistics.stdev(real)
    expected = [(v - mean) / (std**2 + 1e-8) ** 0.5 for v in real]
    out = global_masked_whiten(x, mask)
    assert out[mask].tolist() == pytest.approx(expected, rel=1e-9)
    assert (out[~mask] == 0).all()
    # shift_mean=False scales only: the mean is kept
    kept = global_masked_whiten(x, mask, shift_mean=False)[mask].tolist()
    assert kept == pytest.approx([e + mean for e in expected], rel=1e-9)


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def _aggregated_module(aggregation: str):
    """A tiny PPO module whose loss uses ``aggregation``, with a KL term and a value loss."""
    import dataclasses

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from rlhf_lightning.cli.train import CONF_DIR
    from tests.ppo_helpers import tiny_config, tiny_ppo_module

    node = OmegaConf.load(CONF_DIR / "algorithm" / "loss_aggregation" / f"{aggregation}.yaml")
    if "normalizer" in node:
        node.normalizer = 8
    cfg = tiny_config(generation__stop_token="a", kl_coef=0.1)
    alg = dataclasses.replace(cfg.algorithm, loss_aggregation=instantiate(node))
    return tiny_ppo_module(dataclasses.replace(cfg, algorithm=alg))


def _module_and_experience(aggregation: str):
    """The same module and experience on every process (seeded; made before any process group
    exists, so the advantages are whitened over these 8 rows alone)."""
    from tests.modules.test_ppo import _experience

    torch.manual_seed(0)
    module = _aggregated_module(aggregation)
    with torch.no_grad():
        for p in module.ref_lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exp = _experience(module, n=8, kl_coef=0.1)
    exp.response_mask[::3, 3:] = False  # uneven lengths, so token counts differ across ranks
    return module, exp


def _grads(module, exp) -> dict[str, torch.Tensor]:
    """The gradient of one minibatch made of all of ``exp``'s rows."""

    module.minibatch_backward(exp, torch.arange(len(exp)), False, iteration=0)
    policy = getattr(module.policy, "module", module.policy)  # unwrap DDP
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def _grads_on_rank(rank: int, world: int, port: int, out):
    from torch.nn.parallel import DistributedDataParallel

    made = {agg: _module_and_experience(agg) for agg in AGGREGATIONS}
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = torch.tensor([0, 1, 2, 3, 4]) if rank == 0 else torch.tensor([5, 6, 7])
        grads = {}
        for aggregation, (module, exp) in made.items():
            module.policy = DistributedDataParallel(module.policy)
            grads[aggregation] = _grads(module, exp.select(rows))
        out[rank] = grads
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_gradient_of_the_whole_minibatch_for_each_aggregation():
    """Ranks holding 5 and 3 rollouts of uneven lengths: with all-rank denominators, DDP's
    averaged gradient equals the one-process gradient of the whole minibatch."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_grads_on_rank, args=(2, _free_port(), out), nprocs=2, join=True)
        ranks = [dict(out[0]), dict(out[1])]
    for aggregation in AGGREGATIONS:
        whole = _grads(*_module_and_experience(aggregation))
        for rank in ranks:
            got = rank[aggregation]
            assert got.keys() == whole.keys() and whole
            for name in whole:
                torch.testing.assert_close(got[name], whole[name], rtol=1e-4, atol=1e-6)
