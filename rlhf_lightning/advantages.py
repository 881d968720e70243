"""Per-token rewards, rewards-to-go and GAE advantages for response tokens (pure torch).

Token rewards (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details of RLHF with
PPO"): every response token gets ``-kl_coef * KL_t``; the sequence score of the reward model is
added at the last real token.

Rewards-to-go (REINFORCE, the "reducing variance" step of the seed slides
``004_f10ad3a5f684abf0.txt``): ``G_t = r_t + gamma * G_{t+1}``.

Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation"): ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t +
gamma * lam * A_{t+1}``; the returns (value targets) are ``A_t + V_t``. ``lam = 1`` gives the
discounted return minus ``V_t``; ``lam = 0`` gives the one-step TD error.

Masking: positions where the mask is False are not part of the trajectory. Their rewards and values
are never read (they may hold NaN), their outputs are 0, and the recursions step over them: the
"next" value of a real token is that of the next *real* token, and 0 after the last one (the
response has ended; the episode is terminal). For the usual right-padded responses this is simply a
terminal value of 0 after each row's last real token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.kl import kl_penalty
from rlhf_lightning.ops import as_bool_mask, last_true_index, zero_masked


def _check_discount(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _check_same_shape(reference: Tensor, **tensors: Tensor) -> None:
    if reference.dim() != 2:
        raise ValueError(f"expected (B, T) tensors, got shape {tuple(reference.shape)}")
    for name, tensor in tensors.items():
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}"
            )


def rewards_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Discounted sum of the present and future rewards at every real position.

    rewards: (B, T); mask: (B, T) bool or 0/1 -> (B, T), 0 at masked positions.
    ``G_t = r_t + gamma * G_{t'}`` where ``t'`` is the next real position (0 after the last).
    """
    _check_same_shape(rewards, mask=mask)
    _check_discount("gamma", gamma)
    keep = as_bool_mask(mask, rewards.shape)
    rewards = zero_masked(rewards, keep)
    future = torch.zeros_like(rewards[:, 0])  # (B,) return from the next real position on
    returns = []
    for t in reversed(range(rewards.shape[1])):
        current = rewards[:, t] + gamma * future
        future = torch.where(keep[:, t], current, future)
        returns.append(zero_masked(current, keep[:, t]))
    return torch.stack(returns[::-1], dim=1)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over (right-padded) responses.

    rewards, values: (B, T); mask: (B, T) bool or 0/1 -> (advantages, returns), each (B, T) and 0
    at masked positions. returns = advantages + values at real positions.
    """
    _check_same_shape(rewards, values=values, mask=mask)
    _check_discount("gamma", gamma)
    _check_discount("lam", lam)
    keep = as_bool_mask(mask, rewards.shape)
    rewards = zero_masked(rewards, keep)
    values = zero_masked(values, keep)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V of the next real position, 0 at the end
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A of the next real position
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        is_real = keep[:, t]
        next_value = torch.where(is_real, values[:, t], next_value)
        next_advantage = torch.where(is_real, advantage, next_advantage)
        advantages.append(zero_masked(advantage, is_real))
    advantages_bt = torch.stack(advantages[::-1], dim=1)
    return advantages_bt, zero_masked(advantages_bt + values, keep)


def token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty on every response token plus the score at the last one.

    scores: (B,) sequence scores; logprobs, ref_logprobs: (B, T) log-probabilities of the sampled
    tokens under the policy and the reference; mask: (B, T) bool or 0/1, each row with at least
    one real token; kl_coef: float or 0-dim tensor; kind: a KL estimator (see ``kl.py``).
    -> (rewards, kl), each (B, T) and 0 at masked positions: ``kl`` is the per-token estimate and
    ``rewards = -kl_coef * kl`` plus ``scores[b]`` at row b's last real token.
    """
    _check_same_shape(logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected ({logprobs.shape[0]},)")
    keep = as_bool_mask(mask, logprobs.shape)
    # Zero the padding before any arithmetic, so NaN there reaches neither output nor gradient.
    kl = kl_penalty(zero_masked(logprobs, keep), zero_masked(ref_logprobs, keep), kind)
    last = last_true_index(keep)  # (B,)
    score_at_last = torch.zeros_like(kl).scatter(1, last[:, None], scores[:, None].to(kl.dtype))
    rewards = zero_masked(score_at_last - kl_coef * kl, keep)
    return rewards, kl
