"""Typed, validated views of the Hydra config.

Each dataclass documents its fields once and checks them in ``__post_init__``, so an impossible
setting fails at startup -- before any model loads -- with a message naming the key. The task
code builds them with :func:`ppo_config_from` / :func:`rm_config_from`; the raw ``DictConfig`` is
never mutated during a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf_lightning.errors import UserError

KL_ESTIMATORS = ("k1", "abs", "k2", "k3")


class ConfigError(UserError, ValueError):
    """An impossible or contradictory configuration value."""


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key}: {reason}")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings of the rollouts (``algorithm.generation``).

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
        p = "algorithm.generation"
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
class KLConfig:
    """The KL penalty against the frozen reference (``algorithm.kl``)."""

    coef: float = 0.05
    """beta: fixed coefficient, or the initial one of the adaptive controller."""
    estimator: str = "k1"
    """Per-token estimator: k1 | abs | k2 | k3 (see :mod:`rlhf_lightning.kl`)."""
    placement: str = "reward"
    """``reward``: -beta*KL_t in the per-token reward; ``loss``: beta*KL added to the loss."""
    controller: Any = None
    """A ``_target_`` config of FixedKLController / AdaptiveKLController."""
    target: float | None = None
    horizon: float | None = None

    def __post_init__(self) -> None:
        p = "algorithm.kl"
        _check(self.coef >= 0, f"{p}.coef", f"must be >= 0, got {self.coef}")
        _check(
            self.estimator in KL_ESTIMATORS,
            f"{p}.estimator",
            f"unknown KL estimator {self.estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}",
        )
        _check(
            self.placement in ("reward", "loss"),
            f"{p}.placement",
            f"must be 'reward' or 'loss', got {self.placement!r}",
        )
        if self.target is not None:
            _check(self.target > 0, f"{p}.target", f"must be > 0, got {self.target}")
        if self.horizon is not None:
            _check(self.horizon > 0, f"{p}.horizon", f"must be > 0, got {self.horizon}")


@dataclass(frozen=True)
class PPOConfig:
    """PPO coefficients (``algorithm``). See ``conf/algorithm/ppo.yaml`` for the defaults' sources.

    Sizes are per rank and count rollouts (prompt + sampled response):
    ``rollout_batch_size`` rollouts per iteration, split into minibatches of ``minibatch_size``
    (one optimizer step each), each computed in micro-batches of ``micro_batch_size`` (gradient
    accumulation). One iteration therefore makes
    ``ppo_epochs * rollout_batch_size / minibatch_size`` optimizer steps.
    """

    num_iterations: int = 20
    rollout_batch_size: int = 16
    minibatch_size: int = 8
    micro_batch_size: int = 4
    experience_batch_size: int | None = None
    """Rollouts per no-grad forward when making experience (policy + values, reference); None:
    ``micro_batch_size``. No activations are kept there, so it can be larger."""
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    score_clip: float | None = None
    missing_eos_penalty: float | None = None
    target_kl: float | None = None
    max_grad_norm: float | None = 1.0
    value_model: str = "shared"
    critic_path: str | None = None
    critic_warmup_iterations: int = 0
    """The first N iterations train the value function alone (value head, or the critic): the
    policy loss is dropped and the policy gets no gradient, so advantages come from a fitted
    baseline before the policy moves."""
    policy_lr: float = 1e-5
    value_lr: float = 1e-4
    weight_decay: float = 0.0
    adam_eps: float = 1e-5
    fused_adam: bool = True
    """PyTorch's fused AdamW kernel where it applies (see ``rlhf_lightning.optim.adamw``)."""
    warmup_ratio: float = 0.0
    lr_decay: str = "linear"
    eval_every: int = 5
    eval_batches: int | None = 2
    sample_table_every: int = 5
    checkpoint_every: int = 1
    on_nonfinite: str = "error"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    kl: KLConfig = field(default_factory=KLConfig)

    @property
    def experience_rows(self) -> int:
        """Rollouts per forward in experience making."""
        return self.experience_batch_size or self.micro_batch_size

    @property
    def minibatches_per_epoch(self) -> int:
        return self.rollout_batch_size // self.minibatch_size

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return self.ppo_epochs * self.minibatches_per_epoch

    def __post_init__(self) -> None:
        p = "algorithm"
        for name in ("num_iterations", "rollout_batch_size", "minibatch_size", "micro_batch_size"):
            value = getattr(self, name)
            _check(value >= 1, f"{p}.{name}", f"must be a positive integer, got {value}")
        if self.experience_batch_size is not None:
            _check(
                self.experience_batch_size >= 1,
                f"{p}.experience_batch_size",
                f"must be a positive integer (or null), got {self.experience_batch_size}",
            )
        _check(self.ppo_epochs >= 1, f"{p}.ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
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
        _check(0 <= self.gamma <= 1, f"{p}.gamma", f"must be in [0, 1], got {self.gamma}")
        _check(0 <= self.lam <= 1, f"{p}.lam", f"must be in [0, 1], got {self.lam}")
        _check(self.clip > 0, f"{p}.clip", f"must be > 0, got {self.clip}")
        if self.value_clip is not None:
            _check(self.value_clip > 0, f"{p}.value_clip", "must be > 0 (or null to disable)")
        _check(self.vf_coef >= 0, f"{p}.vf_coef", f"must be >= 0, got {self.vf_coef}")
        _check(self.ent_coef >= 0, f"{p}.ent_coef", f"must be >= 0, got {self.ent_coef}")
        if self.score_clip is not None:
            _check(self.score_clip > 0, f"{p}.score_clip", "must be > 0 (or null to disable)")
        if self.target_kl is not None:
            _check(self.target_kl > 0, f"{p}.target_kl", "must be > 0 (or null to disable)")
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm > 0, f"{p}.max_grad_norm", "must be > 0 (or null)")
        _check(
            self.value_model in ("shared", "critic"),
            f"{p}.value_model",
            f"must be 'shared' or 'critic', got {self.value_model!r}",
        )
        _check(
            self.value_model == "shared" or bool(self.critic_path),
            f"{p}.critic_path",
            "value_model=critic needs critic_path (a saved reward model to start the critic from)",
        )
        _check(
            0 <= self.critic_warmup_iterations < self.num_iterations,
            f"{p}.critic_warmup_iterations",
            f"must be in [0, num_iterations={self.num_iterations}) so the policy trains at all, "
            f"got {self.critic_warmup_iterations}",
        )
        _check(
            self.critic_warmup_iterations == 0 or self.vf_coef > 0,
            f"{p}.vf_coef",
            "must be > 0 with critic_warmup_iterations (the warm-up loss is vf_coef x value loss)",
        )
        for name in ("policy_lr", "value_lr"):
            _check(getattr(self, name) > 0, f"{p}.{name}", "must be > 0")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(self.adam_eps > 0, f"{p}.adam_eps", "must be > 0")
        _check(0 <= self.warmup_ratio < 1, f"{p}.warmup_ratio", "must be in [0, 1)")
        _check(
            self.lr_decay in ("linear", "constant"),
            f"{p}.lr_decay",
            f"must be 'linear' or 'constant', got {self.lr_decay!r}",
        )
        for name in ("eval_every", "sample_table_every"):
            _check(getattr(self, name) >= 0, f"{p}.{name}", "must be >= 0 (0 disables)")
        _check(self.checkpoint_every >= 1, f"{p}.checkpoint_every", "must be >= 1")
        if self.eval_batches is not None:
            _check(self.eval_batches >= 1, f"{p}.eval_batches", "must be >= 1 (or null: all)")
        _check(
            self.on_nonfinite in ("error", "skip"),
            f"{p}.on_nonfinite",
            f"must be 'error' or 'skip', got {self.on_nonfinite!r}",
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
    histogram_every_n_steps: int = 50
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1

    def __post_init__(self) -> None:
        p = "rm"
        _check(self.max_epochs >= 1, f"{p}.max_epochs", f"must be >= 1, got {self.max_epochs}")
        _check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, f"{p}.warmup_ratio", "must be in [0, 1)")
        _check(self.val_check_interval > 0, f"{p}.val_check_interval", "must be > 0")
        _check(self.histogram_every_n_steps >= 0, f"{p}.histogram_every_n_steps", "must be >= 0")
        _check(self.accumulate_grad_batches >= 1, f"{p}.accumulate_grad_batches", "must be >= 1")
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


def _to_dataclass(cls, node: DictConfig | dict, prefix: str):
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"{prefix}.{unknown[0]}" if unknown else prefix, "unknown key")
    return cls, data


def ppo_config_from(node: DictConfig | dict) -> PPOConfig:
    """Validate ``cfg.algorithm`` and return it as a :class:`PPOConfig`."""
    _, data = _to_dataclass(PPOConfig, node, "algorithm")
    data = dict(data)
    gen_cls, gen = _to_dataclass(
        GenerationConfig, data.pop("generation", {}), "algorithm.generation"
    )
    kl_cls, kl = _to_dataclass(KLConfig, data.pop("kl", {}), "algorithm.kl")
    return PPOConfig(**data, generation=gen_cls(**gen), kl=kl_cls(**kl))


def rm_config_from(node: DictConfig | dict) -> RMConfig:
    """Validate ``cfg.rm`` and return it as an :class:`RMConfig`."""
    cls, data = _to_dataclass(RMConfig, node, "rm")
    return cls(**data)
