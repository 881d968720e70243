"""Code the DDP tests run inside `rlhf-train` processes (named in the command line): a task that
records what each rank holds, and rewards that misbehave on one rank only.

`strategy=ddp` re-launches the command line as rank 1, so everything here is reached through
config values (`task.fn=tests.ddp_helpers.ppo_with_rank_dumps`, `reward._target_=...`) and works
the same in both processes.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

DUMP_DIR = "rank_dumps"  # under the run dir


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load_dump(run_dir: Path, rank_: int, tag: str) -> dict:
    return torch.load(run_dir / DUMP_DIR / f"rank{rank_}_{tag}.pt", weights_only=True)


class RankDump(L.Callback):
    """Every rank saves its policy's parameters, its non-finite skip count, optimizer step and
    logged metrics (reduced over ranks) at the start of training and after each iteration
    (``rank{r}_start.pt``, ``rank{r}_iter{k}.pt``), with the responses it scored in training so
    far."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.responses: list[list[str]] = []

    def on_train_start(self, trainer, module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        reward = module.reward

        def recording(prompts, responses, **columns):
            if module.phase == "scoring":  # training rollouts only, not eval
                self.responses.append(list(responses))
            return reward(prompts, responses, **columns)

        module.reward = recording
        self.save(trainer, module, "start")

    def on_train_epoch_end(self, trainer, module) -> None:
        self.save(trainer, module, f"iter{trainer.current_epoch}")

    def save(self, trainer, module, tag: str) -> None:
        state = {
            "params": {n: p.detach().cpu().clone() for n, p in module.policy.named_parameters()},
            "nonfinite_skips": module.nonfinite_skips,
            "global_step": trainer.global_step,
            "responses": [list(r) for r in self.responses],
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}_{tag}.pt")


def ppo_with_rank_dumps(cfg):
    """``rlhf_lightning.tasks.ppo.run`` with a `RankDump` callback writing to
    ``<run dir>/rank_dumps``."""
    from rlhf_lightning.tasks import ppo
    from rlhf_lightning.tasks.common import run_dir

    build_trainer = ppo.build_trainer

    def with_dump(cfg_, callbacks, **kwargs):
        return build_trainer(cfg_, [*callbacks, RankDump(run_dir(cfg_) / DUMP_DIR)], **kwargs)

    ppo.build_trainer = with_dump
    try:
        return ppo.run(cfg)
    finally:
        ppo.build_trainer = build_trainer


def fraction_of_e(responses: list[str]) -> list[float]:
    return [r.count("e") / max(len(r), 1) for r in responses]


def nan_on_rank_one(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of 'e', except NaN for the first response on rank 1."""
    scores = fraction_of_e(responses)
    if rank() == 1:
        scores[0] = float("nan")
    return scores


_calls = 0


def huge_on_rank_one_at_second_call(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of 'e'; on rank 1's second call (iteration 1 without evals) every score is 1e38:
    finite, but the value loss (V - R)^2 overflows to inf on that rank only."""
    global _calls
    _calls += 1
    if rank() == 1 and _calls == 2:
        return [1e38] * len(responses)
    return fraction_of_e(responses)


def equal_on_rank_one(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of 'e', except on rank 1, where every response scores 0.5: every group of rank
    1 has equal scores (dynamic sampling sets all of them aside)."""
    return [0.5] * len(responses) if rank() == 1 else fraction_of_e(responses)
