"""Tests for rlhf_lightning.advantages: rewards-to-go, GAE and per-token rewards."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_lightning.advantages import gae, rewards_to_go, token_rewards
from rlhf_lightning.kl import kl_penalty

# ----------------------------------------------------------------------------- references


def reference_rewards_to_go(rewards: list[float], gamma: float) -> list[float]:
    """G_t = sum_k gamma^k r_{t+k}, summed term by term for one unpadded row."""
    n = len(rewards)
    return [sum(gamma ** (k - t) * rewards[k] for k in range(t, n)) for t in range(n)]


def reference_gae(
    rewards: list[float], values: list[float], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """A_t = sum_k (gamma lam)^k delta_{t+k}, with V = 0 after the last token; one unpadded row."""
    n = len(rewards)
    next_value = [values[t + 1] if t + 1 < n else 0.0 for t in range(n)]
    deltas = [rewards[t] + gamma * next_value[t] - values[t] for t in range(n)]
    advantages = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
    return advantages, [a + v for a, v in zip(advantages, values)]


@st.composite
def padded_batches(draw, min_length=0):
    """Random right-padded (rewards, values, mask, lengths) in float64, padding filled with NaN."""
    batch = draw(st.integers(1, 4))
    time = draw(st.integers(1, 7))
    lengths = draw(st.lists(st.integers(min_length, time), min_size=batch, max_size=batch))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rewards = torch.randn(batch, time, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, time, generator=gen, dtype=torch.float64)
    mask = torch.arange(time) < torch.tensor(lengths)[:, None]
    rewards = rewards.masked_fill(~mask, math.nan)
    values = values.masked_fill(~mask, math.inf)
    return rewards, values, mask, lengths


unit_interval = st.floats(0.0, 1.0)


def rows(x: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [x[b, :length].tolist() for b, length in enumerate(lengths)]


# ----------------------------------------------------------------------------- rewards_to_go


def test_rewards_to_go_hand_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, math.nan, math.nan]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    expected = torch.tensor([[1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0], [4.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards_to_go(rewards, mask, gamma=0.5), expected)


@settings(max_examples=50, deadline=None)
@given(padded_batches(), unit_interval)
def test_rewards_to_go_matches_the_reference(batch, gamma):
    rewards, _, mask, lengths = batch
    out = rewards_to_go(rewards, mask, gamma)
    assert (out[~mask] == 0).all()
    for b, row_rewards in enumerate(rows(rewards, lengths)):
        expected = reference_rewards_to_go(row_rewards, gamma)
        torch.testing.assert_close(out[b, : lengths[b]].tolist(), expected)


# ----------------------------------------------------------------------------- gae


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 1.0, math.nan]])
    values = torch.tensor([[0.5, 0.2, math.nan]])
    mask = torch.tensor([[True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # delta_1 = 1 + 0 - 0.2 = 0.8, delta_0 = 0 + 0.2 - 0.5 = -0.3, A_0 = -0.3 + 0.9 * 0.8 = 0.42
    torch.testing.assert_close(advantages, torch.tensor([[0.42, 0.8, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.92, 1.0, 0.0]]))


@settings(max_examples=50, deadline=None)
@given(padded_batches(), unit_interval, unit_interval)
def test_gae_matches_the_reference(batch, gamma, lam):
    rewards, values, mask, lengths = batch
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()
    for b, row in enumerate(zip(rows(rewards, lengths), rows(values, lengths))):
        expected_adv, expected_ret = reference_gae(*row, gamma, lam)
        torch.testing.assert_close(advantages[b, : lengths[b]].tolist(), expected_adv)
        torch.testing.assert_close(returns[b, : lengths[b]].tolist(), expected_ret)


@settings(max_examples=50, deadline=None)
@given(padded_batches(), unit_interval)
def test_gae_with_lambda_one_is_discounted_return_minus_value(batch, gamma):
    rewards, values, mask, _ = batch
    advantages, returns = gae(rewards, values, mask, gamma, lam=1.0)
    expected = rewards_to_go(rewards, mask, gamma) - values.masked_fill(~mask, 0)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, rewards_to_go(rewards, mask, gamma))


@settings(max_examples=50, deadline=None)
@given(padded_batches(), unit_interval)
def test_gae_with_lambda_zero_is_the_td_error(batch, gamma):
    rewards, values, mask, _ = batch
    advantages, _ = gae(rewards, values, mask, gamma, lam=0.0)
    clean_values = values.masked_fill(~mask, 0)  # also V = 0 after the last real token
    next_values = torch.cat([clean_values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    td_error = rewards.masked_fill(~mask, 0) + gamma * next_values - clean_values
    torch.testing.assert_close(advantages, td_error.masked_fill(~mask, 0))


def test_padding_contents_do_not_matter():
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(2, 2, 5, generator=gen)  # two (2, 5) tensors
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    dirty_rewards = rewards.masked_fill(~mask, math.nan)
    dirty_values = values.masked_fill(~mask, -math.inf)
    for clean_out, dirty_out in zip(
        gae(rewards, values, mask, 1.0, 0.95), gae(dirty_rewards, dirty_values, mask, 1.0, 0.95)
    ):
        torch.testing.assert_close(dirty_out, clean_out)
    torch.testing.assert_close(
        rewards_to_go(dirty_rewards, mask, 0.9), rewards_to_go(rewards, mask, 0.9)
    )


def test_masked_holes_are_skipped():
    """A row with holes gives the same results as the row with the holes removed."""
    rewards = torch.tensor([[1.0, math.nan, 2.0, 3.0, math.nan]])
    values = torch.tensor([[0.5, math.nan, -1.0, 0.25, math.nan]])
    mask = torch.tensor([[1, 0, 1, 1, 0]])
    real = mask.bool()[0]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    compact_adv, compact_ret = gae(rewards[:, real], values[:, real], torch.ones(1, 3), 0.9, 0.8)
    torch.testing.assert_close(advantages[:, real], compact_adv)
    torch.testing.assert_close(returns[:, real], compact_ret)
    assert (advantages[:, ~real] == 0).all()
    torch.testing.assert_close(
        rewards_to_go(rewards, mask, 0.9)[:, real],
        rewards_to_go(rewards[:, real], torch.ones(1, 3), 0.9),
    )


def test_gae_gradient_ignores_nan_padding():
    values = torch.tensor([[0.5, 0.2, math.nan]], requires_grad=True)
    rewards = torch.tensor([[0.0, 1.0, math.nan]])
    advantages, returns = gae(rewards, values, torch.tensor([[1, 1, 0]]), 1.0, 0.9)
    (advantages.sum() + returns.sum()).backward()
    assert torch.isfinite(values.grad).all() and values.grad[0, 2] == 0


@pytest.mark.parametrize("gamma, lam", [(1.5, 0.9), (-0.1, 0.9), (1.0, 1.1)])
def test_discounts_are_validated(gamma, lam):
    with pytest.raises(ValueError, match="must lie in"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma, lam)


def test_shapes_are_validated():
    with pytest.raises(ValueError, match="values has shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        rewards_to_go(torch.zeros(3), torch.ones(3), 1.0)


# ----------------------------------------------------------------------------- token_rewards

LENGTHS = [3, 1, 5]
MASK = torch.arange(5) < torch.tensor(LENGTHS)[:, None]  # (3, 5) right-padded
SCORES = torch.tensor([2.0, -1.0, 0.5])


def logprob_pair(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(3, 5, generator=gen) * 3
    ref_logprobs = -torch.rand(3, 5, generator=gen) * 3
    return logprobs.masked_fill(~MASK, math.nan), ref_logprobs.masked_fill(~MASK, -math.inf)


def test_token_rewards_without_kl_put_the_score_on_the_last_real_token_only():
    logprobs, ref_logprobs = logprob_pair()
    rewards, kl = token_rewards(SCORES, logprobs, ref_logprobs, MASK, kl_coef=0.0)
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 0], expected[2, 4] = 2.0, -1.0, 0.5
    torch.testing.assert_close(rewards, expected)
    assert (kl[~MASK] == 0).all() and torch.isfinite(kl).all()


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_token_rewards_hand_composed(kind):
    logprobs, ref_logprobs = logprob_pair()
    rewards, kl = token_rewards(SCORES, logprobs, ref_logprobs, MASK, kl_coef=0.1, kind=kind)
    expected_kl = kl_penalty(logprobs, ref_logprobs, kind).masked_fill(~MASK, 0)
    expected = -0.1 * expected_kl
    for row, length in enumerate(LENGTHS):
        expected[row, length - 1] += SCORES[row]
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards, expected)


def test_token_rewards_accepts_a_tensor_coefficient_and_a_numeric_mask():
    logprobs, ref_logprobs = logprob_pair()
    expected, _ = token_rewards(SCORES, logprobs, ref_logprobs, MASK, kl_coef=0.3)
    rewards, _ = token_rewards(SCORES, logprobs, ref_logprobs, MASK.long(), torch.tensor(0.3))
    torch.testing.assert_close(rewards, expected)


def test_token_rewards_gradient_is_finite_despite_nan_padding():
    logprobs, ref_logprobs = logprob_pair()
    logprobs.requires_grad_()
    rewards, _ = token_rewards(SCORES, logprobs, ref_logprobs, MASK, kl_coef=0.1, kind="k3")
    rewards.sum().backward()
    assert torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[~MASK] == 0).all() and (logprobs.grad[MASK] != 0).all()


def test_token_rewards_rejects_bad_inputs():
    logprobs, ref_logprobs = logprob_pair()
    empty_row = MASK.clone()
    empty_row[1] = False
    with pytest.raises(ValueError, match="no true position"):
        token_rewards(SCORES, logprobs, ref_logprobs, empty_row, kl_coef=0.1)
    with pytest.raises(ValueError, match="scores has shape"):
        token_rewards(SCORES[:2], logprobs, ref_logprobs, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="valid kinds"):
        token_rewards(SCORES, logprobs, ref_logprobs, MASK, kl_coef=0.1, kind="kl")
