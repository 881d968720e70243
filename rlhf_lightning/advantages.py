"""Advantage estimators for response tokens: pure torch functions and the configurable
components that apply them (``algorithm.advantage._target_``).

Token rewards (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details of RLHF with
PPO"): every response token gets ``-kl_coef * KL_t`` (when the KL is in the reward); the sequence
score of the reward source is added at the last real token. The sequence return is their sum.

The policy-gradient ladder (REINFORCE -> rewards-to-go -> baseline -> GAE), one estimator per
rung, each weighting ``grad log pi(y_t | s_t)``:

- :class:`SequenceReturn` (REINFORCE, Williams 1992): the whole sequence's return ``R`` at every
  token.
- :class:`RewardsToGo`: ``G_t = r_t + gamma * G_{t+1}``, only the rewards from t on ("reducing
  variance": an action cannot affect the rewards before it).
- :class:`RewardsToGoBaseline`: ``G_t - V(s_t)`` with a learned value as the baseline.
- :class:`GAE` (Schulman et al. 2016): ``delta_t = r_t + gamma * V_{t+1} - V_t``,
  ``A_t = delta_t + gamma * lam * A_{t+1}``; returns (value targets) ``A_t + V_t``. ``lam = 1``
  is the discounted return minus ``V_t``; ``lam = 0`` the one-step TD error.

Critic-free estimators over ``k`` samples per prompt (rows ordered group by group), each giving
one advantage per sequence, broadcast to its tokens:

- :class:`LeaveOneOut` (RLOO, Ahmadian et al. 2024, "Back to Basics"): ``R_i`` minus the mean of
  the other ``k - 1`` returns of its group.
- :class:`GroupNormalized` (GRPO, Shao et al. 2024, "DeepSeekMath"): ``(R_i - mean_g) / (std_g +
  eps)``; with ``scale_by_std=false`` the group mean only (Dr. GRPO, Liu et al. 2025,
  "Understanding R1-Zero-Like Training", who show the std division biases the update towards
  groups with little spread).

- :class:`RewardsToGoGroupBaseline` (REINFORCE++-baseline, Hu et al. 2025, "REINFORCE++:
  Stabilizing Critic-Free Policy Optimization with Global Normalization"): each token's
  rewards-to-go ``G_t`` minus the mean of the sequence returns ``R_j`` of its prompt's group, so
  a per-token KL in the rewards is credited from t on while the score is compared within the
  group. Unbiased at the scale ``(k - 1) / k`` (the group mean holds the sample's own return).

REINFORCE++ (Hu 2025) is :class:`RewardsToGo` with the advantages whitened over the global batch
(``algorithm.whiten_advantages``), not an estimator of its own; REINFORCE++-baseline is
:class:`RewardsToGoGroupBaseline` with the same whitening (the ``reinforce_pp_baseline`` preset),
the mean and the std taken over every real token of the rollout batch on all ranks.

Masking: positions where the mask is False are not part of the trajectory. Their rewards and values
are never read (they may hold NaN), their outputs are 0, and the recursions step over them: the
"next" value of a real token is that of the next *real* token, and 0 after the last one (the
response has ended; the episode is terminal). For the usual right-padded responses this is simply a
terminal value of 0 after each row's last real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_lightning.errors import require
from rlhf_lightning.kl import KLEstimator, kl_penalty
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
    kind: str | KLEstimator = "k1",
    clamp: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty on every response token plus the score at the last one.

    scores: (B,) sequence scores; logprobs, ref_logprobs: (B, T) log-probabilities of the sampled
    tokens under the policy and the reference; mask: (B, T) bool or 0/1, each row with at least
    one real token; kl_coef: float or 0-dim tensor; kind: a KL estimator or its name, clamp its
    clamp (see ``kl.py``).
    -> (rewards, kl), each (B, T) and 0 at masked positions: ``kl`` is the per-token estimate and
    ``rewards = -kl_coef * kl`` plus ``scores[b]`` at row b's last real token.
    """
    _check_same_shape(logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected ({logprobs.shape[0]},)")
    keep = as_bool_mask(mask, logprobs.shape)
    # Zero the padding before any arithmetic, so NaN there reaches neither output nor gradient.
    kl = kl_penalty(zero_masked(logprobs, keep), zero_masked(ref_logprobs, keep), kind, clamp)
    last = last_true_index(keep)  # (B,)
    score_at_last = torch.zeros_like(kl).scatter(1, last[:, None], scores[:, None].to(kl.dtype))
    rewards = zero_masked(score_at_last - kl_coef * kl, keep)
    return rewards, kl


def sequence_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """Undiscounted return of each sequence: the sum of its real tokens' rewards.

    rewards: (B, T); mask: (B, T) bool or 0/1 -> (B,).
    """
    _check_same_shape(rewards, mask=mask)
    return zero_masked(rewards, as_bool_mask(mask, rewards.shape)).sum(dim=1)


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """(B,) scores ordered group by group -> (B / group_size, group_size)."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(
            f"group_size {group_size} must be >= 1 and divide the number of scores "
            f"({scores.numel()})"
        )
    return scores.view(-1, group_size)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """Leave-one-out advantages: each score minus the mean of the other scores of its group.

    scores: (B,) ordered group by group (rows ``i * k .. i * k + k - 1`` share a prompt),
    group_size: k >= 2 -> (B,). Equals ``k / (k - 1) * (score - group mean)``.
    """
    if group_size < 2:
        raise ValueError(f"leave-one-out needs group_size >= 2, got {group_size}")
    groups = _groups(scores, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


def grpo_advantages(
    scores: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-normalised advantages: ``(score - group mean) / (group std + eps)``.

    scores: (B,) ordered group by group, group_size: k >= 2 -> (B,). The std is the unbiased
    sample std of the group (``k - 1`` in the denominator). ``scale_by_std=False`` returns
    ``score - group mean`` (Dr. GRPO).
    """
    if group_size < 2:
        raise ValueError(f"group normalisation needs group_size >= 2, got {group_size}")
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True, unbiased=True) + eps)
    return centred.reshape(-1)


def group_baseline_rewards_to_go(rewards: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """Rewards-to-go minus the mean return of the sequence's group: ``G_it - mean_{j in g(i)}
    R_j`` with ``G_it = sum_{t' >= t} r_it'`` and ``R_j = sum_t r_jt``.

    rewards: (B, T); mask: (B, T) bool or 0/1; rows ordered group by group (``i * k .. i * k + k
    - 1`` share a prompt), group_size: k >= 2 -> (B, T), 0 at masked positions. Undiscounted
    (REINFORCE++ takes gamma = 1).
    """
    if group_size < 2:
        raise ValueError(f"a group baseline needs group_size >= 2, got {group_size}")
    returns = rewards_to_go(rewards, mask, gamma=1.0)
    group_mean = _groups(sequence_returns(rewards, mask), group_size).mean(dim=1, keepdim=True)
    baseline = group_mean.expand(-1, group_size).reshape(-1)  # (B,)
    return zero_masked(returns - baseline[:, None], as_bool_mask(mask, returns.shape))


def broadcast_to_tokens(per_sequence: Tensor, mask: Tensor) -> Tensor:
    """One value per sequence copied to each of its real tokens: (B,), (B, T) -> (B, T)."""
    keep = as_bool_mask(mask, mask.shape)
    if per_sequence.shape != keep.shape[:1]:
        raise ValueError(
            f"per_sequence has shape {tuple(per_sequence.shape)}, expected ({keep.shape[0]},)"
        )
    return zero_masked(per_sequence[:, None].expand(keep.shape), keep)


# ---------------------------------------------------------------------------------- components
@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. B rollouts (k per prompt, group by group), T response tokens.

    rewards: (B, T) per-token rewards (score at the last real token, ``-beta * KL_t`` when the KL
    is in the reward); values: (B, T) ``V(s_t)`` or None without a value model; mask: (B, T)
    bool; group_size: k, the samples per prompt.
    """

    rewards: Tensor
    values: Tensor | None
    mask: Tensor
    group_size: int = 1


class AdvantageEstimator:
    """Base of the estimators: ``estimator(inputs) -> (advantages, returns)``, both (B, T) and 0
    on padding; ``returns`` are the value targets, None for estimators without a value model.

    ``needs_values``: the estimator reads ``inputs.values`` (a value model is required);
    ``min_group_size``: the smallest ``samples_per_prompt`` it works with.
    """

    needs_values = False
    min_group_size = 1

    def __call__(self, inputs: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


def _check_gamma(gamma: float) -> None:
    require(0 <= gamma <= 1, "gamma", f"must lie in [0, 1], got {gamma}")


@dataclass(frozen=True)
class SequenceReturn(AdvantageEstimator):
    """REINFORCE: the sequence return ``R = sum_t r_t`` at every token, no baseline."""

    def __call__(self, inputs):
        per_sequence = sequence_returns(inputs.rewards, inputs.mask)
        return broadcast_to_tokens(per_sequence, inputs.mask), None


@dataclass(frozen=True)
class RewardsToGo(AdvantageEstimator):
    """``G_t``, the discounted sum of the rewards from token t on."""

    gamma: float = 1.0

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)

    def __call__(self, inputs):
        return rewards_to_go(inputs.rewards, inputs.mask, self.gamma), None


@dataclass(frozen=True)
class RewardsToGoBaseline(AdvantageEstimator):
    """``G_t - V(s_t)``; the value model learns to predict ``G_t`` (its returns)."""

    gamma: float = 1.0
    needs_values = True

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)

    def __call__(self, inputs):
        returns = rewards_to_go(inputs.rewards, inputs.mask, self.gamma)
        keep = as_bool_mask(inputs.mask, returns.shape)
        return zero_masked(returns - inputs.values, keep), returns


@dataclass(frozen=True)
class GAE(AdvantageEstimator):
    """Generalized Advantage Estimation; returns = advantages + values."""

    gamma: float = 1.0
    lam: float = 0.95
    needs_values = True

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)
        require(0 <= self.lam <= 1, "lam", f"must lie in [0, 1], got {self.lam}")

    def __call__(self, inputs):
        return gae(inputs.rewards, inputs.values, inputs.mask, self.gamma, self.lam)


@dataclass(frozen=True)
class LeaveOneOut(AdvantageEstimator):
    """RLOO: the sequence return minus the mean return of the other samples of its prompt."""

    min_group_size = 2

    def __call__(self, inputs):
        per_sequence = sequence_returns(inputs.rewards, inputs.mask)
        advantages = rloo_advantages(per_sequence, inputs.group_size)
        return broadcast_to_tokens(advantages, inputs.mask), None


@dataclass(frozen=True)
class GroupNormalized(AdvantageEstimator):
    """GRPO: the sequence return normalised within its prompt's group (Dr. GRPO without std)."""

    scale_by_std: bool = True
    eps: float = 1e-6
    min_group_size = 2

    def __post_init__(self) -> None:
        require(self.eps >= 0, "eps", f"must be >= 0, got {self.eps}")

    def __call__(self, inputs):
        per_sequence = sequence_returns(inputs.rewards, inputs.mask)
        advantages = grpo_advantages(
            per_sequence, inputs.group_size, scale_by_std=self.scale_by_std, eps=self.eps
        )
        return broadcast_to_tokens(advantages, inputs.mask), None


@dataclass(frozen=True)
class RewardsToGoGroupBaseline(AdvantageEstimator):
    """REINFORCE++-baseline: ``G_t`` minus the mean return of the prompt's group (whitened over
    the batch by ``algorithm.whiten_advantages`` in its preset)."""

    min_group_size = 2

    def __call__(self, inputs):
        return group_baseline_rewards_to_go(inputs.rewards, inputs.mask, inputs.group_size), None
