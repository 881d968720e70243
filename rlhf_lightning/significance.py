"""Intervals and tests for comparing groups of runs (``rlhf-compare``).

Two units of replication:

- **over seeds**: one number per run (its final metric). A group's interval is Student's t
  interval of the mean, ``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` (s: sample std); two groups
  are compared by Welch's t-test (unequal variances, Welch-Satterthwaite degrees of freedom).
- **over seeds x prompts**: one score per (run, held-out prompt), every run scored on the same
  prompts. The prompts are a sample too, and they are shared: each bootstrap resample draws the
  seeds and the prompts with replacement, independently (the crossed-design bootstrap), and
  takes the mean of the drawn cells; the interval is the percentile interval of those means.
  Two groups are compared on the bootstrap distribution of the difference of their means, the
  prompts drawn once for both groups (paired by prompt), the seeds for each group on its own;
  the two-sided p-value is ``min(1, 2 * min(P(d <= 0), P(d >= 0)))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # nan when there is no interval (one value)
    high: float
    n: int  # values behind the mean (seeds, or seeds x prompts)


@dataclass(frozen=True)
class Difference:
    """Group a minus group b: the difference of the means, its interval (nan where there is
    none), the p-value of "no difference" and the test's name."""

    diff: float
    low: float
    high: float
    p: float
    test: str


# ----------------------------------------------------------------------------- Student's t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            last = d * c
        if abs(last - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on `t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


# ----------------------------------------------------------------------------- over seeds


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan
    return mean, var


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student's t interval of the mean of ``values`` (one per seed); nan bounds for one value."""
    if not values:
        raise ValueError("t_interval needs at least one value")
    _check_confidence(confidence)
    n = len(values)
    mean, var = _mean_var(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * math.sqrt(var / n)
    return Interval(mean, mean - half, mean + half, n)


def welch_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Difference:
    """Welch's t-test of equal means, and the interval of ``mean(a) - mean(b)`` at
    ``confidence``. Needs two values per group (else nan p and bounds). Equal constant groups
    give p = 1; different constant groups p = 0 (the difference has no noise)."""
    _check_confidence(confidence)
    mean_a, var_a = _mean_var(a)
    mean_b, var_b = _mean_var(b)
    diff = mean_a - mean_b
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, math.nan, math.nan, math.nan, "Welch t over seeds")
    se2_a, se2_b = var_a / len(a), var_b / len(b)
    se = math.sqrt(se2_a + se2_b)
    if se == 0.0:
        return Difference(diff, diff, diff, 1.0 if diff == 0 else 0.0, "Welch t over seeds")
    df = (se2_a + se2_b) ** 2 / (se2_a**2 / (len(a) - 1) + se2_b**2 / (len(b) - 1))
    t = diff / se
    p = min(1.0, 2.0 * (1.0 - t_cdf(abs(t), df)))
    half = t_quantile((1.0 + confidence) / 2.0, df) * se
    return Difference(diff, diff - half, diff + half, p, "Welch t over seeds")


# ----------------------------------------------------------------------------- seeds x prompts


def _resampled_means(
    scores: torch.Tensor, prompt_index: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Mean of each resample: scores (S, P); prompt_index (B, P) -> (B,), seeds drawn here."""
    num_seeds = scores.shape[0]
    seed_index = torch.randint(0, num_seeds, (len(prompt_index), num_seeds), generator=generator)
    rows = scores[seed_index]  # (B, S, P)
    cells = torch.gather(rows, 2, prompt_index[:, None, :].expand(-1, num_seeds, -1))
    return cells.mean(dim=(1, 2))


def _as_matrix(scores) -> torch.Tensor:
    matrix = torch.as_tensor(scores, dtype=torch.float64)
    if matrix.dim() != 2 or matrix.numel() == 0:
        raise ValueError(f"expected scores of shape (seeds, prompts), got {tuple(matrix.shape)}")
    return matrix


def crossed_bootstrap_interval(
    scores, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0
) -> Interval:
    """Mean of (S, P) ``scores`` (a row per seed, a column per prompt) and the percentile
    interval of the means of ``num_resamples`` crossed resamples (seeds and prompts drawn with
    replacement). Seeded: the global RNG is untouched."""
    _check_confidence(confidence)
    matrix = _as_matrix(scores)
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(
        0, matrix.shape[1], (num_resamples, matrix.shape[1]), generator=generator
    )
    means = _resampled_means(matrix, prompts, generator)
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return Interval(matrix.mean().item(), low.item(), high.item(), matrix.numel())


def crossed_bootstrap_difference(
    scores_a, scores_b, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0
) -> Difference:
    """``mean(a) - mean(b)`` of (Sa, P) and (Sb, P) scores on the same P prompts (same column
    order): its percentile interval and two-sided bootstrap p-value (module doc)."""
    _check_confidence(confidence)
    a, b = _as_matrix(scores_a), _as_matrix(scores_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"groups scored on {a.shape[1]} and {b.shape[1]} prompts")
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, a.shape[1], (num_resamples, a.shape[1]), generator=generator)
    diffs = _resampled_means(a, prompts, generator) - _resampled_means(b, prompts, generator)
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(diffs, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    below, above = (diffs <= 0).double().mean().item(), (diffs >= 0).double().mean().item()
    p = min(1.0, 2.0 * min(below, above))
    diff = (a.mean() - b.mean()).item()
    return Difference(diff, low.item(), high.item(), p, "bootstrap over seeds x prompts")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
