"""Tests for rlhf_lightning.losses: PPO policy/value losses, Bradley-Terry, explained variance."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.losses import (
    ClippedSurrogate,
    SequenceMeanTokenMean,
    SequenceMeanTokenSum,
    TokenMean,
    aggregate,
    bradley_terry_loss,
    clipped_policy_loss,
    explained_variance,
    sequence_ratio_policy_gradient_loss,
    value_loss,
    vanilla_policy_gradient_loss,
)

# ----------------------------------------------------------------------------- PPO policy loss

# Four real tokens and one padded one (NaN / inf there), clip 0.2:
#   token 0: A =  2, ratio 1.5  -> max(-3.0, -2.4) = -2.4  clipped (A > 0, ratio > 1 + eps)
#   token 1: A = -1, ratio 0.5  -> max( 0.5,  0.8) =  0.8  clipped (A < 0, ratio < 1 - eps)
#   token 2: A =  1, ratio 1.1  -> max(-1.1, -1.1) = -1.1  inside the clip range
#   token 3: A =  2, ratio 0.5  -> max(-1.0, -1.6) = -1.0  outside the range, but unclipped wins
RATIOS = [1.5, 0.5, 1.1, 0.5]
ADVANTAGES = torch.tensor([[2.0, -1.0, 1.0, 2.0, math.inf]])
OLD_LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5, -3.0, math.nan]])
MASK = torch.tensor([[True, True, True, True, False]])


def new_logprobs(ratios=RATIOS):
    log_ratios = torch.tensor([math.log(r) for r in ratios] + [0.0])
    logprobs = OLD_LOGPROBS + log_ratios
    logprobs[0, 4] = -math.inf
    return logprobs.requires_grad_()


def token_mean(per_token, mask=MASK):
    return aggregate(per_token, TokenMean().token_weights(mask), TokenMean().units(mask))


def test_policy_loss_on_policy_is_minus_the_mean_advantage():
    advantages = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    logprobs = -torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    result = clipped_policy_loss(logprobs, logprobs.clone(), advantages, mask, 0.2, 0.2)
    per_token, diag = result.loss, result
    real = advantages[mask.bool()].tolist()
    assert float(token_mean(per_token, mask)) == pytest.approx(-sum(real) / len(real), abs=1e-6)
    assert diag.clipped.sum() == 0 and diag.log_ratio.abs().sum() == 0
    assert (diag.ratio[mask.bool()] == 1).all() and (diag.ratio[~mask.bool()] == 0).all()


def test_policy_loss_hand_computed_clipping():
    logprobs = new_logprobs()
    result = clipped_policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK, 0.2, 0.2)
    per_token, diag = result.loss, result
    assert per_token[0].tolist() == pytest.approx([-2.4, 0.8, -1.1, -1.0, 0.0])
    assert token_mean(per_token).item() == pytest.approx((-2.4 + 0.8 - 1.1 - 1.0) / 4)
    assert diag.clipped[0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert diag.ratio[0, :4].tolist() == pytest.approx(RATIOS)
    assert not any(t.requires_grad for t in (diag.log_ratio, diag.ratio, diag.clipped))


def test_asymmetric_clip_and_dual_clip_hand_values():
    """clip_low 0.2, clip_high 0.6: token 0's ratio 1.5 is now inside; dual clip c = 1.5 caps
    a negative advantage's loss at -c * A."""
    logprobs = new_logprobs([1.5, 3.0, 1.1, 0.5])
    advantages = torch.tensor([[2.0, -1.0, 1.0, 2.0, math.inf]])
    result = clipped_policy_loss(logprobs, OLD_LOGPROBS, advantages, MASK, 0.2, 0.6)
    per_token, diag = result.loss, result
    # token 1: A = -1, ratio 3.0 -> max(3.0, 1.6) = 3.0 (no cap without dual clip)
    assert per_token[0, :4].tolist() == pytest.approx([-3.0, 3.0, -1.1, -1.0])
    result = clipped_policy_loss(logprobs, OLD_LOGPROBS, advantages, MASK, 0.2, 0.6, dual_clip=1.5)
    per_token, diag = result.loss, result
    assert per_token[0, :4].tolist() == pytest.approx([-3.0, 1.5, -1.1, -1.0])
    assert diag.clipped[0, :4].tolist() == [0.0, 1.0, 0.0, 0.0]
    per_token.sum().backward()
    assert logprobs.grad[0, 1] == 0  # the capped token gets no gradient


def test_policy_gradient_is_zero_where_clipped_and_finite_on_padding():
    logprobs = new_logprobs()
    result = clipped_policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK, 0.2, 0.2)
    per_token, _ = result.loss, result
    token_mean(per_token).backward()
    # d/dlogp of -A * ratio / N is -A * ratio / N on unclipped tokens.
    expected = torch.tensor([[0.0, 0.0, -1.0 * 1.1 / 4, -2.0 * 0.5 / 4, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_vanilla_policy_gradient_is_minus_advantage_times_the_ratio():
    """-A * ratio, unclipped: the gradient -A * ratio * grad logp is the plain -A * grad logp at
    ratio 1, and reweights each token for its changed probability once the policy moved."""
    logprobs = new_logprobs()
    result = vanilla_policy_gradient_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK)
    per_token, diag = result.loss, result
    assert diag.ratio[0, :4].tolist() == pytest.approx(RATIOS)
    assert per_token[0, :4].tolist() == pytest.approx([-3.0, 0.5, -1.1, -1.0])
    assert per_token[0, 4] == 0
    token_mean(per_token).backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-3.0, 0.5, -1.1, -1.0, 0.0]]) / 4)
    assert diag.clipped.sum() == 0


def test_sequence_ratio_policy_gradient_weights_every_token_by_the_sequence_ratio():
    """Two rows: token ratios (1.5, 0.5) and (1.1, 0.5): rho = 0.75 and 0.55; the value is
    -A * rho and the gradient -A * rho * grad logp."""
    from rlhf_lightning.losses import SequenceRatioPolicyGradient

    old = torch.tensor([[-1.0, -2.0, math.nan], [-0.5, -3.0, -1.0]])
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.5, 1.0]])
    logprobs = (old.nan_to_num() + ratios.log()).requires_grad_()
    advantages = torch.tensor([[2.0, -1.0, math.inf], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    result = SequenceRatioPolicyGradient()(logprobs, old, advantages, mask)  # conf's component
    per_token, diag = result.loss, result
    rho = torch.tensor([[0.75], [0.55]])
    expected = torch.where(mask, -advantages.nan_to_num(posinf=0.0) * rho, 0.0)
    torch.testing.assert_close(per_token, expected)
    per_token.sum().backward()
    torch.testing.assert_close(logprobs.grad, expected)  # d/dlogp of -A * rho * exp(0) = value
    torch.testing.assert_close(diag.ratio, torch.where(mask, ratios, 0.0))


def test_dual_clip_caps_only_negative_advantages_at_minus_c_times_a():
    """A = -2, ratio 3: the loss max(6, 2.4) = 6 is capped at -c * A = 3; A = 0.5, ratio 0.5:
    the loss max(-0.25, -0.4) = -0.25 is above -c * A = -0.75 but A > 0, so no cap."""
    logprobs = new_logprobs([3.0, 0.5, 1.0, 1.0])
    advantages = torch.tensor([[-2.0, 0.5, 0.0, 1.0, math.inf]])
    result = clipped_policy_loss(logprobs, OLD_LOGPROBS, advantages, MASK, 0.2, 0.2, dual_clip=1.5)
    per_token, diag = result.loss, result
    assert per_token[0, :4].tolist() == pytest.approx([3.0, -0.25, 0.0, -1.0])
    assert diag.clipped[0, :4].tolist() == [1.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- GSPO, CISPO

# Three rows (NaN / inf on the padding), clip 0.2 / 0.2:
#   row 0: token ratios (2, 0.5)      -> s = 1,  A =  1: loss -1 per token, inside the clip
#   row 1: token ratios (1.5, 1.5, -) -> s = 1.5, A = 2: max(-3, -2.4) = -2.4, clipped
#   row 2: token ratios (0.5, 2, 8)   -> s = 2,  A = -1: max(2, 1.2) = 2, unclipped wins
GSPO_RATIOS = torch.tensor([[2.0, 0.5, 1.0], [1.5, 1.5, 1.0], [0.5, 2.0, 8.0]])
GSPO_OLD = torch.tensor([[-1.0, -2.0, math.nan], [-0.5, -3.0, math.inf], [-1.5, -0.2, -4.0]])
GSPO_ADV = torch.tensor([[1.0, 1.0, math.nan], [2.0, 2.0, math.inf], [-1.0, -1.0, -1.0]])
GSPO_MASK = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])


def gspo_logprobs():
    return torch.where(GSPO_MASK, GSPO_OLD + GSPO_RATIOS.log(), math.nan).requires_grad_()


def test_gspo_hand_values_clip_each_sequence_as_a_whole():
    from rlhf_lightning.losses import gspo_policy_loss

    logprobs = gspo_logprobs()
    result = gspo_policy_loss(logprobs, GSPO_OLD, GSPO_ADV, GSPO_MASK, 0.2, 0.2)
    per_token, diag = result.loss, result
    expected = torch.tensor([[-1.0, -1.0, 0.0], [-2.4, -2.4, 0.0], [2.0, 2.0, 2.0]])
    torch.testing.assert_close(per_token, expected)
    assert diag.clipped.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(diag.ratio, torch.where(GSPO_MASK, GSPO_RATIOS, 0.0))
    # Each token's gradient is -A * s on its own logprob (0 where clipped), summed here.
    per_token.sum().backward()
    grad = torch.tensor([[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    torch.testing.assert_close(logprobs.grad, grad)


def _gspo_sequence_objective(logprobs, old, advantages, lengths, clip_low, clip_high):
    """The paper's sequence-level loss, row by row: max(-A s, -A clip(s)) with s =
    exp(mean of the real tokens' log-ratios), the gradient through s (a Python loop)."""
    total = 0.0
    for b, n in enumerate(lengths):
        s = torch.exp((logprobs[b, :n] - old[b, :n]).mean())
        a = advantages[b, 0]
        total = total + torch.maximum(-a * s, -a * s.clamp(1 - clip_low, 1 + clip_high))
    return total / len(lengths)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_with_seq_mean_token_mean_is_the_papers_sequence_objective(seed):
    """Random padded rows, one advantage per sequence, ratios across the clip: the token-level
    form aggregated with seq-mean-token-mean has the sequence objective's value and gradient."""
    from rlhf_lightning.losses import GSPO

    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 3, 4, 2, 5]
    B, T = len(lengths), 5
    mask = torch.arange(T) < torch.tensor(lengths)[:, None]
    old = -torch.rand(B, T, generator=gen) * 3
    logits = old + 0.3 * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, 1, generator=gen).expand(B, T)
    old, advantages = torch.where(mask, old, math.nan), torch.where(mask, advantages, math.inf)
    ours = torch.where(mask, logits, math.nan).requires_grad_()
    naive = logits.clone().requires_grad_()
    result = GSPO(clip_low=0.1, clip_high=0.15)(ours, old, advantages, mask)
    per_token, diag = result.loss, result
    agg = SequenceMeanTokenMean()
    loss = aggregate(per_token, agg.token_weights(mask), agg.units(mask))
    expected = _gspo_sequence_objective(naive, old, advantages, lengths, 0.1, 0.15)
    assert 0 < diag.clipped.sum() < mask.sum()  # both branches are exercised
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, torch.where(mask, naive.grad, 0.0))


def test_gspo_at_ratio_one_is_the_plain_policy_gradient():
    """On-policy s = 1: value -A, gradient -A * grad logp, as the vanilla loss."""
    from rlhf_lightning.losses import GSPO

    logprobs = gspo_logprobs()
    old = logprobs.detach().clone()
    result = GSPO()(logprobs, old, GSPO_ADV, GSPO_MASK)
    per_token, diag = result.loss, result
    vanilla_lp = logprobs.detach().clone().requires_grad_()
    vanilla = vanilla_policy_gradient_loss(vanilla_lp, old, GSPO_ADV, GSPO_MASK).loss
    torch.testing.assert_close(per_token, vanilla)
    per_token.sum().backward()
    vanilla.sum().backward()
    torch.testing.assert_close(logprobs.grad, vanilla_lp.grad)
    assert diag.clipped.sum() == 0


# CISPO on the four tokens above (ratios 1.5, 0.5, 1.1, 0.5; A = 2, -1, 1, 2), clip 0.2 / 0.2:
# weights 1.2, 0.8, 1.1, 0.8; the loss is -w * A * logp, the gradient -w * A on every token,
# where the clipped surrogate gives 0 on tokens 0 and 1.
def test_cispo_hand_values_keep_every_tokens_gradient():
    from rlhf_lightning.losses import CISPO

    logprobs = new_logprobs()
    result = CISPO(clip_low=0.2, clip_high=0.2)(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK)
    per_token, diag = result.loss, result
    weights = torch.tensor([1.2, 0.8, 1.1, 0.8])
    a = ADVANTAGES[0, :4]
    lp = logprobs.detach()[0, :4]
    assert per_token[0, :4].tolist() == pytest.approx((-weights * a * lp).tolist())
    assert per_token[0, 4] == 0
    assert diag.clipped[0].tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]  # the weight, not the grad
    assert diag.ratio[0, :4].tolist() == pytest.approx(RATIOS)
    per_token.sum().backward()
    assert logprobs.grad[0].tolist() == pytest.approx((-weights * a).tolist() + [0.0])


def test_cispo_without_a_lower_bound_and_at_ratio_one():
    """clip_low = 1: the weight is min(ratio, 1 + clip_high) (TRL's form with epsilon_high =
    1 + clip_high); at ratio 1 the gradient is the plain -A * grad logp."""
    from rlhf_lightning.losses import cispo_policy_loss

    logprobs = new_logprobs([1.5, 0.5, 1.1, 3.0])
    result = cispo_policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK, 1.0, 0.28)
    per_token, _ = result.loss, result
    per_token.sum().backward()
    weights = torch.tensor([1.28, 0.5, 1.1, 1.28])
    assert logprobs.grad[0, :4].tolist() == pytest.approx((-weights * ADVANTAGES[0, :4]).tolist())
    on_policy = OLD_LOGPROBS.nan_to_num().clone().requires_grad_()
    result = cispo_policy_loss(on_policy, OLD_LOGPROBS, ADVANTAGES, MASK, 1.0, 0.28)
    per_token, diag = result.loss, result
    per_token.sum().backward()
    assert on_policy.grad[0].tolist() == pytest.approx([-2.0, 1.0, -1.0, -2.0, 0.0])
    assert diag.clipped.sum() == 0


def test_gspo_and_cispo_ignore_nan_and_inf_padding():
    """Finite numbers in place of the padding change neither loss, diagnostics nor gradients."""
    from rlhf_lightning.losses import CISPO, GSPO

    for loss_fn in (GSPO(clip_low=0.2, clip_high=0.2), CISPO(clip_low=0.2, clip_high=0.2)):
        dirty = gspo_logprobs()
        clean = torch.where(GSPO_MASK, dirty.detach(), -1.0).requires_grad_()
        clean_old, clean_adv = (torch.where(GSPO_MASK, t, 3.0) for t in (GSPO_OLD, GSPO_ADV))
        dirty_out = loss_fn(dirty, GSPO_OLD, GSPO_ADV, GSPO_MASK)
        clean_out = loss_fn(clean, clean_old, clean_adv, GSPO_MASK)
        dirty_loss, clean_loss = dirty_out.loss, clean_out.loss
        torch.testing.assert_close(dirty_loss, clean_loss)
        for name in ("log_ratio", "ratio", "clipped"):
            torch.testing.assert_close(getattr(dirty_out, name), getattr(clean_out, name))
        dirty_loss.sum().backward()
        clean_loss.sum().backward()
        assert torch.isfinite(dirty.grad).all()
        torch.testing.assert_close(dirty.grad, clean.grad)


def test_policy_loss_rejects_bad_inputs():
    logprobs = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip_low and clip_high"):
        clipped_policy_loss(logprobs, logprobs, logprobs, torch.ones(2, 3), 0.0, 0.2)
    with pytest.raises(ValueError, match="clip_low and clip_high"):
        clipped_policy_loss(logprobs, logprobs, logprobs, torch.ones(2, 3), 0.2, 0.0)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(logprobs, logprobs, logprobs, torch.ones(2, 3), 0.2, 0.2, 0.9)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(logprobs, logprobs, logprobs, torch.ones(2, 3), 0.2, 0.2, 1.0)
    with pytest.raises(ValueError, match="advantages has shape"):
        clipped_policy_loss(logprobs, logprobs, torch.zeros(2, 4), torch.ones(2, 3), 0.2, 0.2)


def test_policy_loss_components_apply_their_settings():
    """The configurable components give their functions' results with their own bounds."""
    from rlhf_lightning.losses import VanillaPolicyGradient

    logprobs = new_logprobs([1.5, 3.0, 1.1, 0.5])
    advantages = torch.tensor([[2.0, -1.0, 1.0, 2.0, math.inf]])
    result = ClippedSurrogate(clip_low=0.2, clip_high=0.6, dual_clip=1.5)(
        logprobs, OLD_LOGPROBS, advantages, MASK
    )
    per_token, diag = result.loss, result
    assert per_token[0, :4].tolist() == pytest.approx([-3.0, 1.5, -1.1, -1.0])
    assert diag.clipped[0, :4].tolist() == [0.0, 1.0, 0.0, 0.0]
    result = ClippedSurrogate()(logprobs, OLD_LOGPROBS, advantages, MASK)
    per_token, _ = result.loss, result  # 0.2, 0.2
    assert per_token[0, :4].tolist() == pytest.approx([-2.4, 3.0, -1.1, -1.0])
    result = VanillaPolicyGradient()(logprobs, OLD_LOGPROBS, advantages, MASK)
    per_token, diag = result.loss, result
    assert per_token[0, :4].tolist() == pytest.approx([-3.0, 3.0, -1.1, -1.0])
    assert diag.ratio[0, :4].tolist() == pytest.approx([1.5, 3.0, 1.1, 0.5])


@pytest.mark.parametrize(
    "make, field, reason",
    [
        (lambda: ClippedSurrogate(clip_low=0.0), "clip_low", "must be > 0, got 0.0"),
        (lambda: ClippedSurrogate(clip_high=-0.1), "clip_high", "must be > 0, got -0.1"),
        (lambda: ClippedSurrogate(dual_clip=1.0), "dual_clip", "must be > 1 (or null), got 1.0"),
        (lambda: SequenceMeanTokenSum(normalizer=0.0), "normalizer", "must be > 0, got 0.0"),
        (lambda: _losses().GSPO(clip_low=0.0), "clip_low", "must be > 0, got 0.0"),
        (lambda: _losses().GSPO(clip_high=-1e-4), "clip_high", "must be > 0, got -0.0001"),
        (lambda: _losses().GSPO(clip_high=0.0), "clip_high", "must be > 0, got 0.0"),
        (lambda: _losses().CISPO(clip_low=0.0), "clip_low", "must be in (0, 1], got 0.0"),
        (lambda: _losses().CISPO(clip_low=1.5), "clip_low", "must be in (0, 1], got 1.5"),
        (lambda: _losses().CISPO(clip_high=0.0), "clip_high", "must be > 0, got 0.0"),
    ],
)
def test_loss_components_validate_their_settings_by_field(make, field, reason):
    from rlhf_lightning.errors import FieldError

    with pytest.raises(FieldError) as error:
        make()
    assert (error.value.field, error.value.reason) == (field, reason)


def test_loss_components_accept_values_just_inside_their_bounds():
    ClippedSurrogate(clip_low=1e-3, clip_high=1e-3, dual_clip=1.001)
    SequenceMeanTokenSum(normalizer=0.5)
    _losses().GSPO(clip_low=1e-6, clip_high=1e-6)
    _losses().CISPO(clip_low=1.0, clip_high=1e-6)
    with pytest.raises(ValueError, match=r"clip_low and clip_high must be > 0 \(clip_low <= 1"):
        _losses().cispo_policy_loss(*(torch.zeros(1, 1),) * 3, torch.ones(1, 1), 1.5, 0.2)
    with pytest.raises(ValueError, match="clip_low and clip_high must be > 0, got 0.2, 0"):
        _losses().gspo_policy_loss(*(torch.zeros(1, 1),) * 3, torch.ones(1, 1), 0.2, 0)
    with pytest.raises(ValueError, match="clip_low and clip_high must be > 0, got 0, 0.2"):
        _losses().gspo_policy_loss(*(torch.zeros(1, 1),) * 3, torch.ones(1, 1), 0, 0.2)


def _losses():
    from rlhf_lightning import losses

    return losses


# ----------------------------------------------------------------------------- aggregation

# Two sequences of 3 and 1 real tokens; per-token losses 1, 2, 3 | 10.
AGG_LOSS = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
AGG_MASK = torch.tensor([[True, True, True], [True, False, False]])


@pytest.mark.parametrize(
    ("aggregation", "expected", "units"),
    [
        (TokenMean(), (1 + 2 + 3 + 10) / 4, 4),
        (SequenceMeanTokenMean(), ((1 + 2 + 3) / 3 + 10 / 1) / 2, 2),
        (SequenceMeanTokenSum(normalizer=5), ((1 + 2 + 3) / 5 + 10 / 5) / 2, 2),
    ],
)
def test_aggregations_hand_values(aggregation, expected, units):
    weights = aggregation.token_weights(AGG_MASK)
    assert float(aggregation.units(AGG_MASK)) == units
    assert float(aggregate(AGG_LOSS, weights, aggregation.units(AGG_MASK))) == pytest.approx(
        expected
    )


@pytest.mark.parametrize(
    "aggregation", [TokenMean(), SequenceMeanTokenMean(), SequenceMeanTokenSum(normalizer=3)]
)
def test_aggregation_over_parts_with_the_global_denominator_is_the_whole(aggregation):
    """Splitting the rows and dividing each part by the whole minibatch's units gives the loss
    of the whole: the property gradient accumulation and DDP rely on."""
    gen = torch.Generator().manual_seed(0)
    losses = torch.randn(6, 5, generator=gen)
    mask = torch.arange(5) < torch.tensor([5, 1, 3, 2, 4, 5])[:, None]
    denominator = aggregation.units(mask)
    whole = aggregate(losses, aggregation.token_weights(mask), denominator)
    parts = sum(
        aggregate(losses[rows], aggregation.token_weights(mask[rows]), denominator)
        for rows in (torch.tensor([0, 3]), torch.tensor([1]), torch.tensor([2, 4, 5]))
    )
    torch.testing.assert_close(parts, whole)


# ----------------------------------------------------------------------------- value loss

# clip_eps = 0.2, old values -> clipped values, returns:
#   token 0: V 1.0, old 0.5 -> 0.7, R 2.0: max(1.00, 1.69) = 1.69  clipped term larger
#   token 1: V 0.0, old 0.0 -> 0.0, R 1.0: max(1.00, 1.00) = 1.00
#   token 2: V 0.5, old 0.5 -> 0.5, R 0.0: max(0.25, 0.25) = 0.25
#   token 3: V 1.0, old 0.5 -> 0.7, R 0.0: max(1.00, 0.49) = 1.00  unclipped term larger
OLD_VALUES = torch.tensor([[0.5, 0.0, 0.5, 0.5, math.nan]])
RETURNS = torch.tensor([[2.0, 1.0, 0.0, 0.0, math.inf]])


def new_values():
    return torch.tensor([[1.0, 0.0, 0.5, 1.0, math.nan]], requires_grad=True)


def test_value_loss_hand_computed_clipping():
    values = new_values()
    per_token, clipped = value_loss(values, OLD_VALUES, RETURNS, MASK, clip_eps=0.2)
    assert token_mean(per_token).item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.25 + 1.0) / 4)
    assert clipped[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    token_mean(per_token).backward()
    # d/dV of 0.5 * (V - R)^2 / N is (V - R) / N where the unclipped term is active; 0 on token 0,
    # whose clipped value sits on the clip boundary.
    expected = torch.tensor([[0.0, -1.0 / 4, 0.5 / 4, 1.0 / 4, 0.0]])
    torch.testing.assert_close(values.grad, expected)


def test_value_loss_without_clipping():
    values = new_values()
    per_token, clipped = value_loss(values, OLD_VALUES, RETURNS, MASK, clip_eps=None)
    assert token_mean(per_token).item() == pytest.approx(0.5 * (1.0 + 1.0 + 0.25 + 1.0) / 4)
    assert clipped.sum() == 0
    token_mean(per_token).backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-1.0, -1.0, 0.5, 1.0, 0.0]]) / 4)


def test_value_loss_clips_below_the_old_value_too():
    """V 0.0, old 0.5 -> 0.3 (the lower bound), R 1.0: max(1.0, 0.49) = 1.0 unclipped wins;
    V -1.0, old 0.0 -> -0.2, R -2.0: max(1.0, 3.24) = 3.24 the clipped term wins."""
    values = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old, returns = torch.tensor([[0.5, 0.0]]), torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    per_token, clipped = value_loss(values, old, returns, mask, clip_eps=0.2)
    assert per_token[0].tolist() == pytest.approx([0.5 * 1.0, 0.5 * 3.24])
    assert clipped[0].tolist() == [0.0, 1.0]


def test_value_loss_rejects_bad_clip():
    for bad in (-0.2, 0.0):
        with pytest.raises(ValueError, match="clip_eps"):
            value_loss(new_values(), OLD_VALUES, RETURNS, MASK, clip_eps=bad)


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_is_log2_at_equal_rewards():
    rewards = torch.tensor([0.3, -1.0, 5.0])
    loss, stats = bradley_terry_loss(rewards, rewards.clone())
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["accuracy"].item() == 0.0  # ties are not wins
    assert stats["margin_mean"].item() == 0.0


def test_bradley_terry_hand_values_and_stats():
    chosen = torch.tensor([1.0, 0.0, 2.0, -1.0])
    rejected = torch.tensor([0.0, 1.0, -1.0, -3.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    gaps = [1.0, -1.0, 3.0, 2.0]
    expected = sum(math.log1p(math.exp(-gap)) for gap in gaps) / 4
    assert loss.item() == pytest.approx(expected)
    assert stats["accuracy"].item() == 0.75
    assert stats["chosen_mean"].item() == 0.5
    assert stats["rejected_mean"].item() == -0.75
    assert stats["margin_mean"].item() == 1.25


def test_bradley_terry_margin_shifts_the_logit():
    loss, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))  # -log sigmoid(1 - 0.5)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.2, -0.5], requires_grad=True)
    rejected = torch.tensor([0.1, 0.4], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    torch.testing.assert_close(chosen.grad, -rejected.grad)


def test_bradley_terry_is_stable_for_large_gaps():
    chosen = torch.tensor([-500.0, 500.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, torch.zeros(2))
    assert loss.item() == pytest.approx(250.0)  # (500 + ~0) / 2; a naive log(sigmoid) gives inf
    loss.backward()
    assert torch.isfinite(chosen.grad).all()


def test_bradley_terry_rejects_no_pairs():
    with pytest.raises(ValueError, match="^bradley_terry_loss needs at least one pair$"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))


def test_bradley_terry_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="margin has shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), torch.zeros(3))


# ----------------------------------------------------------------------------- explained variance


def test_explained_variance_hand_values():
    returns = torch.tensor([[1.0, 2.0, 3.0, math.nan]])
    mask = torch.tensor([[1, 1, 1, 0]])
    perfect = explained_variance(returns.clone(), returns, mask)
    assert perfect.item() == 1.0
    constant = explained_variance(torch.full((1, 4), 7.0), returns, mask)
    assert constant.item() == pytest.approx(0.0)
    # errors R - V = (1, 0, -1): Var 2/3 over Var[R] = 2/3 -> 0
    assert explained_variance(torch.tensor([[0.0, 2.0, 4.0, 0.0]]), returns, mask).item() == (
        pytest.approx(0.0)
    )
    # errors (0.5, 0, 0.5): Var 1/18 over 2/3 -> 1 - 1/12
    values = torch.tensor([[0.5, 2.0, 2.5, math.inf]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(1 - 1 / 12)


def test_explained_variance_is_nan_for_constant_returns():
    returns = torch.tensor([[2.0, 2.0, 2.0]])
    assert math.isnan(explained_variance(torch.zeros(1, 3), returns, torch.ones(1, 3)).item())
    # Not -inf when the values vary: Var[R - V] / 0 is as undefined as 0 / 0.
    values = torch.tensor([[0.0, 1.0, 5.0]])
    assert math.isnan(explained_variance(values, returns, torch.ones(1, 3)).item())


# ----------------------------------------------------------------------------- masking


def test_losses_ignore_nan_and_inf_padding():
    """Replacing the padded column by finite numbers changes neither losses, stats nor grads."""
    finite_padding = torch.tensor([[0.0, 0.0, 0.0, 0.0, -1.0]])

    def policy(loss_fn):
        def per_token_and_diagnostics(logprobs, old, advantages, mask):
            out = loss_fn(logprobs, old, advantages, mask)
            return out.loss, {"log_ratio": out.log_ratio, "ratio": out.ratio, "cut": out.clipped}

        return per_token_and_diagnostics

    def clipped(logprobs, old, advantages, mask):
        return clipped_policy_loss(logprobs, old, advantages, mask, 0.2, 0.2, dual_clip=2.0)

    def clipped_value(values, old, returns, mask):
        return value_loss(values, old, returns, mask, 0.2)

    cases = [
        (policy(clipped), new_logprobs, [OLD_LOGPROBS, ADVANTAGES]),
        (policy(vanilla_policy_gradient_loss), new_logprobs, [OLD_LOGPROBS, ADVANTAGES]),
        (policy(sequence_ratio_policy_gradient_loss), new_logprobs, [OLD_LOGPROBS, ADVANTAGES]),
        (clipped_value, new_values, [OLD_VALUES, RETURNS]),
    ]
    for loss_fn, make_input, others in cases:
        dirty = make_input()
        clean = torch.where(MASK, dirty.detach(), finite_padding).requires_grad_()
        clean_others = [torch.where(MASK, other, finite_padding) for other in others]
        dirty_loss, dirty_stats = loss_fn(dirty, *others, MASK)
        clean_loss, clean_stats = loss_fn(clean, *clean_others, MASK)
        torch.testing.assert_close(dirty_loss, clean_loss)
        dirty_stats = dirty_stats if isinstance(dirty_stats, dict) else {"s": dirty_stats}
        clean_stats = clean_stats if isinstance(clean_stats, dict) else {"s": clean_stats}
        for name in clean_stats:
            torch.testing.assert_close(dirty_stats[name], clean_stats[name])
        token_mean(dirty_loss).backward()
        token_mean(clean_loss).backward()
        assert torch.isfinite(dirty.grad).all()
        torch.testing.assert_close(dirty.grad, clean.grad)


# ----------------------------------------------------------------------------- sampler correction
def test_truncated_and_masked_importance_weights_hand_values():
    from rlhf_lightning.losses import MaskedIS, TruncatedIS

    ratios = [0.25, 0.8, 1.0, 3.0]  # pi_old / pi_sampler
    sampler = torch.tensor([[-1.0, -2.0, -0.5, -3.0, math.nan]])
    old = sampler + torch.tensor([[math.log(r) for r in ratios] + [0.0]])
    weights, cut = TruncatedIS(cap=2.0)(old, sampler, MASK)
    assert weights[0].tolist() == pytest.approx([0.25, 0.8, 1.0, 2.0, 0.0])
    assert cut[0].tolist() == [False, False, False, True, False]
    weights, cut = MaskedIS(low=0.5, high=2.0)(old, sampler, MASK)
    assert weights[0].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert cut[0].tolist() == [True, False, False, True, False]


def _tokens_at_ratios(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old, sampler, mask) of one row whose tokens have ``pi_old / pi_sampler`` = ``ratios``
    exactly (powers of 2: their logs are exact in float32)."""
    sampler = torch.full((1, len(ratios)), -1.0)
    old = sampler + torch.tensor([[math.log(r) for r in ratios]])
    return old, sampler, torch.ones(1, len(ratios), dtype=torch.bool)


def test_importance_weights_at_their_bounds():
    """A ratio equal to the cap is capped but not counted as truncated; ratios equal to
    MaskedIS's bounds are kept."""
    from rlhf_lightning.losses import MaskedIS, TruncatedIS

    old, sampler, mask = _tokens_at_ratios([0.5, 1.0, 2.0])
    weights, cut = TruncatedIS(cap=2.0)(old, sampler, mask)
    assert weights[0].tolist() == pytest.approx([0.5, 1.0, 2.0])
    assert cut[0].tolist() == [False, False, False]
    weights, cut = MaskedIS(low=0.5, high=2.0)(old, sampler, mask)
    assert weights[0].tolist() == [1.0, 1.0, 1.0]
    assert cut[0].tolist() == [False, False, False]
    weights, cut = MaskedIS(low=0.0, high=1.5)(old, sampler, mask)
    assert cut[0].tolist() == [False, False, True]


@pytest.mark.parametrize(
    ("make", "field", "reason"),
    [
        (lambda c: c["TruncatedIS"](cap=0.0), "cap", "must be > 0, got 0.0"),
        (lambda c: c["TruncatedIS"](cap=-1.0), "cap", "must be > 0, got -1.0"),
        (lambda c: c["MaskedIS"](low=-0.1), "low", "must be in [0, 1), got -0.1"),
        (lambda c: c["MaskedIS"](low=1.0), "low", "must be in [0, 1), got 1.0"),
        (lambda c: c["MaskedIS"](high=1.0), "high", "must be > 1, got 1.0"),
        (lambda c: c["ClippedSurrogate"](clip_high=0.0), "clip_high", "must be > 0, got 0.0"),
    ],
)
def test_sampler_corrections_refuse_impossible_bounds_naming_the_field(make, field, reason):
    from rlhf_lightning import losses
    from rlhf_lightning.errors import FieldError

    with pytest.raises(FieldError) as caught:
        make(vars(losses))
    assert (caught.value.field, caught.value.reason) == (field, reason)


def test_sampler_corrections_accept_their_boundary_values():
    from rlhf_lightning.losses import MaskedIS, TruncatedIS

    assert TruncatedIS(cap=1e-6).cap == 1e-6
    assert MaskedIS(low=0.0, high=1.0001).low == 0.0


# Four rows of pi_old / pi_sampler (powers of 2: exact logs), NaN on the padding:
#   row 0: (0.25, 4)     product 1, geometric mean 1
#   row 1: (2, 2, -)     product 4, geometric mean 2
#   row 2: (0.5, -, -)   product 0.5, geometric mean 0.5
#   row 3: (4, 4, 0.25)  product 4, geometric mean 4^(1/3) = 1.587
#   row 4: all padding   weight 0, never cut
SEQ_IS_RATIOS = [[0.25, 4.0, 1.0], [2.0, 2.0, 1.0], [0.5, 1.0, 1.0], [4.0, 4.0, 0.25], [1, 1, 1]]
SEQ_IS_MASK = torch.tensor(
    [[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool
)


def _seq_is_inputs():
    sampler = torch.full((5, 3), -1.5)
    old = sampler + torch.tensor(SEQ_IS_RATIOS).log()
    return torch.where(SEQ_IS_MASK, old, math.nan), torch.where(SEQ_IS_MASK, sampler, math.inf)


# The rows _seq_is_inputs' sequence ratios put outside [0.5, 2]: each real token of rows 1 and 3.
SEQ_IS_CUT = [[0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0]]


def test_sequence_truncated_is_weights_every_token_by_the_sequence_ratio():
    from rlhf_lightning.losses import SequenceTruncatedIS

    weights, cut = SequenceTruncatedIS(cap=2.0)(*_seq_is_inputs(), SEQ_IS_MASK)
    expected = [[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.5, 0.0, 0.0], [2.0, 2.0, 2.0], [0, 0, 0]]
    torch.testing.assert_close(weights, torch.tensor(expected))
    assert cut.tolist() == SEQ_IS_CUT
    assert not weights.requires_grad
    # A product equal to the cap (4, in powers of 2: exact) is the cap, and not counted as cut.
    weights, cut = SequenceTruncatedIS(cap=4.0)(*_seq_is_inputs(), SEQ_IS_MASK)
    assert weights[1].tolist() == [4.0, 4.0, 0.0] and not cut.any()


def test_sequence_masked_is_drops_whole_sequences_on_the_product_or_geometric_mean():
    from rlhf_lightning.losses import SequenceMaskedIS

    old, sampler = _seq_is_inputs()
    weights, cut = SequenceMaskedIS(low=0.5, high=2.0)(old, sampler, SEQ_IS_MASK)
    kept = [[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]  # row 2 at the bound: kept
    assert weights.tolist() == kept
    assert cut.tolist() == SEQ_IS_CUT
    weights, cut = SequenceMaskedIS(low=0.5, high=1.8, geometric=True)(old, sampler, SEQ_IS_MASK)
    assert weights.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert cut[1].tolist() == [True, True, False] and not cut[3].any()
    # Products equal to the upper bound (rows 1 and 3: 4) are kept too.
    weights, cut = SequenceMaskedIS(low=0.5, high=4.0)(old, sampler, SEQ_IS_MASK)
    assert weights.tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert not cut.any()


def test_sequence_log_ratio_sums_or_averages_each_rows_real_tokens():
    """Rows of 2, 1 and 0 real tokens: the sum of log(pi_old / pi_sampler), or its mean (the
    one-token row's own log-ratio, 0 for the empty row)."""
    from rlhf_lightning.losses import sequence_log_ratio

    old = torch.tensor([[0.5, -1.5], [0.75, math.nan], [math.nan, math.nan]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    sampler = torch.zeros(3, 2)
    keep, total = sequence_log_ratio(old, sampler, mask)
    assert keep.tolist() == mask.tolist() and total.tolist() == [-1.0, 0.75, 0.0]
    _, mean = sequence_log_ratio(old, sampler, mask, geometric=True)
    assert mean.tolist() == [-0.5, 0.75, 0.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_corrections_match_a_python_loop(seed):
    """Random logprobs, uneven lengths: the weights are the loop's product (or geometric mean)
    of exp(old - sampler) over each row's real tokens, truncated or masked."""
    from rlhf_lightning.losses import SequenceMaskedIS, SequenceTruncatedIS

    gen = torch.Generator().manual_seed(seed)
    lengths = [4, 1, 3, 0, 2, 4]
    mask = torch.arange(4) < torch.tensor(lengths)[:, None]
    sampler = -torch.rand(6, 4, generator=gen) * 2
    old = sampler + 0.4 * torch.randn(6, 4, generator=gen)
    tis, _ = SequenceTruncatedIS(cap=1.3)(old, sampler, mask)
    masked, _ = SequenceMaskedIS(low=0.7, high=1.4)(old, sampler, mask)
    geo, _ = SequenceMaskedIS(low=0.8, high=1.1, geometric=True)(old, sampler, mask)
    for b, n in enumerate(lengths):
        ratios = [math.exp(o - q) for o, q in zip(old[b, :n].tolist(), sampler[b, :n].tolist())]
        product = math.prod(ratios)
        mean = product ** (1 / n) if n else 1.0
        want = [min(product, 1.3)] * n + [0.0] * (4 - n)
        assert tis[b].tolist() == pytest.approx(want, rel=1e-5)
        assert masked[b].tolist() == [float(0.7 <= product <= 1.4)] * n + [0.0] * (4 - n)
        assert geo[b].tolist() == [float(0.8 <= mean <= 1.1)] * n + [0.0] * (4 - n)


def test_sequence_corrections_validate_their_settings_by_field():
    from rlhf_lightning.errors import FieldError
    from rlhf_lightning.losses import SequenceMaskedIS, SequenceTruncatedIS

    for make, field, reason in (
        (lambda: SequenceTruncatedIS(cap=0.0), "cap", "must be > 0, got 0.0"),
        (lambda: SequenceMaskedIS(low=1.0), "low", "must be in [0, 1), got 1.0"),
        (lambda: SequenceMaskedIS(high=1.0), "high", "must be > 1, got 1.0"),
    ):
        with pytest.raises(FieldError) as caught:
            make()
        assert (caught.value.field, caught.value.reason) == (field, reason)
    SequenceMaskedIS(low=0.0, high=1.0001, geometric=True)
    assert SequenceTruncatedIS(cap=1e-6).cap == 1e-6
