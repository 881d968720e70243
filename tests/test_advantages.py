"""Tests for rlhf_lightning.advantages: rewards-to-go, GAE and per-token rewards."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_lightning.advantages import (
    GAE,
    AdvantageInputs,
    GroupNormalized,
    LeaveOneOut,
    RewardsToGo,
    RewardsToGoBaseline,
    RewardsToGoGroupBaseline,
    SequenceReturn,
    broadcast_to_tokens,
    gae,
    group_baseline_rewards_to_go,
    grpo_advantages,
    rewards_to_go,
    rloo_advantages,
    sequence_returns,
    token_rewards,
)
from rlhf_lightning.ops import masked_whiten

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


def assert_rows_close(batch: torch.Tensor, lengths, expected: list[list[float]]) -> None:
    """Row ``b``'s real tokens (its first ``lengths[b]``) of a (B, T) batch equal expected[b]."""
    for b, row in enumerate(expected):
        torch.testing.assert_close(batch[b, : lengths[b]].tolist(), row)


@settings(max_examples=50, deadline=None)
@given(padded_batches(), unit_interval, unit_interval)
def test_gae_matches_the_reference(batch, gamma, lam):
    rewards, values, mask, lengths = batch
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()
    expected = [
        reference_gae(*row, gamma, lam)
        for row in zip(rows(rewards, lengths), rows(values, lengths))
    ]
    assert_rows_close(advantages, lengths, [adv for adv, _ in expected])
    assert_rows_close(returns, lengths, [ret for _, ret in expected])


@settings(max_examples=50, deadline=None)
@given(padded_batches(), unit_interval)
def test_gae_with_lambda_one_is_discounted_return_minus_value(batch, gamma):
    rewards, values, mask, lengths = batch
    advantages, returns = gae(rewards, values, mask, gamma, lam=1.0)
    to_go = [reference_rewards_to_go(row, gamma) for row in rows(rewards, lengths)]
    minus_value = [[g - v for g, v in zip(*row)] for row in zip(to_go, rows(values, lengths))]
    assert_rows_close(advantages, lengths, minus_value)
    assert_rows_close(returns, lengths, to_go)


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
    name, value = ("gamma", gamma) if not 0 <= gamma <= 1 else ("lam", lam)
    with pytest.raises(ValueError, match=rf"^{name} must lie in \[0, 1\], got {value}$"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma, lam)
    if name == "gamma":
        with pytest.raises(ValueError, match=rf"^gamma must lie in \[0, 1\], got {gamma}$"):
            rewards_to_go(torch.zeros(1, 2), torch.ones(1, 2), gamma)


def test_shapes_are_validated():
    with pytest.raises(ValueError, match="values has shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        rewards_to_go(torch.zeros(3), torch.ones(3), 1.0)
    # The mask is checked too, by every function that takes one.
    bad_mask = torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"^mask has shape \(2, 4\), expected \(2, 3\)$"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), bad_mask, 1.0, 0.95)
    with pytest.raises(ValueError, match=r"^mask has shape \(2, 4\)"):
        rewards_to_go(torch.zeros(2, 3), bad_mask, 1.0)
    with pytest.raises(ValueError, match=r"^mask has shape \(2, 4\)"):
        sequence_returns(torch.zeros(2, 3), bad_mask)
    with pytest.raises(ValueError, match=r"^per_sequence has shape \(3,\), expected \(2,\)$"):
        broadcast_to_tokens(torch.zeros(3), torch.ones(2, 5))


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


def _kl_by_hand(logprob: float, ref_logprob: float, kind: str) -> float:
    d = logprob - ref_logprob
    return {"k1": d, "k3": math.exp(-d) - 1 + d}[kind]


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_token_rewards_hand_composed(kind):
    logprobs, ref_logprobs = logprob_pair()
    rewards, kl = token_rewards(SCORES, logprobs, ref_logprobs, MASK, kl_coef=0.1, kind=kind)
    expected_kl = torch.zeros(3, 5)
    for row, length in enumerate(LENGTHS):
        for t in range(length):
            expected_kl[row, t] = _kl_by_hand(logprobs[row, t], ref_logprobs[row, t], kind)
    expected = -0.1 * expected_kl
    for row, length in enumerate(LENGTHS):
        expected[row, length - 1] += SCORES[row]
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards, expected)


def test_token_rewards_accepts_a_tensor_coefficient_and_a_numeric_mask():
    logprobs, ref_logprobs = logprob_pair()
    rewards, _ = token_rewards(SCORES, logprobs, ref_logprobs, MASK.long(), torch.tensor(0.3))
    for row, length in enumerate(LENGTHS):
        lp, ref = logprobs[row].tolist(), ref_logprobs[row].tolist()
        expected = [-0.3 * _kl_by_hand(lp[t], ref[t], "k1") for t in range(length)]
        expected[-1] += float(SCORES[row])
        assert rewards[row, :length].tolist() == pytest.approx(expected, rel=1e-5)
        assert (rewards[row, length:] == 0).all()


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


# ----------------------------------------------------------------------------- estimators
def test_rloo_hand_values():
    """Two prompts, k = 3: each score minus the mean of the two others of its group."""
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    expected = [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0]
    torch.testing.assert_close(rloo_advantages(scores, 3), torch.tensor(expected))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_rloo_matches_a_python_loop(k, groups, seed):
    scores = torch.randn(k * groups, generator=torch.Generator().manual_seed(seed))
    values = scores.tolist()
    expected = []
    for i, s in enumerate(values):
        group = values[(i // k) * k : (i // k + 1) * k]
        others = [x for j, x in enumerate(group) if j != i % k]
        expected.append(s - sum(others) / len(others))
    torch.testing.assert_close(rloo_advantages(scores, k), torch.tensor(expected))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_a_python_loop(scale_by_std):
    import statistics

    scores = torch.tensor([0.5, 1.0, 3.0, -1.0, 2.0, 2.0, 2.0, 7.0])
    values, k = scores.tolist(), 4
    expected = []
    for i, s in enumerate(values):
        group = values[(i // k) * k : (i // k + 1) * k]
        centred = s - statistics.mean(group)
        expected.append(centred / (statistics.stdev(group) + 1e-6) if scale_by_std else centred)
    got = grpo_advantages(scores, k, scale_by_std=scale_by_std, eps=1e-6)
    torch.testing.assert_close(got, torch.tensor(expected))


def test_group_estimators_reject_groups_that_do_not_fit():
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="^group normalisation needs group_size >= 2, got 1$"):
        grpo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="divide"):
        grpo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"^scores must be \(B,\), got shape \(2, 2\)$"):
        rloo_advantages(torch.zeros(2, 2), 2)


def test_grpo_defaults_scale_by_the_std_with_a_small_eps():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])  # group std sqrt(2), then 0
    expected = [-1 / (2**0.5 + 1e-6), 1 / (2**0.5 + 1e-6), 0.0, 0.0]
    assert grpo_advantages(scores, 2).tolist() == pytest.approx(expected, rel=1e-6)
    # The component passes its own eps on.
    inputs = AdvantageInputs(
        torch.tensor([[1.0], [3.0]]), None, torch.ones(2, 1, dtype=torch.bool), group_size=2
    )
    advantages, _ = GroupNormalized(eps=0.5)(inputs)
    assert advantages[:, 0].tolist() == pytest.approx([-1 / (2**0.5 + 0.5), 1 / (2**0.5 + 0.5)])


# Two prompts x two samples; per-token rewards already hold -beta * KL_t and the score at the end.
EST_REWARDS = torch.tensor(
    [[-0.1, -0.2, 1.0, math.nan], [0.3, 2.0, math.nan, math.nan], [-0.5, 0.1, 0.2, -1.0],
     [0.4, math.nan, math.nan, math.nan]]
)  # fmt: skip
EST_LENGTHS = [3, 2, 4, 1]
EST_MASK = torch.arange(4) < torch.tensor(EST_LENGTHS)[:, None]
EST_VALUES = torch.tensor(
    [[0.5, 0.1, -0.2, 9.0], [1.0, 0.0, 9.0, 9.0], [0.3, 0.3, 0.3, 0.3], [-1.0, 9.0, 9.0, 9.0]]
)


def _est_inputs(group_size=2):
    return AdvantageInputs(EST_REWARDS, EST_VALUES, EST_MASK, group_size=group_size)


def _returns_by_hand():
    return [sum(EST_REWARDS[b, :n].tolist()) for b, n in enumerate(EST_LENGTHS)]


def _check_broadcast(advantages, per_sequence):
    for b, n in enumerate(EST_LENGTHS):
        assert advantages[b, :n].tolist() == pytest.approx([per_sequence[b]] * n)
        assert (advantages[b, n:] == 0).all()


def test_sequence_return_puts_the_whole_return_on_every_token():
    advantages, returns = SequenceReturn()(_est_inputs())
    _check_broadcast(advantages, _returns_by_hand())
    assert returns is None


def test_leave_one_out_and_group_normalized_broadcast_one_advantage_per_sequence():
    totals = _returns_by_hand()
    loo = [
        totals[0] - totals[1],
        totals[1] - totals[0],
        totals[2] - totals[3],
        totals[3] - totals[2],
    ]
    _check_broadcast(LeaveOneOut()(_est_inputs())[0], loo)
    centred = [(totals[0] - totals[1]) / 2, (totals[1] - totals[0]) / 2]
    centred += [(totals[2] - totals[3]) / 2, (totals[3] - totals[2]) / 2]
    _check_broadcast(GroupNormalized(scale_by_std=False)(_est_inputs())[0], centred)
    std = [abs(totals[0] - totals[1]) / math.sqrt(2)] * 2 + [
        abs(totals[2] - totals[3]) / 2**0.5
    ] * 2
    normalised = [c / (s + 1e-6) for c, s in zip(centred, std)]
    _check_broadcast(GroupNormalized(eps=1e-6)(_est_inputs())[0], normalised)


def test_rewards_to_go_carry_the_future_kl_and_the_baseline_subtracts_the_value():
    advantages, returns = RewardsToGo(gamma=1.0)(_est_inputs())
    assert returns is None
    baseline, targets = RewardsToGoBaseline(gamma=1.0)(_est_inputs())
    for b, n in enumerate(EST_LENGTHS):
        row = EST_REWARDS[b, :n].tolist()
        to_go = [sum(row[t:]) for t in range(n)]
        assert advantages[b, :n].tolist() == pytest.approx(to_go)
        assert targets[b, :n].tolist() == pytest.approx(to_go)
        assert baseline[b, :n].tolist() == pytest.approx(
            [g - v for g, v in zip(to_go, EST_VALUES[b, :n].tolist())]
        )
        assert (baseline[b, n:] == 0).all() and (targets[b, n:] == 0).all()


def test_reinforce_pp_is_rewards_to_go_normalised_over_the_batch():
    """REINFORCE++'s advantages: the rewards-to-go of all tokens of the batch, whitened."""
    import statistics

    to_go = [sum(EST_REWARDS[b, t:n].tolist()) for b, n in enumerate(EST_LENGTHS) for t in range(n)]
    mean, std = statistics.mean(to_go), statistics.stdev(to_go)
    advantages, _ = RewardsToGo()(_est_inputs())
    whitened = masked_whiten(advantages, EST_MASK)
    assert whitened[EST_MASK].tolist() == pytest.approx([(g - mean) / std for g in to_go], rel=1e-5)


def test_reinforce_pp_baseline_hand_values():
    """Two prompts, k = 2 (EST_REWARDS): returns 0.7, 2.3 | -1.2, 0.4; group means 1.5 and
    -0.4. Row 0's rewards-to-go (0.7, 0.8, 1.0) minus 1.5; row 1's (2.3, 2.0) minus 1.5; row 2's
    (-1.2, -0.7, -0.8, -1.0) minus -0.4; row 3's (0.4,) minus -0.4."""
    advantages, returns = RewardsToGoGroupBaseline()(_est_inputs())
    assert returns is None
    expected = [
        [0.7 - 1.5, 0.8 - 1.5, 1.0 - 1.5],
        [2.3 - 1.5, 2.0 - 1.5],
        [-1.2 + 0.4, -0.7 + 0.4, -0.8 + 0.4, -1.0 + 0.4],
        [0.4 + 0.4],
    ]
    for b, n in enumerate(EST_LENGTHS):
        assert advantages[b, :n].tolist() == pytest.approx(expected[b], abs=1e-6)
        assert (advantages[b, n:] == 0).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_reinforce_pp_baseline_matches_a_python_loop(k, groups, seed):
    """Uneven lengths (an empty row included), NaN on the padding: G_t minus the group's mean
    of the sequence returns, computed with Python lists."""
    gen = torch.Generator().manual_seed(seed)
    B, T = k * groups, 5
    rewards = torch.randn(B, T, generator=gen)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    mask = torch.arange(T) < lengths[:, None]
    rewards = torch.where(mask, rewards, torch.nan)
    got = group_baseline_rewards_to_go(rewards, mask, k)
    rows = [rewards[b, : int(lengths[b])].tolist() for b in range(B)]
    totals = [sum(row) for row in rows]
    for b, row in enumerate(rows):
        group = totals[(b // k) * k : (b // k + 1) * k]
        baseline = sum(group) / k
        expected = [sum(row[t:]) - baseline for t in range(len(row))] + [0.0] * (T - len(row))
        assert got[b].tolist() == pytest.approx(expected, abs=1e-5)


def test_reinforce_pp_baseline_without_kl_is_the_centred_score_whitened():
    """With the score alone at the last token (the KL as a loss), every token of a sequence
    carries score - group mean; the preset then whitens over all real tokens of the batch."""
    import statistics

    scores = [1.0, 0.0, 3.0, 1.0]  # groups (1, 0) and (3, 1)
    lengths = [3, 1, 2, 4]
    mask = torch.arange(4) < torch.tensor(lengths)[:, None]
    rewards = torch.zeros(4, 4)
    for b, n in enumerate(lengths):
        rewards[b, n - 1] = scores[b]
    advantages, _ = RewardsToGoGroupBaseline()(AdvantageInputs(rewards, None, mask, 2))
    centred = [0.5, -0.5, 1.0, -1.0]
    tokens = [c for c, n in zip(centred, lengths) for _ in range(n)]
    mean, std = statistics.mean(tokens), statistics.stdev(tokens)
    whitened = masked_whiten(advantages, mask)[mask].tolist()
    assert whitened == pytest.approx([(a - mean) / std for a in tokens], rel=1e-5)
    with pytest.raises(ValueError, match="^a group baseline needs group_size >= 2, got 1$"):
        group_baseline_rewards_to_go(rewards, mask, 1)
    assert RewardsToGoGroupBaseline.min_group_size == 2


def test_gae_component_passes_its_discounts_and_reads_the_values():
    advantages, returns = GAE(gamma=0.9, lam=0.8)(_est_inputs())
    for b, n in enumerate(EST_LENGTHS):
        rewards, values = EST_REWARDS[b, :n].tolist(), EST_VALUES[b, :n].tolist()
        expected_adv, expected_ret = reference_gae(rewards, values, 0.9, 0.8)
        assert advantages[b, :n].tolist() == pytest.approx(expected_adv, rel=1e-5)
        assert returns[b, :n].tolist() == pytest.approx(expected_ret, rel=1e-5)
        assert (advantages[b, n:] == 0).all() and (returns[b, n:] == 0).all()


def test_estimators_validate_their_settings_by_field():
    from rlhf_lightning.errors import FieldError

    cases = [
        (lambda: GAE(lam=1.5), "lam", "must lie in [0, 1], got 1.5"),
        (lambda: GAE(lam=-0.5), "lam", "must lie in [0, 1], got -0.5"),
        (lambda: RewardsToGo(gamma=-1.0), "gamma", "must lie in [0, 1], got -1.0"),
        (lambda: RewardsToGoBaseline(gamma=2.0), "gamma", "must lie in [0, 1], got 2.0"),
        (lambda: GroupNormalized(eps=-1e-3), "eps", "must be >= 0, got -0.001"),
    ]
    for make, field, reason in cases:
        with pytest.raises(FieldError) as error:
            make()
        assert (error.value.field, error.value.reason) == (field, reason)
    # The bounds themselves are valid.
    for valid in (lambda: GAE(lam=0.0), lambda: GAE(lam=1.0, gamma=0.0), lambda: GAE(gamma=1.0)):
        valid()
    GroupNormalized(eps=0.0)


def test_token_rewards_name_the_tensor_of_the_wrong_shape():
    logprobs, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"^ref_logprobs has shape \(2, 4\), expected \(2, 3\)$"):
        token_rewards(torch.zeros(2), logprobs, torch.zeros(2, 4), mask, 0.1)
    with pytest.raises(ValueError, match=r"^scores has shape \(3,\), expected \(2,\)$"):
        token_rewards(torch.zeros(3), logprobs, torch.zeros(2, 3), mask, 0.1)
