"""The reward-source interface, plain Python reward functions, and `build_reward`.

A reward source maps a batch of (prompt, response) texts, and optionally other per-prompt
columns of the prompt data, to one float32 score per response, on the CPU, without gradients.
Sources work on text, so they may use any tokenizer. A source that raises or returns anything
but one finite number per response stops with one `RewardError` naming it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence

import torch

from rlhf_lightning.errors import UserError

RewardFn = Callable[..., Sequence[float] | torch.Tensor]


class RewardError(UserError, ValueError):
    """A reward source raised, or returned something other than one finite score per response;
    the message names the source (its qualified name) and what was wrong."""


class RewardSource:
    """Base class. Subclasses implement `score`; `__call__` checks inputs and outputs.

    `score(prompts, responses[, column=...])` returns one number per response (list, array or
    tensor); it runs under `torch.inference_mode()` and receives, as keyword arguments, the
    prompt data's columns its signature names (all of them with `**kwargs`).
    """

    name: str = "reward"

    @property
    def qualified_name(self) -> str:
        """`module.Class` of the source: how error messages name it."""
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def to(self, device: torch.device | str) -> RewardSource:
        """Move any model to `device` (no-op for sources without one). Returns self."""
        return self

    def score(self, prompts: list[str], responses: list[str]) -> Sequence[float] | torch.Tensor:
        raise NotImplementedError

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], /, **columns: Sequence
    ) -> torch.Tensor:
        """Scores: (B,) float32 on the CPU, one per response.

        `columns`: extra per-prompt values (e.g. a reference answer), B each, passed on to
        `score` as far as its signature accepts them. Raises `RewardError` if `score` raises or
        returns anything but B finite numbers; the original exception is chained.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        for column, values in columns.items():
            if len(values) != len(prompts):
                raise ValueError(
                    f"column {column!r} has {len(values)} values for {len(prompts)} prompts"
                )
        kwargs = accepted_columns(self.score, columns, self.qualified_name)
        try:
            with torch.inference_mode():
                raw = self.score(list(prompts), list(responses), **kwargs)
        except RewardError:
            raise
        except Exception as error:
            raise RewardError(
                f"reward {self.qualified_name} raised {type(error).__name__}: {error}"
            ) from error
        return as_reward_tensor(raw, len(responses), self.qualified_name)


def accepted_columns(fn: Callable, columns: dict[str, Sequence], source_name: str) -> dict:
    """The `columns` that `fn(prompts, responses, **columns)` accepts by name (all of them if it
    takes `**kwargs`). Raises `RewardError` if `fn` requires a parameter that no column fills."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins): give it none
        return {}
    parameters = list(signature.parameters.values())
    # The first two positional parameters take prompts and responses.
    taken = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    taken = taken[:2]
    by_keyword = {
        p.name: p
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in taken
    }
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        accepted = {name: values for name, values in columns.items() if name not in taken}
    else:
        accepted = {name: values for name, values in columns.items() if name in by_keyword}
    missing = [
        name for name, p in by_keyword.items() if p.default is p.empty and name not in accepted
    ]
    if missing:
        have = ", ".join(repr(name) for name in columns) or "none"
        raise RewardError(
            f"reward {source_name} takes {', '.join(repr(name) for name in missing)}, which no "
            f"column of the prompt data fills (columns given: {have})"
        )
    return accepted


def as_reward_tensor(values, batch_size: int, source_name: str) -> torch.Tensor:
    """Check a reward source's output and return it as a (batch_size,) float32 CPU tensor.

    Raises `RewardError` naming `source_name` for anything but `batch_size` finite numbers:
    None, strings, a wrong length, more than one dimension, NaN, +-inf (also values beyond the
    float32 range).
    """
    where = f"reward {source_name} returned"
    if values is None or isinstance(values, str | bytes | dict):
        raise RewardError(f"{where} {_describe(values)}; expected {batch_size} numbers")
    try:
        if isinstance(values, torch.Tensor):
            scores = values.detach().to(device="cpu", dtype=torch.float64)
        else:
            scores = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise RewardError(
            f"{where} {_describe(values)}, which is not {batch_size} numbers ({error})"
        ) from error
    if scores.dim() != 1:
        raise RewardError(
            f"{where} shape {tuple(scores.shape)} for {batch_size} responses; expected one "
            f"score per response, shape ({batch_size},)"
        )
    if len(scores) != batch_size:
        plural = "s" if len(scores) != 1 else ""
        raise RewardError(f"{where} {len(scores)} score{plural} for {batch_size} responses")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        shown = scores[bad[:10]].tolist()
        raise RewardError(f"{where} non-finite scores at positions {bad[:10]}: {shown}")
    scores = scores.float()
    beyond = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if beyond:
        raise RewardError(f"{where} scores beyond the float32 range at positions {beyond[:10]}")
    return scores  # a normal tensor even when computed under inference mode


def _describe(values) -> str:
    """A short description of a reward output for error messages."""
    if values is None:
        return "None"
    if isinstance(values, list | tuple):
        kinds = sorted({type(value).__name__ for value in values})
        odd = [value for value in values if not isinstance(value, int | float)]
        shown = f", e.g. {odd[0]!r:.40}" if odd else ""
        return f"a {type(values).__name__} of {len(values)} ({'/'.join(kinds)}{shown})"
    return f"a {type(values).__name__} {values!r:.60}"


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
    """Wraps `fn(prompts, responses[, column=...]) -> list[float] | Tensor`, given as a callable
    or an import path string ("pkg.module:function" or "pkg.module.function").

    `fn` receives the prompt data's columns that its signature names as keyword arguments (all
    of them if it takes `**kwargs`), so `fn(prompts, responses)` ignores them.
    """

    def __init__(self, fn: RewardFn | str):
        self.fn = import_callable(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"CallableReward needs a callable, got {type(self.fn).__name__}")
        target = self.fn.func if isinstance(self.fn, functools.partial) else self.fn
        if not hasattr(target, "__qualname__"):  # a callable object: named by its class
            target = type(target)
        self.name = target.__qualname__
        self._qualified_name = f"{target.__module__}.{target.__qualname__}"

    @property
    def qualified_name(self) -> str:
        return self._qualified_name

    def score(self, prompts: list[str], responses: list[str], **columns):
        kwargs = accepted_columns(self.fn, columns, self.qualified_name)
        return self.fn(prompts, responses, **kwargs)


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
