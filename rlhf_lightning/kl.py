"""Per-token KL estimators and the controllers that set the KL coefficient (pure torch).

Estimators of KL(pi || pi_ref) from one sampled token ``x ~ pi``, with ``d = log pi(x) - log
pi_ref(x)`` (J. Schulman, "Approximating KL Divergence", 2020 blog post):

- ``k1 = d``: unbiased, high variance, negative for individual tokens.
- ``abs = |d|``: never negative, biased.
- ``k2 = d**2 / 2``: never negative, biased (low bias when the policies are close).
- ``k3 = exp(-d) - 1 + d``: unbiased and never negative, low variance. Computed as
  ``expm1(-d) + d`` for precision when ``d`` is small.
- ``k3_plus``: the value of k3 with the gradient of k2 (verl's "k3+").

What each one is good for depends on where it goes (Tang & Munos 2025, "On a few pitfalls in KL
divergence gradient estimation for RL"; "A Comedy of Estimators", 2025), and the update of a
training step only sees the estimate's score-function gradient (in the reward) or its gradient
with the sample held fixed (as a loss):

- **In the reward** (``-coef * k_t`` in each token's reward, the policy gradient's return carries
  it): only ``k1`` gives the gradient of the sequence-level ``KL(pi || pi_ref)``, because the
  score-function gradient of ``E_pi[sum_t k1_t]`` equals that of the KL (the term
  ``E_pi[grad log pi]`` is 0). For the others the pathwise part of their gradient is missing:
  the expected update is the gradient of ``E_pi[sum_t k_t]`` with ``k`` held fixed, not of the KL.
- **As a loss** (``coef * k_t`` added to the loss on the policy's own samples): ``grad k2 = d *
  grad log pi(x)``, whose expectation at each state is the gradient of that state's
  ``KL(pi(.|s) || pi_ref(.|s))``. Summed over the tokens this is the gradient of the per-state
  KLs with the distribution of the states held fixed: exact for a one-token response, and
  missing the terms through which earlier tokens change the later states for longer ones (the
  sequence-level KL's gradient also carries each token's future KL). ``k3_plus`` has k2's
  gradient. ``grad k1 = grad log pi`` has expectation 0, ``grad k3 = (1 - pi_ref / pi) grad log
  pi`` that of ``KL(pi_ref || pi)``, the other direction, and ``abs`` neither.

:func:`biased_kl_gradient` names the pairs outside ``k1`` in the reward and ``k2`` / ``k3_plus``
as a loss; the config runs them only with ``algorithm.kl.allow_biased_gradient=true`` (for
published recipes such as DeepSeekMath's k3 as a loss). The exact numbers, on problems small
enough to enumerate, are in ``experiments/estimator_audit/``.

The coefficient is fixed (0.05 in Huang et al. 2024, "The N+ implementation details of RLHF with
PPO") or adaptive (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"):
``error = clip(kl / target - 1, -0.2, 0.2)`` and ``coef *= 1 + error * n_steps / horizon``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlhf_lightning.errors import require

KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k3_plus")
# Estimators whose gradient, as a loss on the policy's own samples, is that of each state's
# KL(pi(.|s) || pi_ref(.|s)).
KL_LOSS_ESTIMATORS = ("k2", "k3_plus")
# Estimators whose score-function gradient, in the reward, is that of KL(pi || pi_ref).
KL_REWARD_ESTIMATORS = ("k1",)


def biased_kl_gradient(kind: str, placement: str) -> str | None:
    """Why estimator ``kind`` at ``placement`` (``reward`` or ``loss``) does not give the gradient
    of the KL it stands for, or None where it does (see the module docstring)."""
    if placement == "reward" and kind not in KL_REWARD_ESTIMATORS:
        return (
            "in the reward its expected gradient is the score function of its value alone, "
            "without its pathwise part, so not the gradient of KL(pi || pi_ref)"
        )
    if placement == "loss" and kind not in KL_LOSS_ESTIMATORS:
        reasons = {
            "k1": "its gradient grad log pi has expectation 0",
            "k3": "its expected gradient is that of the reverse KL(pi_ref || pi)",
            "abs": "its expected gradient is that of no KL",
        }
        return f"as a loss {reasons.get(kind, 'its expected gradient is not that of the KL')}"
    return None


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str, clamp: float | None = None
) -> Tensor:
    """Per-token KL estimate, elementwise.

    logprobs, ref_logprobs: same shape, e.g. (B, T), log-probabilities of the sampled tokens
    under the policy and the reference -> same shape. ``kind`` is one of ``KL_ESTIMATORS``.
    ``clamp``: the estimate is clamped to ``[-clamp, clamp]`` (None: not clamped); the log-ratio
    is first bounded to ``max(20, clamp + 1)`` in magnitude, beyond which every estimator's
    value is already past the clamp, so that ``exp`` cannot overflow and the clamped estimate
    has a 0 gradient there instead of ``0 * inf = nan``.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs "
            f"{tuple(ref_logprobs.shape)} must have the same shape"
        )
    log_ratio = logprobs - ref_logprobs
    if clamp is None:
        return _kl_estimate(log_ratio, kind)
    bound = max(20.0, clamp + 1.0)
    return _kl_estimate(log_ratio.clamp(-bound, bound), kind).clamp(-clamp, clamp)


def _kl_estimate(log_ratio: Tensor, kind: str) -> Tensor:
    """The estimator ``kind`` of ``d = log pi - log pi_ref``, elementwise."""
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "k3_plus":
        k2 = 0.5 * log_ratio**2
        k3 = torch.expm1(-log_ratio) + log_ratio
        return k3.detach() + (k2 - k2.detach())
    raise ValueError(f"unknown KL estimator {kind!r}; valid kinds are {KL_ESTIMATORS}")


class _KLController:
    """Holds the current coefficient ``value``; subclasses define ``update``."""

    value: float

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "value" not in state:
            raise KeyError(f"KL controller state needs a 'value' entry, got keys {list(state)}")
        self.value = float(state["value"])


class FixedKLController(_KLController):
    """A coefficient that never changes; ``update`` does nothing."""

    def __init__(self, coef: float) -> None:
        require(coef >= 0, "coef", f"must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op, so that callers treat both controllers alike."""


class AdaptiveKLController(_KLController):
    """Moves the coefficient so that the measured KL approaches ``target`` (Ziegler et al. 2019).

    Each ``update`` multiplies the value by ``1 + clip(kl / target - 1, -0.2, 0.2) * n_steps /
    horizon``: up when the KL is above target, down when below, and by a bounded step however far
    off the KL is. ``n_steps`` is the number of samples (or steps) since the last update.
    """

    def __init__(self, coef: float, target: float, horizon: float) -> None:
        require(coef >= 0, "coef", f"must be >= 0, got {coef}")
        require(target > 0, "target", f"must be > 0, got {target}")
        require(horizon > 0, "horizon", f"must be > 0, got {horizon}")
        self.value = float(coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        kl = float(current_kl)
        if not math.isfinite(kl):
            raise ValueError(f"current_kl must be finite, got {kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        factor = 1.0 + error * n_steps / self.horizon
        if factor <= 0:
            raise ValueError(
                f"n_steps={n_steps} is too large for horizon={self.horizon}: the update factor "
                f"{factor} would make the coefficient non-positive"
            )
        self.value *= factor
