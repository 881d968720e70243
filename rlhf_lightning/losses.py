"""Policy and value losses, their aggregation over a minibatch, the Bradley-Terry reward-model
loss and explained variance.

Policy losses are per token (``(B, T)``, 0 on padding) so that the aggregation, a separate choice,
can weight them; each returns a :class:`PolicyLossOutput`: the loss with its per-token
diagnostics (``log_ratio``, ``ratio``, ``clipped``: 1 where the gradient is cut, for CISPO where
the weight is clipped). With ``ratio = exp(logp - logp_old)``:

- :class:`VanillaPolicyGradient`: ``-A_t * ratio_t``, no clipping. At ``logp = logp_old`` its
  gradient is the score-function (REINFORCE) estimator ``-A_t * grad logp_t``; once the policy
  has moved (the second minibatch or epoch of a rollout batch) the ratio reweights each token for
  its changed probability, which is exact for a one-token horizon. Over longer responses the
  per-token ratio leaves out the change in the distribution of the states (the prefixes);
- :class:`SequenceRatioPolicyGradient`: ``-A_t * grad logp_t`` weighted by the whole sequence's
  importance ratio ``prod_t ratio_t`` (a constant of the gradient), which corrects the states too:
  the expected update on stale samples is the on-policy one, at the price of a variance that
  grows with the response length.
- :class:`ClippedSurrogate` (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"):
  ``max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))``; asymmetric bounds as
  in DAPO (Yu et al. 2025, "clip-higher"); with ``dual_clip = c > 1`` the loss of a negative
  advantage is capped at ``-c * A_t`` (Ye et al. 2020, "Mastering Complex Control in MOBA Games").
- :class:`GSPO` (Zheng et al. 2025, "Group Sequence Policy Optimization"): the clipped surrogate
  with the sequence's importance ratio ``s_i = exp(mean_t (logp_t - logp_old_t))``, the geometric
  mean of its token ratios over its real tokens, in place of each token's, so that a sequence is
  clipped as a whole. In GSPO's token-level form ``s_it = sg(s_i) * pi_t / sg(pi_t)`` (value
  ``s_i``, gradient ``s_i * grad logp_t``): with the sequence-mean token-mean aggregation the
  gradient is that of the paper's sequence objective ``max(-A_i s_i, -A_i clip(s_i))``, and
  token-level advantages stay possible.
- :class:`CISPO` (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
  Attention"): ``-sg(clip(ratio_t, 1 - clip_low, 1 + clip_high)) * A_t * logp_t``: the clipped
  importance weight is a constant coefficient of the plain policy gradient, so clipping bounds a
  token's weight but never drops its gradient (PPO's clip zeroes it).

Clipped value loss around the rollout-time values (OpenAI Baselines' PPO2, kept by the RLHF
reproductions of Huang et al. 2024)::

    0.5 * max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2)

Aggregation (``algorithm.loss_aggregation``) turns per-token losses into one number for a
minibatch: ``sum_{i,t} w_it * l_it / D`` with token weights ``w`` and a denominator ``D`` counted
over the **whole minibatch on all ranks**, so gradient accumulation over micro-batches and data
parallelism give the same update as one big batch:

- :class:`TokenMean`: ``w = 1``, ``D`` = real tokens (every token counts the same);
- :class:`SequenceMeanTokenMean`: ``w = 1 / |y_i|``, ``D`` = sequences (each sequence counts the
  same; GRPO's original form);
- :class:`SequenceMeanTokenSum`: ``w = 1 / C`` for a constant ``C``, ``D`` = sequences (Dr. GRPO:
  no length normalisation, so long wrong answers are not favoured).

Sampler corrections weight the per-token policy loss by ``pi_old / pi_sampler`` where the
distribution sampled from differs from the trained one: per token (:class:`TruncatedIS`,
:class:`MaskedIS`) or per sequence, with the product of the sequence's token ratios
(:class:`SequenceTruncatedIS`, :class:`SequenceMaskedIS`, the latter also on their geometric
mean).

Bradley-Terry preference loss for reward models (Ouyang et al. 2022, "Training language models
to follow instructions with human feedback"): ``-log sigmoid(r_chosen - r_rejected - margin)``.

Padded positions may hold NaN or inf: they are zeroed with ``torch.where`` before any arithmetic,
so they reach neither a loss nor its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_lightning.errors import require
from rlhf_lightning.ops import as_bool_mask, masked_var, zero_masked


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


def _policy_inputs(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A policy loss's checked inputs: (keep, logprobs, advantages, log_ratio = logprobs -
    old_logprobs), each (B, T), 0 on padding; the old logprobs carry no gradient."""
    keep, logprobs, old_logprobs, advantages = _masked_inputs(
        mask, logprobs=logprobs, old_logprobs=old_logprobs.detach(), advantages=advantages
    )
    return keep, logprobs, advantages, zero_masked(logprobs - old_logprobs, keep)


@dataclass(frozen=True)
class PolicyLossOutput:
    """A policy loss per token and its diagnostics: B rollouts, T response tokens; every field
    is (B, T) and 0 on padding, the diagnostics detached."""

    loss: Tensor  # the per-token loss, with grad
    log_ratio: Tensor  # log pi - log pi_old
    ratio: Tensor  # pi / pi_old
    clipped: Tensor  # float, 1 on the tokens whose gradient the loss cuts


def _output(loss: Tensor, log_ratio: Tensor, clipped: Tensor, keep: Tensor) -> PolicyLossOutput:
    """The loss (zeroed on padding) with its detached diagnostics."""
    with torch.no_grad():
        log_ratio = zero_masked(log_ratio.detach(), keep)
        ratio = zero_masked(torch.exp(log_ratio), keep)
        clipped = zero_masked(clipped.float(), keep)
    return PolicyLossOutput(zero_masked(loss, keep), log_ratio, ratio, clipped)


def vanilla_policy_gradient_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> PolicyLossOutput:
    """Per-token ``-A_t * exp(logp_t - logp_old_t)``: (B, T) each -> PolicyLossOutput.

    logprobs: current policy, with grad; old_logprobs: at rollout time (no grad); advantages:
    (B, T), no grad; mask: (B, T) bool or 0/1. The gradient is ``-A_t * ratio_t * grad logp_t``:
    the plain ``-A_t * grad logp_t`` while the policy has not moved.
    """
    keep, logprobs, advantages, log_ratio = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    return _output(-advantages * torch.exp(log_ratio), log_ratio, torch.zeros_like(keep), keep)


def sequence_ratio_policy_gradient_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> PolicyLossOutput:
    """Per-token ``-A_t * rho * exp(logp_t - sg(logp_t))`` with the sequence's importance ratio
    ``rho = exp(sum_t (logp_t - logp_old_t))`` held constant: (B, T) each -> PolicyLossOutput.

    The value is ``-A_t * rho`` and the gradient ``-A_t * rho * grad logp_t``: for samples of
    ``pi_old``, ``E[rho * f(y)] = E_pi[f(y)]``, so the expected update equals the on-policy one
    at the current policy, for any horizon. ``ratio`` in the diagnostics is the per-token one.
    """
    keep, logprobs, advantages, log_ratio = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    rho = torch.exp(log_ratio.sum(dim=1, keepdim=True)).detach()  # (B, 1)
    score = torch.exp(logprobs - logprobs.detach())  # 1, with the gradient of logp
    return _output(-advantages * rho * score, log_ratio, torch.zeros_like(keep), keep)


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> PolicyLossOutput:
    """Per-token PPO clipped surrogate: (B, T) each -> PolicyLossOutput.

    ``clipped`` marks the tokens whose gradient is cut: the clipped term is the larger one, or
    the dual clip caps a negative advantage's loss.
    """
    if not (clip_low > 0 and clip_high > 0):
        raise ValueError(f"clip_low and clip_high must be > 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    keep, logprobs, advantages, log_ratio = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    cut = clipped > unclipped
    if dual_clip is not None:
        cap = -dual_clip * advantages
        capped = (advantages < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        cut = cut | capped
    return _output(loss, log_ratio, cut, keep)


def _check_clip_bounds(clip_low: float, clip_high: float, max_low: float | None = None) -> None:
    if not (clip_low > 0 and clip_high > 0) or (max_low is not None and clip_low > max_low):
        upper = "" if max_low is None else f" (clip_low <= {max_low})"
        raise ValueError(f"clip_low and clip_high must be > 0{upper}, got {clip_low}, {clip_high}")


def gspo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyLossOutput:
    """Per-token GSPO loss: (B, T) each -> PolicyLossOutput.

    ``s_i = exp(sum_t (logp_t - logp_old_t) / |y_i|)`` over row i's real tokens (an empty row
    has ``s_i = 1``); each token's loss is ``max(-A_t * s_it, -A_t * clip(s_it, 1 - clip_low,
    1 + clip_high))`` with ``s_it = sg(s_i) * exp(logp_t - sg(logp_t))``: the value is ``s_i``'s,
    the gradient ``s_i * grad logp_t`` where unclipped and 0 where clipped. With one advantage
    per sequence the clip decision is the sequence's. ``clipped`` marks the tokens whose
    gradient is cut; ``log_ratio`` and ``ratio`` in the diagnostics are the per-token ones.
    """
    _check_clip_bounds(clip_low, clip_high)
    keep, logprobs, advantages, log_ratio = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    lengths = keep.sum(dim=1, keepdim=True).clamp(min=1)
    sequence_log_ratio = (log_ratio.sum(dim=1, keepdim=True) / lengths).detach()  # (B, 1)
    ratio = torch.exp(sequence_log_ratio + logprobs - logprobs.detach())  # value s_i
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    return _output(loss, log_ratio, clipped > unclipped, keep)


def cispo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyLossOutput:
    """Per-token CISPO loss ``-sg(w_t) * A_t * logp_t`` with ``w_t = clip(ratio_t, 1 - clip_low,
    1 + clip_high)``: (B, T) each -> PolicyLossOutput.

    The gradient is ``-w_t * A_t * grad logp_t`` at every real token: the plain policy gradient
    at ratio 1, each token weighted by its clipped ratio once the policy has moved. ``clipped``
    marks the tokens whose *weight* was clipped (their gradient is kept, scaled by the bound).
    ``clip_low = 1`` puts the lower bound at 0: no lower bound.
    """
    _check_clip_bounds(clip_low, clip_high, max_low=1.0)
    keep, logprobs, advantages, log_ratio = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    ratio = torch.exp(log_ratio.detach())
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = -weight * advantages * logprobs
    return _output(loss, log_ratio, weight != ratio, keep)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None
) -> tuple[Tensor, Tensor]:
    """Per-token squared-error value loss, optionally clipped around the rollout-time values.

    values: (B, T) current, with grad; old_values: (B, T) at rollout time; returns: (B, T)
    targets; mask: (B, T) bool or 0/1; clip_eps: > 0, or None for the plain
    ``0.5 * (V - R)^2``. -> ((B, T) loss, (B, T) float ``clipped``: 1 where the clipped error is
    the larger one), both 0 on padding.
    """
    if clip_eps is not None and not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    keep, values, old_values, returns = _masked_inputs(
        mask, values=values, old_values=old_values, returns=returns
    )
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return zero_masked(0.5 * unclipped, keep), torch.zeros_like(values).detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped, clipped)
    return zero_masked(loss, keep), zero_masked((clipped > unclipped).float(), keep).detach()


# ---------------------------------------------------------------------------------- components
class PolicyLoss:
    """Base of the policy losses: ``loss(logprobs, old_logprobs, advantages, mask)`` ->
    :class:`PolicyLossOutput` (logprobs with grad; the others (B, T) without; mask bool or
    0/1)."""

    def __call__(self, logprobs, old_logprobs, advantages, mask) -> PolicyLossOutput:
        raise NotImplementedError


@dataclass(frozen=True)
class VanillaPolicyGradient(PolicyLoss):
    """``-A_t * ratio_t`` (no clipping): the plain policy gradient, importance-weighted per token
    once the policy has moved."""

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        return vanilla_policy_gradient_loss(logprobs, old_logprobs, advantages, mask)


@dataclass(frozen=True)
class SequenceRatioPolicyGradient(PolicyLoss):
    """The plain policy gradient weighted by each sequence's importance ratio ``prod_t
    ratio_t`` (no clipping, no truncation): unbiased on stale samples at any horizon."""

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        return sequence_ratio_policy_gradient_loss(logprobs, old_logprobs, advantages, mask)


@dataclass(frozen=True)
class ClippedSurrogate(PolicyLoss):
    """PPO's clipped surrogate with bounds ``[1 - clip_low, 1 + clip_high]`` and an optional
    dual clip."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None

    def __post_init__(self) -> None:
        require(self.clip_low > 0, "clip_low", f"must be > 0, got {self.clip_low}")
        require(self.clip_high > 0, "clip_high", f"must be > 0, got {self.clip_high}")
        if self.dual_clip is not None:
            require(self.dual_clip > 1, "dual_clip", f"must be > 1 (or null), got {self.dual_clip}")

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        return clipped_policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            self.clip_low,
            self.clip_high,
            self.dual_clip,
        )


@dataclass(frozen=True)
class GSPO(PolicyLoss):
    """GSPO's clipped surrogate on the sequence's geometric-mean importance ratio, bounds
    ``[1 - clip_low, 1 + clip_high]`` (the paper's: 3e-4 and 4e-4)."""

    clip_low: float = 3e-4
    clip_high: float = 4e-4

    def __post_init__(self) -> None:
        require(self.clip_low > 0, "clip_low", f"must be > 0, got {self.clip_low}")
        require(self.clip_high > 0, "clip_high", f"must be > 0, got {self.clip_high}")

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        return gspo_policy_loss(
            logprobs, old_logprobs, advantages, mask, self.clip_low, self.clip_high
        )


@dataclass(frozen=True)
class CISPO(PolicyLoss):
    """CISPO: the policy gradient with each token's ratio, clipped to ``[1 - clip_low, 1 +
    clip_high]``, as a constant weight (``clip_low = 1``: no lower bound, as in MiniMax-M1)."""

    clip_low: float = 1.0
    clip_high: float = 0.28

    def __post_init__(self) -> None:
        require(0 < self.clip_low <= 1, "clip_low", f"must be in (0, 1], got {self.clip_low}")
        require(self.clip_high > 0, "clip_high", f"must be > 0, got {self.clip_high}")

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        return cispo_policy_loss(
            logprobs, old_logprobs, advantages, mask, self.clip_low, self.clip_high
        )


class LossAggregation:
    """Base of the aggregations: ``token_weights(mask)`` (B, T) and ``units(mask)`` (0-dim, the
    local count whose all-rank sum over a minibatch is the denominator)."""

    def token_weights(self, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def units(self, mask: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class TokenMean(LossAggregation):
    """Every real token of the minibatch weighs the same."""

    def token_weights(self, mask):
        return as_bool_mask(mask, mask.shape).float()

    def units(self, mask):
        return as_bool_mask(mask, mask.shape).sum().float()


@dataclass(frozen=True)
class SequenceMeanTokenMean(LossAggregation):
    """Token mean within each sequence, then the mean over the minibatch's sequences."""

    def token_weights(self, mask):
        keep = as_bool_mask(mask, mask.shape).float()
        return keep / keep.sum(dim=1, keepdim=True).clamp(min=1)

    def units(self, mask):
        return as_bool_mask(mask, mask.shape).any(dim=1).sum().float()


@dataclass(frozen=True)
class SequenceMeanTokenSum(LossAggregation):
    """Token sum within each sequence divided by a constant ``normalizer`` (e.g. the maximum
    response length), then the mean over the minibatch's sequences."""

    normalizer: float = 1.0

    def __post_init__(self) -> None:
        require(self.normalizer > 0, "normalizer", f"must be > 0, got {self.normalizer}")

    def token_weights(self, mask):
        return as_bool_mask(mask, mask.shape).float() / self.normalizer

    def units(self, mask):
        return as_bool_mask(mask, mask.shape).any(dim=1).sum().float()


class SamplerCorrection:
    """Base of the corrections for a sampling distribution that differs from the trained one:
    ``correction(old_logprobs, sampler_logprobs, mask)`` -> ((B, T) per-token weights of the
    policy loss, detached, 0 on padding; (B, T) bool: tokens whose weight was cut)."""

    def __call__(self, old_logprobs, sampler_logprobs, mask):
        raise NotImplementedError


def _importance_ratio(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor):
    keep, old_logprobs, sampler_logprobs = _masked_inputs(
        mask, old_logprobs=old_logprobs, sampler_logprobs=sampler_logprobs
    )
    return keep, torch.exp(old_logprobs - sampler_logprobs).detach()


@dataclass(frozen=True)
class TruncatedIS(SamplerCorrection):
    """Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly
    Brings You Off-Policy RL Training"): weight each token's policy loss by
    ``min(pi_old / pi_sampler, cap)``."""

    cap: float = 2.0

    def __post_init__(self) -> None:
        require(self.cap > 0, "cap", f"must be > 0, got {self.cap}")

    def __call__(self, old_logprobs, sampler_logprobs, mask):
        keep, ratio = _importance_ratio(old_logprobs, sampler_logprobs, mask)
        return zero_masked(ratio.clamp(max=self.cap), keep), keep & (ratio > self.cap)


@dataclass(frozen=True)
class MaskedIS(SamplerCorrection):
    """Drop the tokens whose ``pi_old / pi_sampler`` lies outside ``[low, high]`` (weight 0);
    the others keep weight 1."""

    low: float = 0.5
    high: float = 2.0

    def __post_init__(self) -> None:
        require(0 <= self.low < 1, "low", f"must be in [0, 1), got {self.low}")
        require(self.high > 1, "high", f"must be > 1, got {self.high}")

    def __call__(self, old_logprobs, sampler_logprobs, mask):
        keep, ratio = _importance_ratio(old_logprobs, sampler_logprobs, mask)
        cut = keep & ((ratio < self.low) | (ratio > self.high))
        return (keep & ~cut).float(), cut


def sequence_log_ratio(
    old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, geometric: bool = False
) -> tuple[Tensor, Tensor]:
    """Each sequence's ``log prod_t pi_old / pi_sampler`` over its real tokens, or with
    ``geometric`` its mean over them (the log of the geometric mean; 0 for an empty row).

    (B, T) each -> (keep: (B, T) bool, (B,) detached).
    """
    keep, old_logprobs, sampler_logprobs = _masked_inputs(
        mask, old_logprobs=old_logprobs, sampler_logprobs=sampler_logprobs
    )
    total = (old_logprobs - sampler_logprobs).detach().sum(dim=1)
    if geometric:
        total = total / keep.sum(dim=1).clamp(min=1)
    return keep, total


@dataclass(frozen=True)
class SequenceTruncatedIS(SamplerCorrection):
    """Sequence-level truncated importance sampling: every token of a sequence weighted by
    ``min(prod_t pi_old / pi_sampler, cap)``, the sequence's own ratio (unbiased for the
    sequence's distribution below the cap, at a variance that grows with its length)."""

    cap: float = 2.0

    def __post_init__(self) -> None:
        require(self.cap > 0, "cap", f"must be > 0, got {self.cap}")

    def __call__(self, old_logprobs, sampler_logprobs, mask):
        keep, log_rho = sequence_log_ratio(old_logprobs, sampler_logprobs, mask)
        rho = torch.exp(log_rho)[:, None].expand(keep.shape)
        return zero_masked(rho.clamp(max=self.cap), keep), keep & (rho > self.cap)


@dataclass(frozen=True)
class SequenceMaskedIS(SamplerCorrection):
    """Drop the whole sequences whose ``prod_t pi_old / pi_sampler`` (or with ``geometric``, its
    geometric mean over the real tokens) lies outside ``[low, high]`` (weight 0); the others
    keep weight 1 on every token."""

    low: float = 0.5
    high: float = 2.0
    geometric: bool = False

    def __post_init__(self) -> None:
        require(0 <= self.low < 1, "low", f"must be in [0, 1), got {self.low}")
        require(self.high > 1, "high", f"must be > 1, got {self.high}")

    def __call__(self, old_logprobs, sampler_logprobs, mask):
        keep, log_rho = sequence_log_ratio(old_logprobs, sampler_logprobs, mask, self.geometric)
        rho = torch.exp(log_rho)[:, None].expand(keep.shape)
        cut = keep & ((rho < self.low) | (rho > self.high))
        return (keep & ~cut).float(), cut


def aggregate(per_token: Tensor, weights: Tensor, denominator: Tensor | float) -> Tensor:
    """``sum(weights * per_token) / denominator``: (B, T), (B, T), scalar -> 0-dim.

    ``weights`` are 0 on padding (an aggregation's ``token_weights``); ``per_token`` must be 0
    (not NaN) there, as the losses above return it.
    """
    return (per_token * weights).sum() / denominator


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
