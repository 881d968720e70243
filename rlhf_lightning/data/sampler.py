"""Which items each rank sees at each epoch: stateless, resumable samplers, and a DataLoader
that resumes in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


def stream_indices(num_items: int, seed: int, start: int, count: int) -> list[int]:
    """Positions [start, start + count) of the endless stream perm_0 + perm_1 + ...

    perm_k = randperm(num_items) drawn from a generator seeded with `seed + k`, so every pass
    over the stream visits each item exactly once.
    """
    indices: list[int] = []
    position = start
    while len(indices) < count:
        pass_index, offset = divmod(position, num_items)
        generator = torch.Generator().manual_seed(seed + pass_index)
        permutation = torch.randperm(num_items, generator=generator).tolist()
        taken = permutation[offset : offset + count - len(indices)]
        indices += taken
        position += len(taken)
    return indices


class RolloutSampler(Sampler[int]):
    """Yields the prompt indices of one rank for one epoch (one PPO iteration per epoch).

    Epoch `e` on rank `r` of `world_size` takes `batches_per_epoch * batch_size` items of the
    stream of `stream_indices`, starting at position
    `(e * world_size + r) * batches_per_epoch * batch_size`. The order is a pure function of
    (seed, epoch, rank, world_size): resuming at epoch `e` (Lightning calls `set_epoch`) repeats
    exactly the same prompts with no state to save, ranks never take the same stream position,
    and every prompt is used once per pass. An item appears twice in one epoch only when the
    epoch straddles the end of a pass (the next permutation may repeat it early).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int = 1,
    ) -> None:
        if num_items < 1 or batch_size < 1 or batches_per_epoch < 1:
            raise ValueError(
                f"num_items, batch_size and batches_per_epoch must be >= 1, got {num_items}, "
                f"{batch_size}, {batches_per_epoch}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        start = (self.epoch * self.world_size + self.rank) * len(self)
        return iter(stream_indices(self.num_items, self.seed, start, len(self)))


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, drawn from a generator seeded with ``seed + epoch``.

    Unlike ``shuffle=True`` with one seeded generator, the order of epoch ``e`` does not depend
    on how many epochs this process has run: a run resumed at epoch ``e`` (Lightning calls
    ``set_epoch``) sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_items


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes in the middle of an epoch.

    Lightning saves its ``state_dict()`` in checkpoints, ``{"epoch", "batches"}``: the sampler's
    epoch and how many batches of that epoch have been handed out, and passes it back to
    ``load_state_dict`` on resume. The next pass over the same epoch then skips those batches:
    it draws and drops them, so the rest comes in the order of an uninterrupted run whatever the
    sampler (Lightning's distributed one too). Skipping costs the skipped batches' collation.
    A pass over another epoch (the checkpoint was saved at the end of its epoch) skips nothing.

    The count is exact because Lightning fetches a sized loader's batches one at a time, as
    the training loop consumes them (no look-ahead).
    """

    _position = (0, 0)  # (epoch, batches handed out in it)
    _resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_at = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first next(), after Lightning's set_epoch.
        epoch = int(getattr(self.sampler, "epoch", 0))
        resume_epoch, skip = self._resume_at or (epoch, 0)
        self._resume_at = None
        skip = skip if resume_epoch == epoch else 0
        self._position = (epoch, 0)
        for index, batch in enumerate(super().__iter__()):
            self._position = (epoch, index + 1)
            if index >= skip:
                yield batch
