"""The reward-source interface, plain Python reward functions, and `build_reward`.

A reward source maps a batch of (prompt, response) texts to one float32 score per response, on
the CPU, without gradients. Sources work on text, so they may use any tokenizer.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence

import torch

RewardFn = Callable[[list[str], list[str]], Sequence[float] | torch.Tensor]


class RewardSource:
    """Base class. Subclasses implement `score`; `__call__` checks inputs and outputs.

    `score(prompts, responses)` returns one number per response (list, array or tensor); it runs
    under `torch.inference_mode()`.
    """

    name: str = "reward"

    def to(self, device: torch.device | str) -> RewardSource:
        """Move any model to `device` (no-op for sources without one). Returns self."""
        return self

    def score(self, prompts: list[str], responses: list[str]) -> Sequence[float] | torch.Tensor:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Scores: (B,) float32 on the CPU, one per response."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        with torch.inference_mode():
            raw = self.score(list(prompts), list(responses))
        return as_reward_tensor(raw, len(responses), self.name)


def as_reward_tensor(values, batch_size: int, source_name: str) -> torch.Tensor:
    """Check a reward source's output and return it as a (batch_size,) float32 CPU tensor.

    Raises TypeError for non-numeric output and ValueError for a wrong length or shape, or for
    NaN / infinite scores.
    """
    try:
        if isinstance(values, torch.Tensor):
            scores = values.detach().to(device="cpu", dtype=torch.float32)
        else:
            scores = torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"reward {source_name!r} must return numbers (a list or a tensor), "
            f"got {type(values).__name__}: {error}"
        ) from None
    if scores.shape != (batch_size,):
        raise ValueError(
            f"reward {source_name!r} returned shape {tuple(scores.shape)} for {batch_size} "
            f"responses; expected one score per response, shape ({batch_size},)"
        )
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"reward {source_name!r} returned non-finite scores at positions {bad}: "
            f"{scores[bad].tolist()}"
        )
    return scores.clone()  # a normal tensor even when computed under inference mode


def import_callable(path: str) -> Callable:
    """Import `"pkg.module:function"` or `"pkg.module.function"` (attribute may be dotted)."""
    module_name, colon, attribute = path.partition(":")
    if not colon:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"expected 'pkg.module:function' or 'pkg.module.function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"cannot import {module_name!r} for {path!r}: {error}") from error
    try:
        obj = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise ImportError(f"{module_name!r} has no attribute {attribute!r}") from None
    if not callable(obj):
        raise TypeError(f"{path!r} is a {type(obj).__name__}, not a callable")
    return obj


class CallableReward(RewardSource):
    """Wraps `fn(prompts, responses) -> list[float] | Tensor`, given as a callable or an import
    path string ("pkg.module:function" or "pkg.module.function")."""

    def __init__(self, fn: RewardFn | str):
        self.fn = import_callable(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"CallableReward needs a callable, got {type(self.fn).__name__}")
        target = self.fn.func if isinstance(self.fn, functools.partial) else self.fn
        self.name = getattr(target, "__qualname__", type(target).__name__)

    def score(self, prompts: list[str], responses: list[str]):
        return self.fn(prompts, responses)


def build_reward(obj) -> RewardSource:
    """Turn what `hydra.utils.instantiate(cfg.reward)` returned into a `RewardSource`.

    A `RewardSource` is returned as is; a plain callable (e.g. a function instantiated with
    `_partial_: true`) or an import path string is wrapped in `CallableReward`.
    """
    if isinstance(obj, RewardSource):
        return obj
    if callable(obj) or isinstance(obj, str):
        return CallableReward(obj)
    raise TypeError(
        f"cannot use a {type(obj).__name__} as a reward: expected a RewardSource, a callable "
        "fn(prompts, responses) or an import path string"
    )
