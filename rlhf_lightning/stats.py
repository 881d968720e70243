"""Collectives of the training loop, and statistics that are reduced over ranks once.

Under data parallelism every rank must take the same branches (skip a minibatch, stop an epoch
loop, raise), or one rank waits forever in a collective the others never enter. The decisions
here are therefore made on all-reduced values (:func:`any_rank`); an error that one rank sees
is raised on every rank with the same message (:func:`agreed_error`, :func:`stop_together`);
and :class:`Stats` gathers an iteration's statistics as sums and maxima and reduces them over
all ranks in one go, so the logged numbers are exact over the global batch: weighted means are
``sum / weight`` of the all-rank sums (not a mean of per-rank means) and maxima are the maximum
over ranks.
With one process every function here is a plain local computation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from rlhf_lightning.errors import UserError


def world_size() -> int:
    """The number of ranks (1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_ranks_sum(value: torch.Tensor | float) -> torch.Tensor:
    """Sum of a 0-dim value over all ranks, as a float64 tensor (the value itself with one)."""
    total = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if world_size() > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        total = total.to(device)
        dist.all_reduce(total)
    return total.cpu()


def gather_shards(items: list) -> list:
    """The items of every rank in their global order, on every rank, where rank ``r`` holds
    ``global[r::world_size]`` (as the eval prompts are sharded). A collective; with one process
    the items themselves."""
    if world_size() == 1:
        return list(items)
    shards: list = [None] * world_size()
    dist.all_gather_object(shards, items)
    ordered = []
    for j in range(max(len(shard) for shard in shards)):
        ordered += [shard[j] for shard in shards if j < len(shard)]
    return ordered


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank (every rank gets the same answer)."""
    return bool(all_ranks_sum(float(flag)) > 0)


def agreed_error(message: str | None) -> str | None:
    """The error of the lowest rank that has one, the same on every rank; None when no rank has
    one. With one process that is ``message`` itself; with several it names the rank it comes
    from (``<message> (rank 1)``). A collective: every rank calls it, with its error or None;
    when all is well it costs one all-reduce of a number."""
    if world_size() == 1 or not any_rank(message is not None):
        return message
    messages: list = [None] * world_size()
    dist.all_gather_object(messages, message)
    rank, first = next((r, m) for r, m in enumerate(messages) if m is not None)
    return f"{first} (rank {rank})"


@contextmanager
def stop_together() -> Iterator[None]:
    """Run the block on every rank; a `UserError` raised in it on any rank is raised on every
    rank with the same message (:func:`agreed_error`), so that no rank goes on into a collective
    the others never enter. With one process the error is raised as it is. Every rank must run
    the block (the agreement is a collective at its end)."""
    error = None
    try:
        yield
    except UserError as raised:
        error = raised
    agreed = agreed_error(None if error is None else str(error))
    if agreed is None:
        return
    if world_size() == 1:
        raise error
    raise UserError(agreed) from error


class Stats:
    """Weighted sums and maxima by name, reduced over ranks by :meth:`reduce`.

    ``add(name, total, weight)`` adds ``total`` (a sum of ``weight`` observations) to the
    numerator and ``weight`` to the denominator of ``name``'s mean; ``add_max`` keeps a maximum.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.maxima: dict[str, float] = {}

    def add(self, name: str, total: torch.Tensor | float, weight: torch.Tensor | float) -> None:
        self.sums[name] += float(total)
        self.weights[name] += float(weight)

    def add_mean(self, name: str, values: torch.Tensor) -> None:
        """Every element of ``values`` as one observation."""
        self.add(name, values.detach().double().sum(), values.numel())

    def add_max(self, name: str, value: torch.Tensor | float) -> None:
        self.maxima[name] = max(self.maxima.get(name, -math.inf), float(value))

    def merge(self, other: Stats) -> None:
        for name in other.sums:
            self.add(name, other.sums[name], other.weights[name])
        for name, value in other.maxima.items():
            self.add_max(name, value)

    def reduce(self) -> dict[str, float]:
        """Means and maxima over all ranks. Every rank must call it (a collective); names that
        a rank lacks count as empty there. A mean with no observation on any rank is undefined
        and left out (never NaN: a NaN in the logs always means trouble)."""
        names_sum = sorted(self.sums)
        names_max = sorted(self.maxima)
        if world_size() > 1:
            gathered: list = [None] * world_size()
            dist.all_gather_object(gathered, (names_sum, names_max))
            names_sum = sorted({n for sums, _ in gathered for n in sums})
            names_max = sorted({n for _, maxima in gathered for n in maxima})
        sums = torch.tensor(
            [[self.sums.get(n, 0.0), self.weights.get(n, 0.0)] for n in names_sum],
            dtype=torch.float64,
        ).reshape(-1, 2)
        maxima = torch.tensor([self.maxima.get(n, -math.inf) for n in names_max])
        if world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            sums, maxima = sums.to(device), maxima.to(device)
            dist.all_reduce(sums)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            sums, maxima = sums.cpu(), maxima.cpu()
        out = {
            name: float(total / weight)
            for name, (total, weight) in zip(names_sum, sums.tolist())
            if weight > 0
        }
        out.update(zip(names_max, maxima.tolist()))
        return out
