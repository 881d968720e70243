"""Typed, validated views of the Hydra config.

Each dataclass documents its fields once and checks them in ``__post_init__``, so an impossible
setting fails at startup -- before any model loads -- with a message naming the key as it is
written on the command line (``algorithm.kl.reward.coef``). Components chosen by ``_target_`` (the
advantage estimator, the policy loss, ...) are built here too, by :func:`build_component`, which
checks their keys and types the same way. The raw ``DictConfig`` is never mutated during a run.

The config of a policy-optimisation run (:class:`RLConfig`) is split by concern:

- ``algorithm`` (:class:`AlgorithmConfig`, ``conf/algorithm/<preset>.yaml``): what is learned
  and how -- estimator, losses, value model, KL, optimizer;
- ``budget`` (:class:`Budget`, ``conf/budget/``): how much compute -- iterations and batch sizes;
- ``generation`` (:class:`GenerationConfig`, ``conf/generation/``): how rollouts are sampled;
- ``task`` (:class:`Cadence`): how often to evaluate, checkpoint and log sample tables.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf_lightning.errors import FieldError, UserError


class ConfigError(UserError, ValueError):
    """An impossible or contradictory configuration value."""


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key}: {reason}")


# ------------------------------------------------------------------------------- type checks
def _type_name(tp) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")  # Optional[int], dict | None, ...


def _matches(value: Any, tp) -> bool:
    """Whether ``value`` (from YAML or the command line) has the annotated type ``tp``.

    ``int`` rejects bools and floats (``2.0`` is not a batch size); ``float`` accepts ints;
    ``X | None`` accepts None; ``Literal[...]`` its values; containers check their own type
    only; ``Any`` accepts all.
    """
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Literal:  # one of the listed values, of the same type (not True for 1)
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is not None:
        tp = origin
    if tp in (dict, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, tp)


def check_fields(cls, data: Mapping, prefix: str) -> None:
    """Unknown keys and wrongly typed values of ``data`` for dataclass ``cls``, named by key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    for key in sorted(data):
        _check(key in known, f"{prefix}.{key}", "unknown key")
        expected = hints[key]
        _check(
            _matches(data[key], expected),
            f"{prefix}.{key}",
            f"must be {_type_name(expected)}, got {data[key]!r}",
        )


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _to_dataclass(cls, node, prefix: str):
    data = _plain(node)
    _check(isinstance(data, Mapping), prefix, f"must be a mapping, got {data!r}")
    check_fields(cls, data, prefix)
    return cls, data


def _build(cls, data: Mapping, prefix: str):
    """``cls(**data)`` with a component's ``FieldError`` named by its full key; a required field
    (no default) that ``data`` lacks is named too."""
    if is_dataclass(cls):
        for f in fields(cls):
            required = f.init and f.default is MISSING and f.default_factory is MISSING
            _check(not required or f.name in data, f"{prefix}.{f.name}", "required, not set")
    try:
        return cls(**data)
    except FieldError as error:
        raise ConfigError(f"invalid config: {prefix}.{error.field}: {error.reason}") from None


def build_component(node, key: str, base: type | None = None, **kwargs):
    """Instantiate a ``_target_`` node (``_partial_: true`` gives a ``functools.partial``).

    Checks, naming ``key``: the target imports; for dataclass targets, unknown keys and types;
    the component's own ``__post_init__`` checks; an instance of ``base`` when given.
    ``kwargs`` are passed on besides the node's keys.
    """
    from hydra.utils import get_object

    data = _plain(node)
    _check(
        isinstance(data, Mapping) and "_target_" in data,
        key,
        f"needs a _target_ (a class or function to build), got {data!r}",
    )
    target = data["_target_"]
    try:
        obj = get_object(target)
    except Exception as error:  # ImportError, AttributeError, ...
        raise ConfigError(
            f"invalid config: {key}._target_: cannot import {target!r}: {error}"
        ) from None
    _check(callable(obj), f"{key}._target_", f"{target!r} is not callable")
    args = {k: v for k, v in data.items() if not k.startswith("_")}
    if is_dataclass(obj):
        check_fields(obj, args, key)
    args.update(kwargs)
    if data.get("_partial_"):
        return functools.partial(obj, **args)
    try:
        instance = _build(obj, args, key)
    except TypeError as error:  # a function target with wrong arguments
        raise ConfigError(f"invalid config: {key}: {error}") from None
    if base is not None:
        _check(
            isinstance(instance, base),
            f"{key}._target_",
            f"{target!r} does not give a {base.__name__}",
        )
    return instance


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings of the rollouts (``generation``, ``conf/generation/``).

    PPO's logprobs, KL and losses use the full ``softmax(logits / temperature)``. Whatever else
    reshapes the sampling distribution (``top_k > 0``, ``top_p < 1``, ``min_new_tokens > 0``,
    which masks the stop token) makes the rollouts slightly off-policy; the defaults do none of
    it, and the checkpoint's own ``generation_config`` is ignored while sampling.
    """

    temperature: float = 0.7
    """Sampling temperature; the logprobs used in the losses divide the logits by it too."""
    top_k: int = 0
    """0 disables top-k (sample from the full distribution, as PPO's theory assumes)."""
    top_p: float = 1.0
    """1.0 disables nucleus sampling."""
    max_new_tokens: int = 48
    min_new_tokens: int = 0
    stop_token: str | None = "eos"
    """``"eos"``: the tokenizer's EOS; ``None``: never stop early; else a string of one token."""
    sampling_dtype: str | None = None
    """None: sample with the trained weights. ``auto``: ``bfloat16`` where the device computes
    natively in bf16 (``rlhf_lightning.hardware``), else None. ``bfloat16`` / ``float16`` /
    ``float32``: sample from a copy of the policy LM with its parameters in that dtype,
    refreshed from the policy before every rollout (KV-cached decoding reads every weight per
    token, so bf16 weights halve that traffic; +1 copy of the LM in memory). The logprobs of the
    losses still come from the trained policy, so the samples come from a slightly different
    (rounded) policy."""

    def __post_init__(self) -> None:
        p = "generation"
        _check(
            self.sampling_dtype in (None, "auto", "bfloat16", "float16", "float32"),
            f"{p}.sampling_dtype",
            f"must be null, auto, bfloat16, float16 or float32, got {self.sampling_dtype!r}",
        )
        _check(self.temperature > 0, f"{p}.temperature", f"must be > 0, got {self.temperature}")
        _check(self.top_k >= 0, f"{p}.top_k", f"must be >= 0, got {self.top_k}")
        _check(0 < self.top_p <= 1, f"{p}.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.max_new_tokens >= 1, f"{p}.max_new_tokens", "must be >= 1")
        _check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"{p}.min_new_tokens",
            f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}",
        )


@dataclass(frozen=True)
class Budget:
    """How much compute an RL run spends (``budget``, ``conf/budget/``). Sizes are per rank and
    count rollouts (prompt + sampled response).

    Each iteration samples ``rollout_batch_size`` rollouts (``rollout_batch_size /
    algorithm.samples_per_prompt`` prompts), splits them into minibatches of ``minibatch_size``
    (one optimizer step each), each computed in micro-batches of ``micro_batch_size`` (gradient
    accumulation). One iteration makes ``algorithm.epochs * rollout_batch_size / minibatch_size``
    optimizer steps.
    """

    num_iterations: int = 20
    """Iterations (Lightning epochs), one rollout batch each."""
    rollout_batch_size: int = 16
    """Rollouts sampled per iteration per rank."""
    minibatch_size: int = 8
    """Rollouts per optimizer step; divides rollout_batch_size."""
    micro_batch_size: int = 4
    """Rollouts per forward/backward (gradient accumulation); divides minibatch_size."""
    experience_batch_size: int | None = None
    """Rollouts per no-grad forward when making experience (policy, values, reference); None:
    ``micro_batch_size``. No activations are kept there, so it can be larger."""

    def __post_init__(self) -> None:
        p = "budget"
        for name in ("num_iterations", "rollout_batch_size", "minibatch_size", "micro_batch_size"):
            value = getattr(self, name)
            _check(value >= 1, f"{p}.{name}", f"must be a positive integer, got {value}")
        if self.experience_batch_size is not None:
            _check(
                self.experience_batch_size >= 1,
                f"{p}.experience_batch_size",
                f"must be a positive integer (or null), got {self.experience_batch_size}",
            )
        _check(
            self.rollout_batch_size % self.minibatch_size == 0,
            f"{p}.minibatch_size",
            f"must divide rollout_batch_size ({self.rollout_batch_size}), got "
            f"{self.minibatch_size}",
        )
        _check(
            self.minibatch_size % self.micro_batch_size == 0,
            f"{p}.micro_batch_size",
            f"must divide minibatch_size ({self.minibatch_size}), got {self.micro_batch_size}",
        )

    @property
    def experience_rows(self) -> int:
        """Rollouts per forward in experience making."""
        return self.experience_batch_size or self.micro_batch_size

    @property
    def minibatches_per_epoch(self) -> int:
        return self.rollout_batch_size // self.minibatch_size


KL_TERM_KEYS = ("coef", "estimator", "clamp", "controller")
FIXED_KL = {"_target_": "rlhf_lightning.kl.FixedKLController"}


def kl_term_from(node, key: str):
    """A :class:`~rlhf_lightning.kl.KLTerm` from its node (``algorithm.kl.reward`` or
    ``algorithm.kl.loss``): ``coef`` (beta, >= 0; the controller's start), ``estimator`` (a name
    of ``rlhf_lightning.kl.KL_ESTIMATORS`` or a ``_target_`` node), ``clamp`` (> 0 or null) and
    ``controller`` (a ``_target_`` node, ``conf/kl/``; default fixed). The controller is built
    here, once."""
    from rlhf_lightning.kl import KL_ESTIMATORS, KLEstimator, KLTerm, kl_estimator

    data = _plain(node)
    _check(isinstance(data, Mapping), key, f"must be a mapping or null, got {data!r}")
    for name in sorted(data):
        _check(name in KL_TERM_KEYS, f"{key}.{name}", "unknown key")
    for name in ("coef", "estimator"):
        _check(
            name in data,
            f"{key}.{name}",
            "required, not set (kl=adaptive adapts the KL in the reward: a preset with "
            "algorithm.kl.reward=null has none)"
            if name == "coef" and "controller" in data
            else "required, not set",
        )
    coef = data["coef"]
    _check(_matches(coef, float) and coef >= 0, f"{key}.coef", f"must be >= 0, got {coef!r}")
    estimator = data["estimator"]
    if isinstance(estimator, Mapping):
        estimator = build_component(estimator, f"{key}.estimator", KLEstimator)
    else:
        _check(
            estimator in KL_ESTIMATORS,
            f"{key}.estimator",
            f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)} "
            "(or a _target_)",
        )
        estimator = kl_estimator(estimator)
    clamp = data.get("clamp")
    _check(
        clamp is None or (_matches(clamp, float) and clamp > 0),
        f"{key}.clamp",
        f"must be > 0 (or null), got {clamp!r}",
    )
    controller = build_component(
        data.get("controller") or FIXED_KL, f"{key}.controller", coef=float(coef)
    )
    return KLTerm(estimator, controller, clamp)


def kl_penalty_from(node):
    """The run's :class:`~rlhf_lightning.kl.KLPenalty` from ``algorithm.kl`` (defaults in
    ``conf/algorithm/common/defaults.yaml``): ``reward`` and ``loss`` (each a KL term or null)
    and ``allow_biased_gradient``. A term whose estimator's expected gradient is biased at its
    site is refused unless ``allow_biased_gradient`` is true."""
    from rlhf_lightning.kl import KLPenalty

    p = "algorithm.kl"
    data = _plain(node)
    _check(isinstance(data, Mapping), p, f"must be a mapping, got {data!r}")
    for name in sorted(data):
        _check(name in ("reward", "loss", "allow_biased_gradient"), f"{p}.{name}", "unknown key")
    for name in ("reward", "loss", "allow_biased_gradient"):
        _check(name in data, f"{p}.{name}", "required, not set")
    allow = data["allow_biased_gradient"]
    _check(
        isinstance(allow, bool),
        f"{p}.allow_biased_gradient",
        f"must be true or false, got {allow!r}",
    )
    terms = {
        site: None if data[site] is None else kl_term_from(data[site], f"{p}.{site}")
        for site in ("reward", "loss")
    }
    penalty = KLPenalty(terms["reward"], terms["loss"], allow)
    for site, bias in penalty.biased_gradients().items():
        _check(
            allow,
            f"{p}.{site}.estimator",
            f"{type(penalty.terms()[site].estimator).__name__}: {bias}. Use k1 in the reward, or "
            "k2 or k3_plus as a loss; or set algorithm.kl.allow_biased_gradient=true to run it "
            "anyway",
        )
    return penalty


@dataclass(frozen=True)
class Cadence:
    """How often a run evaluates, checkpoints and logs sample tables (``task.*``)."""

    eval_every: int = 5
    """Evaluate on held-out prompts every N iterations (0: never)."""
    eval_batches: int | None = 2
    """Held-out batches per evaluation (null: all)."""
    eval_before: bool = True
    """Also evaluate the starting policy, before the first iteration (the run's baseline). A
    sweep whose runs start from one policy and sample it with one seed needs that number once."""
    sample_table_every: int = 5
    """Log a table of prompts, responses and scores every N iterations (0: never)."""
    checkpoint_every: int = 1
    """Save a checkpoint every N iterations."""

    def __post_init__(self) -> None:
        for name in ("eval_every", "sample_table_every"):
            _check(getattr(self, name) >= 0, f"task.{name}", "must be >= 0 (0 disables)")
        _check(self.checkpoint_every >= 1, "task.checkpoint_every", "must be >= 1")
        if self.eval_batches is not None:
            _check(self.eval_batches >= 1, "task.eval_batches", "must be >= 1 (or null: all)")


@dataclass(frozen=True)
class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025): ``coef`` times 0 up to
    ``max_new_tokens - cache`` response tokens, then linearly down to -1 at ``max_new_tokens``
    (``algorithm.overlong_penalty``)."""

    cache: int
    """The last tokens before the length limit over which the penalty grows from 0 to -coef."""
    coef: float = 1.0

    def __post_init__(self) -> None:
        p = "algorithm.overlong_penalty"
        _check(self.cache >= 1, f"{p}.cache", f"must be >= 1, got {self.cache}")
        _check(self.coef >= 0, f"{p}.coef", f"must be >= 0, got {self.coef}")


@dataclass(frozen=True)
class DynamicSampling:
    """DAPO's dynamic sampling (Yu et al. 2025; ``algorithm.dynamic_sampling``): the groups of a
    prompt whose scores are all equal (no signal for a group baseline) are set aside and more
    prompts are sampled, in rounds of ``prompts_per_iteration``, until every rank has that many
    informative groups or ``max_rounds`` rounds are done (a rank still short then fills up with
    set-aside groups)."""

    max_rounds: int
    """Rounds of sampling per iteration at most (1: filter only, never resample)."""

    def __post_init__(self) -> None:
        _check(
            self.max_rounds >= 1,
            "algorithm.dynamic_sampling.max_rounds",
            f"must be >= 1, got {self.max_rounds}",
        )


@dataclass(frozen=True)
class AlgorithmConfig:
    """The estimator and its coefficients (``algorithm``, ``conf/algorithm/<preset>.yaml``).

    Every field is required: the defaults live in ``conf/algorithm/common/defaults.yaml`` only,
    and each preset overrides what makes it that preset.

    The components are built objects, chosen by ``_target_`` in the preset (see
    :mod:`rlhf_lightning.advantages`, :mod:`rlhf_lightning.losses`,
    :mod:`rlhf_lightning.models.value_head`).
    """

    name: str
    """The preset's name (for logs and the HParams table)."""
    advantage: Any
    """``AdvantageEstimator``: per-token advantages and value targets from the rewards."""
    policy_loss: Any
    """``PolicyLoss``: per-token policy loss (vanilla policy gradient or clipped surrogate)."""
    loss_aggregation: Any
    """``LossAggregation``: how per-token losses become one number (global denominators)."""
    value_model: Any
    """``ValueModel``: none, a head on the shared trunk, or a separate critic."""
    optimizer: Callable
    """``optimizer(param_groups)`` (a ``_partial_`` node); its ``lr`` is the policy's."""
    kl: Any
    """``KLPenalty``: the KL against the reference in the rewards and/or as a loss term."""
    samples_per_prompt: int
    """k responses per prompt, kept together as a group (RLOO/GRPO baselines need k >= 2)."""
    epochs: int
    """Passes over each rollout batch, reshuffled each time."""
    ent_coef: float
    """Entropy bonus coefficient."""
    whiten_advantages: bool
    """Normalise advantages to mean 0, std 1 over the rollout batch of all ranks."""
    whiten_rewards: bool
    """Scale per-token rewards to std 1 over the batch (the mean is kept)."""
    score_clip: float | None
    """Clip sequence scores to [-c, c]; null disables."""
    missing_eos_penalty: float | None
    """Score given to responses that never emit the stop token; null disables."""
    overlong_penalty: OverlongPenalty | None
    """DAPO's soft overlong punishment added to the score; null disables."""
    mask_truncated: bool
    """Leave the responses cut at ``generation.max_new_tokens`` (no stop token) out of the
    losses (DAPO's overlong filtering)."""
    dynamic_sampling: DynamicSampling | None
    """DAPO's dynamic sampling (groups of equal scores set aside, more prompts sampled); null:
    off."""
    target_kl: float | None
    """Stop the epoch loop early when the mean approx KL of an epoch exceeds this."""
    max_grad_norm: float | None
    """Clip the global gradient norm; null: measure only."""
    lr_schedule: Any
    """``LRSchedule``: the learning rate over the run's optimizer steps (warm-up, decay)."""
    on_nonfinite: str
    """``error``: a NaN/inf loss stops the run (all ranks); ``skip``: the minibatch is skipped."""
    old_logprobs: str
    """``recompute``: a forward of the trained policy gives the old logprobs; ``sampler``: take
    those the sampler recorded during generation under the model's full tempered softmax (no
    policy forward; values of a shared value head then come from generation's hidden
    states)."""
    sampler_correction: Any
    """``SamplerCorrection`` or None: reweight the policy loss by ``pi_old / pi_sampler``
    (truncated, or masked outside bounds) where sampling differs from the trained policy
    (top-k/top-p, a bf16 sampling copy, other kernels); needs ``old_logprobs=recompute``."""

    def __post_init__(self) -> None:
        p = "algorithm"
        _check(self.epochs >= 1, f"{p}.epochs", f"must be >= 1, got {self.epochs}")
        _check(
            self.samples_per_prompt >= 1,
            f"{p}.samples_per_prompt",
            f"must be >= 1, got {self.samples_per_prompt}",
        )
        _check(
            self.samples_per_prompt >= self.advantage.min_group_size,
            f"{p}.samples_per_prompt",
            f"{type(self.advantage).__name__} compares samples of the same prompt: needs >= "
            f"{self.advantage.min_group_size}, got {self.samples_per_prompt}",
        )
        _check(
            self.value_model.present or not self.advantage.needs_values,
            f"{p}.value_model",
            f"{type(self.advantage).__name__} needs a value model; choose "
            "algorithm/value_model=shared or critic (or a critic-free estimator)",
        )
        _check(self.ent_coef >= 0, f"{p}.ent_coef", f"must be >= 0, got {self.ent_coef}")
        for name in ("score_clip", "target_kl", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None:
                _check(value > 0, f"{p}.{name}", f"must be > 0 (or null to disable), got {value}")
        _check(
            self.old_logprobs in ("recompute", "sampler"),
            f"{p}.old_logprobs",
            f"must be 'recompute' or 'sampler', got {self.old_logprobs!r}",
        )
        _check(
            self.sampler_correction is None or self.old_logprobs == "recompute",
            f"{p}.sampler_correction",
            "compares the trained policy's logprobs with the sampler's: needs "
            "algorithm.old_logprobs=recompute (with sampler they are the same numbers)",
        )
        _check(
            self.on_nonfinite in ("error", "skip"),
            f"{p}.on_nonfinite",
            f"must be 'error' or 'skip', got {self.on_nonfinite!r}",
        )
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        import torch

        try:
            self.optimizer([{"params": [torch.zeros(1, requires_grad=True)]}])
        except FieldError as error:
            key = f"algorithm.optimizer.{error.field}"
            raise ConfigError(f"invalid config: {key}: {error.reason}") from None
        except Exception as error:
            raise ConfigError(f"invalid config: algorithm.optimizer: {error}") from None

    @property
    def policy_lr(self) -> float:
        return self.optimizer.keywords.get("lr", 1e-3)

    @property
    def value_warmup_iterations(self) -> int:
        return getattr(self.value_model, "warmup_iterations", 0)


@dataclass(frozen=True)
class RLConfig:
    """Everything ``PPOModule`` needs, validated together (cross-group checks here)."""

    algorithm: AlgorithmConfig
    budget: Budget = field(default_factory=Budget)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    cadence: Cadence = field(default_factory=Cadence)

    def __post_init__(self) -> None:
        alg, budget = self.algorithm, self.budget
        _check(
            budget.rollout_batch_size % alg.samples_per_prompt == 0,
            "algorithm.samples_per_prompt",
            f"must divide budget.rollout_batch_size ({budget.rollout_batch_size}), got "
            f"{alg.samples_per_prompt}",
        )
        _check(
            alg.value_warmup_iterations < budget.num_iterations,
            "algorithm.value_model.warmup_iterations",
            f"must be < budget.num_iterations={budget.num_iterations} so the policy trains at "
            f"all, got {alg.value_warmup_iterations}",
        )
        _check(
            alg.dynamic_sampling is None or alg.samples_per_prompt >= 2,
            "algorithm.dynamic_sampling",
            f"compares the scores of a prompt's samples: needs algorithm.samples_per_prompt >= "
            f"2, got {alg.samples_per_prompt}",
        )
        if alg.overlong_penalty is not None:
            _check(
                alg.overlong_penalty.cache <= self.generation.max_new_tokens,
                "algorithm.overlong_penalty.cache",
                f"must be <= generation.max_new_tokens={self.generation.max_new_tokens}, got "
                f"{alg.overlong_penalty.cache}",
            )
        _check(
            alg.missing_eos_penalty is None or self.generation.stop_token is not None,
            "algorithm.missing_eos_penalty",
            "needs a stop token: with generation.stop_token=null no response ever ends, so "
            "every score would be replaced by the penalty (no learning signal)",
        )

    @property
    def prompts_per_batch(self) -> int:
        """Prompts the data module gives per iteration per rank: ``prompts_per_iteration``, times
        ``max_rounds`` with dynamic sampling (the extra rounds' prompts)."""
        dynamic = self.algorithm.dynamic_sampling
        return self.prompts_per_iteration * (dynamic.max_rounds if dynamic else 1)

    @property
    def prompts_per_iteration(self) -> int:
        """Prompts per iteration per rank."""
        return self.budget.rollout_batch_size // self.algorithm.samples_per_prompt

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return self.algorithm.epochs * self.budget.minibatches_per_epoch


def algorithm_config_from(node) -> AlgorithmConfig:
    """Validate ``cfg.algorithm`` and build its components."""
    from rlhf_lightning.advantages import AdvantageEstimator
    from rlhf_lightning.losses import LossAggregation, PolicyLoss, SamplerCorrection
    from rlhf_lightning.models.value_head import ValueModel
    from rlhf_lightning.schedules import LRSchedule

    data = dict(_plain(node))
    _check(isinstance(data, Mapping), "algorithm", "must be a mapping")
    components = {
        "advantage": AdvantageEstimator,
        "policy_loss": PolicyLoss,
        "loss_aggregation": LossAggregation,
        "value_model": ValueModel,
        "lr_schedule": LRSchedule,
    }
    for name in (*components, "optimizer", "name"):
        _check(name in data, f"algorithm.{name}", "required (choose an algorithm preset)")
    built = {
        name: build_component(data.pop(name), f"algorithm.{name}", base)
        for name, base in components.items()
    }
    built["optimizer"] = build_component(data.pop("optimizer"), "algorithm.optimizer")
    correction = data.pop("sampler_correction", None)
    built["sampler_correction"] = (
        None
        if correction is None
        else build_component(correction, "algorithm.sampler_correction", SamplerCorrection)
    )
    _check("kl" in data, "algorithm.kl", "required (choose an algorithm preset)")
    built["kl"] = kl_penalty_from(data.pop("kl"))
    overlong = data.pop("overlong_penalty", None)
    if overlong is not None:
        cls, overlong = _to_dataclass(OverlongPenalty, overlong, "algorithm.overlong_penalty")
        overlong = _build(cls, overlong, "algorithm.overlong_penalty")
    built["overlong_penalty"] = overlong
    dynamic = data.pop("dynamic_sampling", None)
    if dynamic is not None:
        cls, dynamic = _to_dataclass(DynamicSampling, dynamic, "algorithm.dynamic_sampling")
        dynamic = _build(cls, dynamic, "algorithm.dynamic_sampling")
    built["dynamic_sampling"] = dynamic
    check_fields(AlgorithmConfig, data, "algorithm")
    return _build(AlgorithmConfig, {**data, **built}, "algorithm")


def rl_config_from(cfg: DictConfig) -> RLConfig:
    """Validate ``cfg.algorithm``, ``cfg.budget``, ``cfg.generation`` and the cadence keys of
    ``cfg.task`` together; returns the :class:`RLConfig` of the run."""
    algorithm = algorithm_config_from(cfg.algorithm)
    _, budget = _to_dataclass(Budget, cfg.get("budget") or {}, "budget")
    _, generation = _to_dataclass(GenerationConfig, cfg.get("generation") or {}, "generation")
    task = _plain(cfg.get("task") or {})
    cadence = {k: task[k] for k in (f.name for f in fields(Cadence)) if k in task}
    check_fields(Cadence, cadence, "task")
    return RLConfig(
        algorithm=algorithm,
        budget=Budget(**budget),
        generation=GenerationConfig(**generation),
        cadence=Cadence(**cadence),
    )


@dataclass(frozen=True)
class RMConfig:
    """Reward-model training settings (``rm``)."""

    max_epochs: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.01
    fused_adam: bool = True
    warmup_ratio: float = 0.1
    normalize: bool = True
    monitor: str = "val/accuracy"
    val_check_interval: float | int = 1.0
    """Validate every this fraction of an epoch (a float), or every this many batches (an int,
    at most the batches of one epoch on one rank: checked once the data is read)."""
    histogram_every_n_steps: int = 50
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    checkpoint_every_n_steps: int | None = 25
    """Save ``last.ckpt`` every N optimizer steps (None: at the end of each epoch only)."""

    def __post_init__(self) -> None:
        p = "rm"
        _check(self.max_epochs >= 1, f"{p}.max_epochs", f"must be >= 1, got {self.max_epochs}")
        _check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, f"{p}.warmup_ratio", "must be in [0, 1)")
        interval = self.val_check_interval
        _check(
            interval >= 1 if isinstance(interval, int) else 0 < interval <= 1,
            f"{p}.val_check_interval",
            f"must be a fraction of an epoch in (0, 1] (a float) or a number of batches >= 1 (an "
            f"int), got {interval!r}",
        )
        _check(self.histogram_every_n_steps >= 0, f"{p}.histogram_every_n_steps", "must be >= 0")
        _check(self.accumulate_grad_batches >= 1, f"{p}.accumulate_grad_batches", "must be >= 1")
        every = self.checkpoint_every_n_steps
        _check(every is None or every >= 1, f"{p}.checkpoint_every_n_steps", "must be >= 1 or null")
        if self.gradient_clip_val is not None:
            _check(self.gradient_clip_val > 0, f"{p}.gradient_clip_val", "must be > 0 (or null)")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters on the policy (``policy.lora``, conf/peft/lora.yaml)."""

    r: int = 16
    """Rank of the adapters."""
    alpha: float = 32.0
    """Scale: the adapter output is multiplied by alpha / r."""
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    """Layer names to adapt (PEFT's ``target_modules``) or ``all-linear`` (all but the LM head)."""

    def __post_init__(self) -> None:
        p = "policy.lora"
        _check(self.r >= 1, f"{p}.r", f"must be >= 1, got {self.r}")
        _check(self.alpha > 0, f"{p}.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"{p}.dropout", f"must be in [0, 1), got {self.dropout}")
        targets = self.target_modules
        _check(
            targets == "all-linear" or (isinstance(targets, list) and len(targets) > 0),
            f"{p}.target_modules",
            f"must be 'all-linear' or a non-empty list of layer names, got {targets!r}",
        )


@dataclass(frozen=True)
class PolicyOptions:
    """Memory / speed options of the trained policy (``policy.lora``, ``policy.compile``, ...)."""

    lora: LoRAConfig | None = None
    gradient_checkpointing: bool = False
    compile: dict[str, Any] | None = None
    """Keyword arguments of ``torch.compile`` for the training forward; None: eager."""

    def __post_init__(self) -> None:
        _check(
            isinstance(self.gradient_checkpointing, bool),
            "policy.gradient_checkpointing",
            f"must be true or false, got {self.gradient_checkpointing!r}",
        )
        _check(
            self.compile is None or isinstance(self.compile, dict),
            "policy.compile",
            f"must be null or a mapping of torch.compile arguments, got {self.compile!r}",
        )


def policy_options_from(node: DictConfig | dict) -> PolicyOptions:
    """The memory / speed options of ``cfg.policy`` (other policy keys are the loader's)."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    lora = data.get("lora")
    if lora is not None:
        _check(isinstance(lora, dict), "policy.lora", f"must be a mapping, got {lora!r}")
        cls, lora = _to_dataclass(LoRAConfig, lora, "policy.lora")
        lora = cls(**lora)
        try:
            import peft  # noqa: F401
        except ImportError:
            _check(False, "policy.lora", "needs PEFT: pip install 'rlhf-lightning[lora]'")
    return PolicyOptions(
        lora=lora,
        gradient_checkpointing=data.get("gradient_checkpointing", False),
        compile=data.get("compile"),
    )


def rm_config_from(node: DictConfig | dict) -> RMConfig:
    """Validate ``cfg.rm`` and return it as an :class:`RMConfig`."""
    cls, data = _to_dataclass(RMConfig, node, "rm")
    return cls(**data)
