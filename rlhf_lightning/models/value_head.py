"""Policy and value function in one module: a causal LM plus a scalar value head.

By default the value head reads the policy's own last hidden state (shared trunk), so one forward
pass gives logits and values. Alternatively the values come from a separate critic backbone, e.g.
one initialised from the reward model as in "The N+ Implementation Details of RLHF with PPO"
(`from_reward_model`). The critic reads the policy's token ids, so it must use the same tokenizer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

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
    that backbone and the head sits on its hidden size instead.
    """

    def __init__(self, lm: nn.Module, critic_backbone: nn.Module | None = None):
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values in one pass of the policy (plus one of the critic, if separate).

        input_ids, attention_mask: (B, T); position_ids: (B, T) or None, in which case they are
        counted over real tokens so left-padded rows match `generate()`.
        Returns logits (B, T, V) in the LM's dtype and values (B, T) float32.

        With ``response_start=P`` only the T - P positions that *predict* tokens P..T-1 are kept
        (positions P-1..T-2): logits (B, T-P, V) and values (B, T-P), aligned with the response
        tokens, and the LM head runs on those positions alone (the prompt's logits are never
        materialised).
        """
        position_ids, keep = _positions(attention_mask, position_ids, response_start)
        hidden = self._trunk_hidden(input_ids, attention_mask, position_ids, keep)  # (B, T', d)
        logits = self.lm.get_output_embeddings()(hidden)
        if self.critic_backbone is not None:
            hidden = self._critic_hidden(input_ids, attention_mask, position_ids, keep)
        return logits, self._value_head_fp32(hidden)

    def values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        response_start: int | None = None,
    ) -> torch.Tensor:
        """The values of :meth:`forward` alone, with gradients only for the value function's own
        parameters: (B, T) -> (B, T) fp32, or (B, T - P) with ``response_start=P``.

        With a shared trunk the policy LM runs without grad (only the value head learns) and its
        LM head is skipped; a separate critic backbone keeps its gradients. Used for critic
        warm-up, where the policy must not move.
        """
        position_ids, keep = _positions(attention_mask, position_ids, response_start)
        if self.critic_backbone is not None:
            hidden = self._critic_hidden(input_ids, attention_mask, position_ids, keep)
        else:
            with torch.no_grad():
                hidden = self._trunk_hidden(input_ids, attention_mask, position_ids, keep)
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
    def from_reward_model(cls, lm: nn.Module, reward_model: ScalarRewardModel):
        """A policy whose critic is a copy of `reward_model`'s backbone and head.

        The critic starts out predicting the raw (unnormalised) reward-model score at every
        position. The reward model must use the policy's tokenizer; as a cheap check, the
        embedding tables must have the same size.
        """
        policy_vocab = lm.get_input_embeddings().num_embeddings
        critic_vocab = reward_model.backbone.get_input_embeddings().num_embeddings
        if policy_vocab != critic_vocab:
            raise ValueError(
                f"the reward model's vocabulary ({critic_vocab}) differs from the policy's "
                f"({policy_vocab}); a critic must share the policy's tokenizer"
            )
        policy = cls(lm, critic_backbone=copy.deepcopy(reward_model.backbone))
        policy.value_head.load_state_dict(reward_model.head.state_dict())
        return policy
