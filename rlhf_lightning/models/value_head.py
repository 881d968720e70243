"""Policy and value function in one module: a causal LM plus (optionally) a scalar value head.

The value model is a component (``algorithm.value_model._target_``):

- :class:`SharedValueHead`: the value head reads the policy's own last hidden state (shared
  trunk), so one forward pass gives logits and values;
- :class:`Critic`: the values come from a separate critic backbone initialised from a saved
  reward model, as in "The N+ Implementation Details of RLHF with PPO" (``from_reward_model``).
  The critic reads the policy's token ids, so it must use the same tokenizer;
- :class:`NoValueModel`: no value function (REINFORCE, RLOO, GRPO, ...).

Each carries the value function's training settings: the value-loss coefficient ``coef``, the
value clip ``clip``, its learning rate ``lr`` and ``warmup_iterations`` (the first iterations
train the value function alone).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.errors import require
from rlhf_lightning.models.masking import position_ids_from_mask
from rlhf_lightning.models.reward_model import ScalarRewardModel, backbone_last_hidden_state

# Config fields of architectures that transform logits after the LM head; the shortcut in
# `forward` (base model + output embeddings) would skip that transform.
_LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _positions(attention_mask, position_ids, response_start):
    """Position ids (counted over real tokens when None) and the slice of positions to keep:
    all, or with ``response_start=P`` the ones that predict tokens P..T-1 (P-1..T-2)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    keep = slice(None) if response_start is None else slice(response_start - 1, -1)
    return position_ids, keep


class PolicyWithValueHead(nn.Module):
    """`lm` (a `*ForCausalLM`) with a zero-initialised float32 `nn.Linear(d, 1)` value head.

    With `critic_backbone` (a bare `AutoModel` sharing the policy's tokenizer), values come from
    that backbone and the head sits on its hidden size instead. With ``with_value=False`` there
    is no value head (``value_head`` is None) and ``forward`` returns None for the values.
    """

    def __init__(
        self, lm: nn.Module, critic_backbone: nn.Module | None = None, with_value: bool = True
    ):
        super().__init__()
        for field in _LOGIT_TRANSFORM_FIELDS:
            if getattr(lm.config, field, None) not in (None, 1, 1.0):
                raise NotImplementedError(
                    f"{type(lm).__name__} transforms its logits ({field}); not supported"
                )
        if lm.get_output_embeddings() is None:
            raise ValueError(f"{type(lm).__name__} has no LM head; pass a *ForCausalLM model")
        self.lm = lm
        self.critic_backbone = critic_backbone
        value_trunk = lm if critic_backbone is None else critic_backbone
        device = next(value_trunk.parameters()).device
        self.value_head = None
        if with_value:
            self.value_head = nn.Linear(
                value_trunk.config.hidden_size, 1, dtype=torch.float32, device=device
            )
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        """The policy LM's config."""
        return self.lm.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        response_start: int | None = None,
        value_trains_trunk: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and values in one pass of the policy (plus one of the critic, if separate).

        input_ids, attention_mask: (B, T); position_ids: (B, T) or None, in which case they are
        counted over real tokens so left-padded rows match `generate()`.
        Returns logits (B, T, V) in the LM's dtype and values (B, T) float32 (None without a
        value head).

        With ``response_start=P`` only the T - P positions that *predict* tokens P..T-1 are kept
        (positions P-1..T-2): logits (B, T-P, V) and values (B, T-P), aligned with the response
        tokens, and the LM head runs on those positions alone (the prompt's logits are never
        materialised). ``value_trains_trunk=False`` detaches the shared trunk's hidden states
        before the value head, so the value loss trains the head alone (critic warm-up); a
        separate critic backbone always trains with its head.
        """
        position_ids, keep = _positions(attention_mask, position_ids, response_start)
        hidden = self._trunk_hidden(input_ids, attention_mask, position_ids, keep)  # (B, T', d)
        logits = self.lm.get_output_embeddings()(hidden)
        if self.value_head is None:
            return logits, None
        if self.critic_backbone is not None:
            hidden = self._critic_hidden(input_ids, attention_mask, position_ids, keep)
        elif not value_trains_trunk:
            hidden = hidden.detach()
        return logits, self._value_head_fp32(hidden)

    def values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int | None = None,
    ) -> torch.Tensor:
        """The values of :meth:`forward` without the LM head: (B, T) -> (B, T) fp32, or
        (B, T - P) with ``response_start=P``. Requires a value head."""
        position_ids, keep = _positions(attention_mask, None, response_start)
        if self.critic_backbone is not None:
            hidden = self._critic_hidden(input_ids, attention_mask, position_ids, keep)
        else:
            hidden = self._trunk_hidden(input_ids, attention_mask, position_ids, keep)
        return self._value_head_fp32(hidden)

    def values_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values from the shared trunk's last hidden states: (B, T, d) -> (B, T) fp32."""
        if self.critic_backbone is not None:
            raise ValueError("a separate critic does not read the policy's hidden states")
        return self._value_head_fp32(hidden)

    def _trunk_hidden(self, input_ids, attention_mask, position_ids, keep) -> torch.Tensor:
        """The policy LM's last hidden states at the ``keep`` positions: (B, T', d)."""
        return self.lm.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state[:, keep]

    def _critic_hidden(self, input_ids, attention_mask, position_ids, keep) -> torch.Tensor:
        """The critic backbone's last hidden states at the ``keep`` positions: (B, T', d)."""
        hidden = backbone_last_hidden_state(
            self.critic_backbone, input_ids, attention_mask, position_ids
        )
        return hidden[:, keep]

    def _value_head_fp32(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T', d) -> (B, T') fp32, even under mixed-precision autocast (which would run
        this Linear in bf16/fp16)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    def generate(self, **kwargs):
        """`self.lm.generate(**kwargs)`."""
        return self.lm.generate(**kwargs)

    @classmethod
    def from_reward_model(
        cls, lm: nn.Module, reward_model: ScalarRewardModel, normalized: bool = True
    ):
        """A policy whose critic is a copy of `reward_model`'s backbone and head.

        With ``normalized`` (default) the reward model's normalisation ``gain * raw + bias`` is
        folded into the critic's head, so the critic starts out predicting the score PPO's
        learned reward gives (``LearnedReward`` normalises by default); otherwise the raw score.
        The reward model must use the policy's tokenizer; as a cheap check, the embedding tables
        must have the same size.
        """
        policy_vocab = lm.get_input_embeddings().num_embeddings
        critic_vocab = reward_model.backbone.get_input_embeddings().num_embeddings
        if policy_vocab != critic_vocab:
            raise ValueError(
                f"the reward model's vocabulary ({critic_vocab}) differs from the policy's "
                f"({policy_vocab}); a critic must share the policy's tokenizer"
            )
        policy = cls(lm, critic_backbone=copy.deepcopy(reward_model.backbone))
        head = {k: v.detach().clone() for k, v in reward_model.head.state_dict().items()}
        if normalized:
            gain, bias = float(reward_model.gain), float(reward_model.bias)
            head = {"weight": head["weight"] * gain, "bias": head["bias"] * gain + bias}
        policy.value_head.load_state_dict(head)
        return policy


# ------------------------------------------------------------------------------- value models
class ValueModel:
    """Base of the value-model components: ``build(lm)`` -> :class:`PolicyWithValueHead`.

    ``present``: whether there is a value function at all.
    """

    present = True

    def build(self, lm: nn.Module) -> PolicyWithValueHead:
        raise NotImplementedError


@dataclass(frozen=True)
class NoValueModel(ValueModel):
    """No value function: the policy alone (critic-free estimators)."""

    present = False
    warmup_iterations = 0

    def build(self, lm):
        return PolicyWithValueHead(lm, with_value=False)


@dataclass(frozen=True)
class _TrainedValue(ValueModel):
    coef: float = 0.1
    """Value-loss coefficient in the total loss."""
    clip: float | None = 0.2
    """Clip of the values around the rollout-time values in the value loss; null disables."""
    lr: float = 1e-4
    """Learning rate of the value head (and critic backbone)."""
    warmup_iterations: int = 0
    """The first N iterations train the value function alone; the policy does not move."""

    def __post_init__(self) -> None:
        require(self.coef >= 0, "coef", f"must be >= 0, got {self.coef}")
        if self.clip is not None:
            require(self.clip > 0, "clip", f"must be > 0 (or null), got {self.clip}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(
            self.warmup_iterations >= 0,
            "warmup_iterations",
            f"must be >= 0, got {self.warmup_iterations}",
        )
        require(
            self.warmup_iterations == 0 or self.coef > 0,
            "coef",
            "must be > 0 with warmup_iterations (the warm-up loss is coef x value loss)",
        )


@dataclass(frozen=True)
class SharedValueHead(_TrainedValue):
    """A value head on the policy's own last hidden state (one forward gives both)."""

    def build(self, lm):
        return PolicyWithValueHead(lm)


@dataclass(frozen=True)
class Critic(_TrainedValue):
    """A separate critic: a copy of the reward model saved at ``path`` (backbone and head)."""

    path: str | None = None
    """A directory written by ``ScalarRewardModel.save_pretrained`` (same tokenizer as the
    policy)."""
    normalized: bool = True
    """Fold the reward model's normalisation into the head (predict the normalised score)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.path), "path", "a critic needs the path of a saved reward model")

    def build(self, lm):
        return PolicyWithValueHead.from_reward_model(
            lm, ScalarRewardModel.from_pretrained(self.path), normalized=self.normalized
        )
