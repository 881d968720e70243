"""Lightning strategies configured for transformers models (``conf/trainer/fsdp*.yaml``).

FSDP shards parameters, gradients and optimizer state over the ranks. Its unit of sharding is
the wrapped module: ``fsdp_strategy`` wraps every transformer block (every transformers layer that
supports activation checkpointing, i.e. each decoder / encoder layer, whatever the architecture),
so one block's full weights exist at a time during forward and backward.

Which task runs under which strategy (checked before any model loads, see ``tasks.ppo``):

- reward-model training: ddp, fsdp, deepspeed (ZeRO-2/3) -- ordinary automatic optimization;
- PPO: the ddp family only. Rollouts call ``generate`` on the policy and a frozen reference that
  lives outside the Lightning module; under FSDP / ZeRO-3 every decoding step would all-gather
  every layer. Fit PPO in memory with ``peft=lora`` (no reference copy, no full AdamW state) and
  ``policy.gradient_checkpointing=true`` instead.
"""

from __future__ import annotations

from torch import nn


def is_transformer_block(module: nn.Module) -> bool:
    """A transformers decoder / encoder layer (they subclass ``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer)


def fsdp_strategy(**kwargs):
    """``FSDPStrategy`` that wraps each transformer block; ``kwargs`` go to the strategy."""
    from functools import partial

    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    policy = partial(lambda_auto_wrap_policy, lambda_fn=is_transformer_block)
    return FSDPStrategy(auto_wrap_policy=policy, **kwargs)
