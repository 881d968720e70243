"""PPO policy and value losses, the Bradley-Terry reward-model loss and explained variance.

PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"), per token
with ``ratio = exp(logp - logp_old)``::

    loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

Clipped value loss around the rollout-time values (from OpenAI Baselines' PPO2, kept by the RLHF
reproductions of Huang et al. 2024, "The N+ implementation details of RLHF with PPO")::

    loss = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2)

Bradley-Terry preference loss for reward models (Ouyang et al. 2022; the reward-model slides of
the seed ``004_f10ad3a5f684abf0.txt``): ``-log sigmoid(r_chosen - r_rejected - margin)``.

Token means run over the masked (real) positions of the whole batch. Padded positions may hold NaN
or inf: they are zeroed with ``torch.where`` before any arithmetic, so they reach neither the loss
nor its gradient. Every ``stats`` value is a detached 0-dim tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_lightning.ops import as_bool_mask, masked_mean, masked_var, zero_masked


def _masked_inputs(mask: Tensor, **tensors: Tensor) -> tuple[Tensor, ...]:
    """Check shapes and return (keep, *tensors with their masked positions zeroed)."""
    first = next(iter(tensors.values()))
    for name, tensor in tensors.items():
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(first.shape)}"
            )
    keep = as_bool_mask(mask, first.shape)
    return keep, *(zero_masked(tensor, keep) for tensor in tensors.values())


def _fraction(condition: Tensor, keep: Tensor) -> Tensor:
    """Share of the masked positions where ``condition`` holds; detached 0-dim float."""
    return masked_mean(condition.float(), keep).detach()


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss over the real tokens.

    logprobs: (B, T) current policy, with grad; old_logprobs: (B, T) at rollout time;
    advantages: (B, T); mask: (B, T) bool or 0/1; clip_eps > 0.
    -> (loss: 0-dim, stats) with ``clipfrac`` (share of tokens where the clipped term is the larger
    one, i.e. the gradient is cut), ``approx_kl`` (``0.5 * mean((logp - logp_old)^2)``),
    ``ratio_mean`` and ``ratio_max``.
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    keep, logprobs, old_logprobs, advantages = _masked_inputs(
        mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages
    )
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), keep)
    with torch.no_grad():
        stats = {
            "clipfrac": _fraction(clipped > unclipped, keep),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, keep),
            "ratio_mean": masked_mean(ratio, keep),
            "ratio_max": torch.where(keep, ratio, -torch.inf).max(),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Squared-error value loss, optionally clipped around the rollout-time values.

    values: (B, T) current, with grad; old_values: (B, T) at rollout time; returns: (B, T) targets;
    mask: (B, T) bool or 0/1; clip_eps: > 0, or None for the plain ``0.5 * mean((V - R)^2)``.
    -> (loss: 0-dim, stats) with ``clipfrac`` (share of tokens where the clipped error is the larger
    one; 0 without clipping).
    """
    if clip_eps is not None and not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    keep, values, old_values, returns = _masked_inputs(
        mask, values=values, old_values=old_values, returns=returns
    )
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss = 0.5 * masked_mean(unclipped, keep)
        return loss, {"clipfrac": torch.zeros((), device=values.device)}
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), keep)
    return loss, {"clipfrac": _fraction(clipped > unclipped, keep)}


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss ``mean(-log sigmoid(chosen - rejected - margin))``.

    chosen, rejected: (B,) rewards of the preferred and the other response; margin: (B,) or None.
    -> (loss: 0-dim, stats) with ``accuracy`` (share of pairs with chosen > rejected),
    ``chosen_mean``, ``rejected_mean`` and ``margin_mean`` (mean of chosen - rejected).
    """
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must both be (B,)"
        )
    if margin is not None and margin.shape != chosen.shape:
        raise ValueError(f"margin has shape {tuple(margin.shape)}, expected {tuple(chosen.shape)}")
    if chosen.numel() == 0:
        raise ValueError("bradley_terry_loss needs at least one pair")
    reward_gap = chosen - rejected
    logits = reward_gap if margin is None else reward_gap - margin
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (reward_gap > 0).float().mean(),
            "chosen_mean": chosen.mean(),
            "rejected_mean": rejected.mean(),
            "margin_mean": reward_gap.mean(),
        }
    return loss, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over the masked positions; a detached 0-dim tensor.

    values, returns: (B, T); mask: (B, T) bool or 0/1.
    1 is a perfect value function, 0 no better than a constant, negative worse than one.
    Returns NaN when ``Var[R] == 0`` (including a single real token): the ratio is undefined there.
    """
    with torch.no_grad():
        keep, values, returns = _masked_inputs(mask, values=values, returns=returns)
        var_returns = masked_var(returns, keep, unbiased=False)
        var_error = masked_var(returns - values, keep, unbiased=False)
        return torch.where(var_returns > 0, 1 - var_error / var_returns, torch.nan)
