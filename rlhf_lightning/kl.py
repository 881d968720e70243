"""Per-token KL estimators and the controllers that set the KL coefficient (pure torch).

Estimators of KL(pi || pi_ref) from one sampled token ``x ~ pi``, with ``d = log pi(x) - log
pi_ref(x)`` (J. Schulman, "Approximating KL Divergence", 2020 blog post):

- ``k1 = d``: unbiased, high variance, negative for individual tokens.
- ``abs = |d|``: never negative, biased.
- ``k2 = d**2 / 2``: never negative, biased (low bias when the policies are close).
- ``k3 = exp(-d) - 1 + d``: unbiased and never negative, low variance. Computed as
  ``expm1(-d) + d`` for precision when ``d`` is small.
- ``k3_plus``: the value of k3 with the gradient of k2 (verl's "k3+").

Each is a component (:class:`KLEstimator`: ``K1``, ``Abs``, ``K2``, ``K3``, ``K3Plus``), named
in the config by its name (``algorithm.kl.reward.estimator: k1``) or by a ``_target_`` of one's
own; each says where its gradient is biased (``reward_bias``, ``loss_bias``).

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

The penalty has two sites, each a :class:`KLTerm` (estimator, coefficient, clamp) or absent:
``algorithm.kl.reward`` (``-beta * k_t`` in each token's reward, classic RLHF) and
``algorithm.kl.loss`` (``beta * k_t`` added to the loss, GRPO); verl allows both at once, and so
does :class:`KLPenalty`. A term whose estimator is biased at its site runs only with
``algorithm.kl.allow_biased_gradient=true`` (for published recipes such as DeepSeekMath's k3 as
a loss). The exact numbers, on problems small enough to enumerate, are in
``experiments/estimator_audit/``.

The coefficient is fixed (0.05 in Huang et al. 2024, "The N+ implementation details of RLHF with
PPO") or adaptive (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"):
``error = clip(kl / target - 1, -0.2, 0.2)`` and ``coef *= 1 + error * n_steps / horizon``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from rlhf_lightning.errors import require


# ------------------------------------------------------------------------------- estimators
class KLEstimator:
    """Base of the per-token KL estimators: ``estimator(d)`` with ``d = log pi - log pi_ref``
    (any shape) -> the estimate, elementwise. ``reward_bias`` / ``loss_bias``: why its expected
    gradient is not that of the KL in the reward / as a loss, or None where it is."""

    name: ClassVar[str]
    reward_bias: ClassVar[str | None] = (
        "in the reward its expected gradient is the score function of its value alone, without "
        "its pathwise part, so not the gradient of KL(pi || pi_ref)"
    )
    loss_bias: ClassVar[str | None]

    def __call__(self, log_ratio: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class K1(KLEstimator):
    """``d``: unbiased, high variance; exact in the reward."""

    name = "k1"
    reward_bias = None
    loss_bias = "as a loss its gradient grad log pi has expectation 0"

    def __call__(self, log_ratio):
        return log_ratio


@dataclass(frozen=True)
class Abs(KLEstimator):
    """``|d|``: never negative, biased."""

    name = "abs"
    loss_bias = "as a loss its expected gradient is that of no KL"

    def __call__(self, log_ratio):
        return log_ratio.abs()


@dataclass(frozen=True)
class K2(KLEstimator):
    """``d^2 / 2``: never negative; as a loss, the gradient of each state's KL."""

    name = "k2"
    loss_bias = None

    def __call__(self, log_ratio):
        return 0.5 * log_ratio**2


@dataclass(frozen=True)
class K3(KLEstimator):
    """``exp(-d) - 1 + d`` (as ``expm1(-d) + d``): unbiased, never negative, low variance."""

    name = "k3"
    loss_bias = "as a loss its expected gradient is that of the reverse KL(pi_ref || pi)"

    def __call__(self, log_ratio):
        return torch.expm1(-log_ratio) + log_ratio


@dataclass(frozen=True)
class K3Plus(KLEstimator):
    """k3's value with k2's gradient (verl's "k3+")."""

    name = "k3_plus"
    loss_bias = None

    def __call__(self, log_ratio):
        k2 = 0.5 * log_ratio**2
        k3 = torch.expm1(-log_ratio) + log_ratio
        return k3.detach() + (k2 - k2.detach())


KL_ESTIMATORS: dict[str, type[KLEstimator]] = {c.name: c for c in (K1, Abs, K2, K3, K3Plus)}


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """The k1 estimate of KL(pi || pi_ref) per sequence: ``sum_t logp_t - ref_logp_t`` over the
    real tokens. logprobs, ref_logprobs: (B, T) of the tokens sampled from pi; mask: (B, T)
    bool or 0/1. Returns (B,); padded positions (which may hold anything) count 0."""
    keep = mask.bool()
    return torch.where(keep, logprobs - ref_logprobs, torch.zeros_like(logprobs)).sum(dim=1)


def kl_estimator(spec: str | KLEstimator) -> KLEstimator:
    """The estimator named ``spec`` (a key of ``KL_ESTIMATORS``), or ``spec`` itself."""
    if isinstance(spec, KLEstimator):
        return spec
    if spec not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {spec!r}; valid kinds are {tuple(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[spec]()


def biased_kl_gradient(kind: str | KLEstimator, placement: str) -> str | None:
    """Why estimator ``kind`` at ``placement`` (``reward`` or ``loss``) does not give the gradient
    of the KL it stands for, or None where it does (see the module docstring)."""
    estimator = kl_estimator(kind)
    return estimator.reward_bias if placement == "reward" else estimator.loss_bias


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str | KLEstimator, clamp: float | None = None
) -> Tensor:
    """Per-token KL estimate, elementwise.

    logprobs, ref_logprobs: same shape, e.g. (B, T), log-probabilities of the sampled tokens
    under the policy and the reference -> same shape. ``kind``: an estimator or its name.
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
    estimator = kl_estimator(kind)
    log_ratio = logprobs - ref_logprobs
    if clamp is None:
        return estimator(log_ratio)
    bound = max(20.0, clamp + 1.0)
    return estimator(log_ratio.clamp(-bound, bound)).clamp(-clamp, clamp)


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


# ---------------------------------------------------------------------------------- penalty
@dataclass
class KLTerm:
    """The KL penalty at one site: its estimator, its coefficient (the controller's current
    ``value``) and an optional clamp of each token's estimate."""

    estimator: KLEstimator
    controller: _KLController
    clamp: float | None = None

    @property
    def coef(self) -> float:
        """beta now."""
        return float(self.controller.value)

    def estimate(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        """Per-token estimate: (B, T), (B, T) -> (B, T) (see :func:`kl_penalty`)."""
        return kl_penalty(logprobs, ref_logprobs, self.estimator, self.clamp)


@dataclass
class KLPenalty:
    """The KL penalty against the frozen reference at its two sites, each a :class:`KLTerm` or
    None: ``reward`` (``-beta * k_t`` in every response token's reward) and ``loss`` (``beta *
    k_t`` aggregated into the loss). Built once from ``algorithm.kl``; its controllers' values
    are the run's state (checkpointed, updated after every iteration)."""

    reward: KLTerm | None = None
    loss: KLTerm | None = None
    allow_biased_gradient: bool = False

    def terms(self) -> dict[str, KLTerm]:
        return {site: term for site, term in (("reward", self.reward), ("loss", self.loss)) if term}

    def biased_gradients(self) -> dict[str, str]:
        """``{site: why}`` for every term whose estimator is biased at its site."""
        return {
            site: bias
            for site, term in self.terms().items()
            if (bias := biased_kl_gradient(term.estimator, site)) is not None
        }

    @property
    def reward_coef(self) -> float:
        """beta of the KL in the rewards (0 without that term)."""
        return self.reward.coef if self.reward else 0.0

    @property
    def loss_coef(self) -> float:
        """beta of the KL loss term (0 without that term)."""
        return self.loss.coef if self.loss else 0.0

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Every term's controller sees the measured KL (a fixed one ignores it)."""
        for term in self.terms().values():
            term.controller.update(current_kl, n_steps)

    def state_dict(self) -> dict[str, Any]:
        return {site: term.controller.state_dict() for site, term in self.terms().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        terms = self.terms()
        if set(state) != set(terms):
            raise KeyError(
                f"KL penalty state has the sites {sorted(state)}, this run {sorted(terms)}"
            )
        for site, term in terms.items():
            term.controller.load_state_dict(state[site])
