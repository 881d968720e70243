"""Parity with a peer implementation: verl 0.9.1's ``verl.trainer.ppo.core_algos`` and
``verl.trainer.ppo.rollout_corr_helper`` against our advantages, policy losses, KL estimators,
loss aggregations and sampler corrections, on random padded batches (uneven lengths, one-token
and full-width rows), values and gradients.

Needs verl: ``bash experiments/peer_parity/install_verl.sh`` (CI runs it); without it every test
here is skipped with that instruction. ``experiments/peer_parity/README.md`` lists the
deliberate differences; each test that meets one states it, and where the two conventions can be
aligned it aligns them and compares. In short:

- advantages: verl's GAE, REINFORCE++ and REINFORCE++-baseline return advantages whitened over
  the batch (``verl_F.masked_whiten``); ours whiten by ``algorithm.whiten_advantages``
  (``global_masked_whiten``: the same formula, over all ranks). verl's group estimators give a
  prompt with one sample a baseline of 0 (std 1); ours refuse a group size below 2. verl's
  REINFORCE++-baseline puts the whole sequence return (its KL part included) on every token,
  ours the rewards-to-go ``G_t`` (the KL from t on): the same where the rewards are the score
  alone (KL as a loss). verl sums ``token_level_rewards`` over every position and multiplies by
  the mask, so its padding must hold finite numbers (0 for the rewards); ours may hold NaN.
- policy losses: verl always applies the dual clip (``clip_ratio_c``, default 3), ours only with
  ``dual_clip`` set (ours without = verl with ``clip_ratio_c`` -> infinity); verl clamps the
  log-ratio to [-20, 20] (vanilla, CISPO) and GSPO's sequence log-ratio at 10, ours does not.
- KL: verl's k3 ("low_var_kl") clamps the log-ratio to [-20, 20] and the estimate to [-10, 10]:
  ours with ``algorithm.kl.clamp=10`` is the same, value and gradient; verl's "k3+" keeps k2's
  gradient where the clamp bites, ours (clamped) has gradient 0 there.
- aggregation: verl's ``seq-mean-token-sum-norm`` is the sequence mean of the token sums divided
  by ``loss_scale_factor`` (default: the mask's width), our ``seq_mean_token_sum`` with that
  normalizer; both count only sequences with a real token, and both take the denominator of the
  whole minibatch (verl's ``batch_num_tokens`` / ``global_batch_size``) and multiply by the
  number of ranks (DDP averages gradients).
- tolerances: float64 throughout; the same formula agrees to 1e-12. verl adds 1e-8 to the counts
  it divides by (``masked_mean``, hence its whitening, and ``seq-mean-token-mean``'s token
  counts): there the tolerance is 1e-7 relative, 1e-9 absolute; the same where our aggregation's
  weights (float32, the training dtype) are not powers of two (``1 / |y_i|``, ``1 / C``).
- sampler corrections: verl's IcePop (``rollout_is`` with a ``lower_upper`` threshold) keeps the
  ratio as the weight inside the bounds; our masked corrections give weight 1 there, as verl's
  rejection sampling (``rollout_rs``), which also removes the rejected tokens from the loss's
  denominators (ours keep counting them, with weight 0). verl's log-ratios are clamped to
  [-20, 20] before ``exp``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhf_lightning.advantages import (
    GAE,
    AdvantageInputs,
    GroupNormalized,
    LeaveOneOut,
    RewardsToGo,
    RewardsToGoGroupBaseline,
    rewards_to_go,
    sequence_returns,
)
from rlhf_lightning.kl import kl_penalty
from rlhf_lightning.losses import (
    CISPO,
    GSPO,
    ClippedSurrogate,
    MaskedIS,
    SequenceMaskedIS,
    SequenceMeanTokenMean,
    SequenceMeanTokenSum,
    SequenceTruncatedIS,
    TokenMean,
    TruncatedIS,
    aggregate,
)
from rlhf_lightning.rollout.experience import global_masked_whiten

INSTALL = "bash experiments/peer_parity/install_verl.sh (see experiments/peer_parity/README.md)"
EXACT = {"rtol": 1e-12, "atol": 1e-12}  # the same formula in float64
VERL_EPS = {"rtol": 1e-7, "atol": 1e-9}  # verl adds 1e-8 to the counts it divides by
OURS_F32 = VERL_EPS  # our aggregation weights are float32: 1 / C rounds at 6e-8
SEEDS = [0, 1, 2]
AGGREGATIONS = {  # verl's loss_agg_mode -> ours
    "token-mean": TokenMean(),
    "seq-mean-token-mean": SequenceMeanTokenMean(),
    "seq-mean-token-sum": SequenceMeanTokenSum(normalizer=1.0),
}


@pytest.fixture(scope="module")
def verl():
    """verl's modules, imported once (ray, tensordict and transformers come with them)."""
    core_algos = pytest.importorskip(
        "verl.trainer.ppo.core_algos", reason=f"verl is not installed: {INSTALL}"
    )
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import rollout_corr_helper
    from verl.workers.config import ActorConfig

    class Verl:
        algos = core_algos
        rollout = rollout_corr_helper

        @staticmethod
        def actor(clip_low=0.2, clip_high=0.2, clip_ratio_c=1e30):
            return ActorConfig(
                strategy="fsdp",
                rollout_n=1,
                ppo_micro_batch_size_per_gpu=1,
                clip_ratio_low=clip_low,
                clip_ratio_high=clip_high,
                clip_ratio_c=clip_ratio_c,
            )

        @staticmethod
        def algo(gamma=1.0):
            return AlgoConfig(gamma=gamma)

    return Verl


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


class Batch:
    """A random padded batch in float64: B rows in groups of k, T columns, row 0 full and row 1
    one token long. Our inputs hold NaN / inf on the padding; verl's (``.v``) hold 0 there."""

    def __init__(
        self, seed: int, B: int = 8, T: int = 6, k: int = 4, spread: float = 0.3, gaps=False
    ):
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[0], lengths[1] = T, 1
        self.B, self.T, self.k, self.lengths = B, T, k, lengths
        self.mask = torch.arange(T) < lengths[:, None]
        if gaps:  # masked positions inside the responses (tool output in a multi-turn one)
            self.mask &= torch.rand(B, T, generator=gen) > 0.3
            self.mask[:, 0] = True
        self.index = np.arange(B) // k  # verl's prompt ids
        self.old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 - 0.05
        self.logprobs = self.old + spread * randn(B, T)
        self.ref = self.old + 0.5 * randn(B, T)
        self.sampler = self.old + 0.2 * randn(B, T)
        self.advantages = randn(B, T)
        self.seq_advantages = randn(B, 1).expand(B, T).clone()
        self.values = randn(B, T)
        self.scores = randn(B)
        self.kl_rewards = -0.1 * randn(B, T)  # -beta * KL_t on every token

    def ours(self, x: torch.Tensor, padding: float = math.nan) -> torch.Tensor:
        return torch.where(self.mask, x, padding)

    def v(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, x, 0.0)

    @property
    def vmask(self) -> torch.Tensor:
        return self.mask.double()

    def score_rewards(self, with_kl: bool) -> torch.Tensor:
        """Per-token rewards: the score at each row's last real token (+ the KL terms)."""
        rewards = self.kl_rewards.clone() if with_kl else torch.zeros(self.B, self.T).double()
        last = torch.where(self.mask, torch.arange(self.T), -1).amax(dim=1)
        rewards[torch.arange(self.B), last] += self.scores
        return rewards

    def inputs(self, rewards: torch.Tensor, values: torch.Tensor | None = None):
        return AdvantageInputs(self.ours(rewards), values, self.mask, group_size=self.k)


def close_on_mask(ours, theirs, mask, tol=EXACT):
    torch.testing.assert_close(ours[mask], theirs[mask], **tol)


# ----------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_verl_with_whitened_advantages_and_raw_returns(verl, seed, gamma, lam, gaps):
    """verl's ``compute_gae_advantage_return`` whitens the advantages (``masked_whiten``) and
    returns unwhitened ``A + V``: ours is GAE followed by ``algorithm.whiten_advantages``. Both
    step over masked positions inside a response (``gaps``): the next value of a real token is
    that of the next real one."""
    b = Batch(seed, gaps=gaps)
    rewards = b.score_rewards(with_kl=True)
    values = b.ours(b.values)
    theirs_adv, theirs_ret = verl.algos.compute_gae_advantage_return(
        b.v(rewards), b.v(b.values), b.vmask, gamma, lam
    )
    advantages, returns = GAE(gamma=gamma, lam=lam)(b.inputs(rewards, values))
    close_on_mask(global_masked_whiten(advantages, b.mask), theirs_adv, b.mask, VERL_EPS)
    close_on_mask(returns, theirs_ret, b.mask)


def test_verl_gae_needs_finite_padding_ours_does_not(verl):
    """verl multiplies by the mask, so NaN on the padding reaches the real tokens; ours selects
    with ``torch.where``."""
    b = Batch(0)
    rewards = b.score_rewards(with_kl=True)
    theirs, _ = verl.algos.compute_gae_advantage_return(
        b.ours(rewards), b.ours(b.values), b.vmask, 1.0, 0.95
    )
    ours, _ = GAE(gamma=1.0, lam=0.95)(b.inputs(rewards, b.ours(b.values)))
    assert torch.isnan(theirs[b.mask]).any()
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_verl_with_and_without_the_std(verl, seed, scale_by_std):
    """``compute_grpo_outcome_advantage`` (``norm_adv_by_std_in_grpo``): the same unbiased group
    std and eps 1e-6. The returns carry the KL terms too (both sum them into the return)."""
    b = Batch(seed)
    rewards = b.score_rewards(with_kl=True)
    theirs, _ = verl.algos.compute_grpo_outcome_advantage(
        b.v(rewards), b.vmask, b.index, epsilon=1e-6, norm_adv_by_std_in_grpo=scale_by_std
    )
    ours, _ = GroupNormalized(scale_by_std=scale_by_std, eps=1e-6)(b.inputs(rewards))
    close_on_mask(ours, theirs, b.mask)


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_matches_verl(verl, seed):
    b = Batch(seed)
    rewards = b.score_rewards(with_kl=True)
    theirs, _ = verl.algos.compute_rloo_outcome_advantage(b.v(rewards), b.vmask, b.index)
    ours, _ = LeaveOneOut()(b.inputs(rewards))
    close_on_mask(ours, theirs, b.mask)


@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_verl(verl, seed, gamma, gaps):
    """``compute_reinforce_plus_plus_outcome_advantage``: rewards-to-go, whitened over the
    batch (verl inside the estimator, ours by ``algorithm.whiten_advantages``); both carry the
    return over masked positions inside a response (``gaps``)."""
    b = Batch(seed, gaps=gaps)
    rewards = b.score_rewards(with_kl=True)
    theirs_adv, theirs_ret = verl.algos.compute_reinforce_plus_plus_outcome_advantage(
        b.v(rewards), b.vmask, config=verl.algo(gamma)
    )
    advantages, _ = RewardsToGo(gamma=gamma)(b.inputs(rewards))
    close_on_mask(advantages, theirs_ret, b.mask)
    close_on_mask(global_masked_whiten(advantages, b.mask), theirs_adv, b.mask, VERL_EPS)


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_pp_baseline_matches_verl_when_the_rewards_are_the_score(verl, seed):
    """``compute_reinforce_plus_plus_baseline_outcome_advantage``: score minus the group mean,
    whitened over the batch, when the KL is not in the rewards (``algorithm.kl.reward=null``)."""
    b = Batch(seed)
    rewards = b.score_rewards(with_kl=False)
    theirs, _ = verl.algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        b.v(rewards), b.vmask, b.index
    )
    ours, _ = RewardsToGoGroupBaseline()(b.inputs(rewards))
    close_on_mask(global_masked_whiten(ours, b.mask), theirs, b.mask, VERL_EPS)


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_pp_baseline_with_kl_rewards_differs_from_verl_by_the_kl_before_t(verl, seed):
    """With the KL in the rewards verl puts the whole return ``R_i`` on every token, ours
    ``G_t``: the two agree once each of our tokens gets back the KL before it, ``R_i - G_t``."""
    b = Batch(seed)
    rewards = b.score_rewards(with_kl=True)
    theirs, _ = verl.algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        b.v(rewards), b.vmask, b.index
    )
    ours, _ = RewardsToGoGroupBaseline()(b.inputs(rewards))
    before_t = sequence_returns(b.ours(rewards), b.mask)[:, None] - rewards_to_go(
        b.ours(rewards), b.mask, 1.0
    )
    assert before_t[b.mask].abs().max() > 1e-3  # the difference is there
    close_on_mask(global_masked_whiten(ours + before_t, b.mask), theirs, b.mask, VERL_EPS)


# -------------------------------------------------------------------------------- policy losses
def _compare_policy_loss(verl_fn, config, ours_fn, b, advantages, mode, tol=EXACT):
    """Aggregated loss and its gradient w.r.t. the current logprobs, ours vs verl's."""
    mine = b.ours(b.logprobs).requires_grad_()
    theirs_lp = b.v(b.logprobs).requires_grad_()
    diagnostics = ours_fn(mine, b.ours(b.old), b.ours(advantages, math.inf), b.mask)
    per_token = diagnostics.loss
    agg = AGGREGATIONS[mode]
    loss = aggregate(per_token, agg.token_weights(b.mask), agg.units(b.mask))
    theirs, metrics = verl_fn(b.v(b.old), theirs_lp, b.v(advantages), b.vmask, mode, config)
    torch.testing.assert_close(loss, theirs, **tol)
    loss.backward()
    theirs.backward()
    close_on_mask(mine.grad, theirs_lp.grad, b.mask, tol)
    assert (mine.grad[~b.mask] == 0).all()
    return diagnostics, metrics


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize(
    ("clip_low", "clip_high", "dual_clip"), [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 2.0)]
)
def test_clipped_surrogate_matches_verl(verl, seed, mode, clip_low, clip_high, dual_clip):
    """``compute_policy_loss_vanilla`` with clip-higher and the dual clip, per-token
    advantages, ratios on both sides of the clip. verl always applies its dual clip
    (``clip_ratio_c``): ours without one is verl's with ``clip_ratio_c`` -> infinity (1e30)."""
    b = Batch(seed, spread=0.6)
    config = verl.actor(clip_low, clip_high, clip_ratio_c=dual_clip or 1e30)
    ours = ClippedSurrogate(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    tol = VERL_EPS if mode == "seq-mean-token-mean" else EXACT
    diagnostics, metrics = _compare_policy_loss(
        verl.algos.compute_policy_loss_vanilla, config, ours, b, b.advantages, mode, tol
    )
    clipfrac = float(diagnostics.clipped[b.mask].mean())
    assert 0 < clipfrac < 1
    lower = metrics["actor/pg_clipfrac_lower"] if dual_clip else 0.0
    expected = metrics["actor/pg_clipfrac"] + lower
    assert clipfrac == pytest.approx(expected, abs=1e-6)  # float32 diagnostics


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("per_sequence", [True, False])
def test_gspo_matches_verl(verl, seed, per_sequence):
    """``compute_policy_loss_gspo`` with GSPO's seq-mean-token-mean, one advantage per sequence
    (GSPO's) or per token; clip 0.05 / 0.08 so that some sequences clip. verl clamps the
    sequence log-ratio at 10, here far away."""
    b = Batch(seed, spread=0.2)
    advantages = b.seq_advantages if per_sequence else b.advantages
    diagnostics, metrics = _compare_policy_loss(
        verl.algos.compute_policy_loss_gspo,
        verl.actor(0.05, 0.08),
        GSPO(clip_low=0.05, clip_high=0.08),
        b,
        advantages,
        "seq-mean-token-mean",
        VERL_EPS,
    )
    clipfrac = float(diagnostics.clipped[b.mask].mean())
    assert 0 < clipfrac < 1
    assert clipfrac == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize(("clip_low", "clip_high"), [(0.2, 0.28), (1.0, 0.5)])
def test_cispo_matches_verl(verl, seed, mode, clip_low, clip_high):
    """``compute_policy_loss_cispo``: ``-sg(clip(ratio, 1 - low, 1 + high)) * A * logp``, the
    same value and gradient; its clip fraction counts the tokens whose weight was clipped, as
    ours. (TRL's ``loss_type="cispo"`` caps the ratio at ``epsilon_high`` with no lower bound:
    ours with ``clip_low=1``, ``clip_high=epsilon_high - 1``.)"""
    b = Batch(seed, spread=0.6)
    tol = VERL_EPS if mode == "seq-mean-token-mean" else EXACT
    diagnostics, metrics = _compare_policy_loss(
        verl.algos.compute_policy_loss_cispo,
        verl.actor(clip_low, clip_high),
        CISPO(clip_low=clip_low, clip_high=clip_high),
        b,
        b.advantages,
        mode,
        tol,
    )
    clipfrac = float(diagnostics.clipped[b.mask].mean())
    assert 0 < clipfrac < 1
    assert clipfrac == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)


# ----------------------------------------------------------------------------------------- KL
VERL_KL_NAMES = {"k1": "k1", "abs": "abs", "k2": "mse", "k3": "low_var_kl", "k3_plus": "k3+"}


def _kl_pair(verl, kind, clamp, log_ratio):
    ref = torch.full_like(log_ratio, -2.0)
    mine = (ref + log_ratio).requires_grad_()
    theirs_lp = (ref + log_ratio).requires_grad_()
    ours = kl_penalty(mine, ref, kind, clamp)
    theirs = verl.algos.kl_penalty(theirs_lp, ref, VERL_KL_NAMES[kind])
    ours.sum().backward()
    theirs.sum().backward()
    return ours, theirs, mine.grad, theirs_lp.grad


@pytest.mark.parametrize("kind", list(VERL_KL_NAMES))
def test_kl_estimators_match_verl_inside_its_clamps(verl, kind):
    """k1, abs, k2 ("mse"), k3 ("low_var_kl"), k3+ on log-ratios in [-2.5, 3] (k3 < 10 there):
    values and gradients w.r.t. the policy's logprobs, without our clamp."""
    log_ratio = torch.linspace(-2.5, 3.0, 45, dtype=torch.float64)
    ours, theirs, grad, theirs_grad = _kl_pair(verl, kind, None, log_ratio)
    torch.testing.assert_close(ours, theirs, **EXACT)
    torch.testing.assert_close(grad, theirs_grad, **EXACT)


def test_k3_with_clamp_10_is_verls_low_var_kl_everywhere(verl):
    """verl clamps k3's log-ratio to [-20, 20] and its value to [-10, 10]: ours with
    ``algorithm.kl.clamp=10`` gives the same values and gradients out to |log-ratio| = 30."""
    log_ratio = torch.linspace(-30.0, 30.0, 121, dtype=torch.float64)
    ours, theirs, grad, theirs_grad = _kl_pair(verl, "k3", 10.0, log_ratio)
    assert (theirs == 10).any()  # the clamp bites
    torch.testing.assert_close(ours, theirs, **EXACT)
    torch.testing.assert_close(grad, theirs_grad, **EXACT)


def test_k3_plus_where_the_clamp_bites_verl_keeps_k2s_gradient_ours_is_zero(verl):
    """Same values with ``clamp=10``; where k3 > 10 verl's "k3+" still passes k2's gradient
    ``d`` (its clamp acts on the detached value only), ours is clamped as a whole (gradient 0)."""
    log_ratio = torch.linspace(-15.0, 5.0, 81, dtype=torch.float64)
    ours, theirs, grad, theirs_grad = _kl_pair(verl, "k3_plus", 10.0, log_ratio)
    torch.testing.assert_close(ours, theirs, **EXACT)
    bites = theirs.detach() >= 10
    assert bites.any() and (~bites).any()
    torch.testing.assert_close(grad[~bites], theirs_grad[~bites], **EXACT)
    assert (grad[bites] == 0).all()
    torch.testing.assert_close(theirs_grad[bites], log_ratio[bites], **EXACT)


# -------------------------------------------------------------------------------- aggregations
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_aggregations_match_verls_agg_loss(verl, seed, mode):
    """token-mean, seq-mean-token-mean, seq-mean-token-sum on a batch with an all-padding row
    (both leave it out of the sequence count)."""
    b = Batch(seed)
    mask = b.mask.clone()
    mask[3] = False
    losses = b.advantages.clone()
    agg = AGGREGATIONS[mode]
    ours = aggregate(torch.where(mask, losses, 0.0), agg.token_weights(mask), agg.units(mask))
    theirs = verl.algos.agg_loss(losses, mask.double(), mode)
    tol = VERL_EPS if mode == "seq-mean-token-mean" else EXACT
    torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [None, 16])
def test_seq_mean_token_sum_norm_is_ours_with_the_normalizer(verl, seed, scale):
    """verl's ``seq-mean-token-sum-norm``: the sequence mean (over the sequences with a real
    token) of the token sums, divided by ``loss_scale_factor``, by default the mask's width --
    our ``seq_mean_token_sum`` with that normalizer (we set it to ``max_new_tokens``)."""
    b = Batch(seed)
    ours_agg = SequenceMeanTokenSum(normalizer=float(scale or b.T))
    ours = aggregate(b.v(b.advantages), ours_agg.token_weights(b.mask), ours_agg.units(b.mask))
    theirs = verl.algos.agg_loss(
        b.advantages, b.vmask, "seq-mean-token-sum-norm", loss_scale_factor=scale
    )
    torch.testing.assert_close(ours, theirs, **OURS_F32)
    per_sequence = b.v(b.advantages).sum(dim=1).mean() / (scale or b.T)
    torch.testing.assert_close(theirs, per_sequence, **EXACT)


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_both_divide_micro_batches_and_ranks_by_the_whole_minibatch(verl, mode):
    """verl's ``agg_loss`` with the global ``batch_num_tokens`` / ``global_batch_size`` and
    ``dp_size`` equals ours with the all-rank denominator times the world size (the module's
    ``loss * world``: DDP averages gradients): two ranks of two micro-batches each."""
    b = Batch(1, B=8)
    agg = AGGREGATIONS[mode]
    losses = b.v(b.advantages)
    denominator = agg.units(b.mask)
    global_info = {"batch_num_tokens": int(b.mask.sum()), "global_batch_size": int(denominator)}
    whole = aggregate(losses, agg.token_weights(b.mask), denominator)
    ours_total, theirs_total = 0.0, 0.0
    for rank_rows in (torch.arange(0, 4), torch.arange(4, 8)):
        for rows in rank_rows.split(2):
            m = b.mask[rows]
            ours_total += aggregate(losses[rows], agg.token_weights(m), denominator) * 2
            theirs_total += verl.algos.agg_loss(
                losses[rows], m.double(), mode, dp_size=2, **global_info
            )
    tol = VERL_EPS if mode == "seq-mean-token-mean" else EXACT
    torch.testing.assert_close(torch.as_tensor(ours_total), torch.as_tensor(theirs_total), **tol)
    torch.testing.assert_close(torch.as_tensor(ours_total) / 2, whole, **EXACT)  # DDP's mean


# ------------------------------------------------------------------------- sampler corrections
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cap", [1.1, 1.25])
def test_truncated_is_matches_verl_at_token_and_sequence_level(verl, seed, cap):
    """``compute_rollout_correction_weights`` with ``rollout_is="token"`` / ``"sequence"`` and
    a single threshold (TIS): ``min(ratio, cap)`` per token, or the sequence's product."""
    b = Batch(seed)
    log_ratio = b.v(b.old - b.sampler)
    for level, ours_fn in (("token", TruncatedIS(cap)), ("sequence", SequenceTruncatedIS(cap))):
        theirs, _ = verl.rollout.compute_rollout_correction_weights(
            log_ratio, b.vmask, rollout_is=level, rollout_is_threshold=cap
        )
        ours, cut = ours_fn(b.ours(b.old), b.ours(b.sampler, math.inf), b.mask)
        torch.testing.assert_close(ours, theirs, **EXACT)
        assert cut.any() and (b.mask & ~cut).any()


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_is_matches_verls_rejection_sampling(verl, seed):
    """``compute_rollout_rejection_mask``: ``token_k1`` (our ``MaskedIS``), ``seq_sum_k1``
    (``SequenceMaskedIS``) and ``seq_mean_k1`` (``geometric``). verl's k1 statistic is
    ``log(pi_sampler / pi_old)`` with bounds ``lower_upper`` on that ratio: ours ``[low, high]``
    on ``pi_old / pi_sampler`` is verl's ``1/high _ 1/low``."""
    b = Batch(seed)
    log_ratio = b.v(b.old - b.sampler)
    cases = (
        ("token_k1", MaskedIS(low=0.8, high=1.25)),
        ("seq_sum_k1", SequenceMaskedIS(low=0.6, high=1.5)),
        ("seq_mean_k1", SequenceMaskedIS(low=0.9, high=1.1, geometric=True)),
    )
    for option, ours_fn in cases:
        threshold = f"{1 / ours_fn.high}_{1 / ours_fn.low}"
        theirs, _ = verl.rollout.compute_rollout_rejection_mask(
            log_ratio, b.vmask, rollout_rs=option, rollout_rs_threshold=threshold
        )
        ours, cut = ours_fn(b.ours(b.old), b.ours(b.sampler, math.inf), b.mask)
        torch.testing.assert_close(ours, theirs, check_dtype=False, **EXACT)  # 0 and 1
        assert cut.any() and (b.mask & ~cut).any(), option


def test_verls_icepop_keeps_the_ratio_ours_masks_to_weight_one(verl):
    """verl's ``rollout_is`` with a ``lower_upper`` threshold (IcePop) zeroes the tokens outside
    the bounds and keeps the ratio as the weight inside; ``MaskedIS`` gives weight 1 inside:
    ours times the ratio is verl's."""
    b = Batch(0)
    log_ratio = b.v(b.old - b.sampler)
    theirs, _ = verl.rollout.compute_rollout_correction_weights(
        log_ratio, b.vmask, rollout_is="token", rollout_is_threshold="0.8_1.25"
    )
    ours, _ = MaskedIS(low=0.8, high=1.25)(b.ours(b.old), b.ours(b.sampler), b.mask)
    torch.testing.assert_close(ours * torch.exp(log_ratio), theirs, **EXACT)
    assert ((ours == 0) & b.mask).any()


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_sampler_weights_scale_the_per_token_loss_as_verls_rollout_is_weights(verl, mode):
    """verl multiplies the per-token policy loss by ``rollout_is_weights`` before aggregating,
    as the module does with a sampler correction's weights."""
    b = Batch(2, spread=0.6)
    weights, _ = SequenceTruncatedIS(cap=1.5)(b.ours(b.old), b.ours(b.sampler), b.mask)
    mine = b.ours(b.logprobs).requires_grad_()
    theirs_lp = b.v(b.logprobs).requires_grad_()
    ours_fn = ClippedSurrogate(clip_low=0.2, clip_high=0.28)
    per_token = ours_fn(mine, b.ours(b.old), b.ours(b.advantages), b.mask).loss
    agg = AGGREGATIONS[mode]
    loss = aggregate(per_token * weights, agg.token_weights(b.mask), agg.units(b.mask))
    theirs, _ = verl.algos.compute_policy_loss_vanilla(
        b.v(b.old),
        theirs_lp,
        b.v(b.advantages),
        b.vmask,
        mode,
        verl.actor(0.2, 0.28),
        rollout_is_weights=weights,
    )
    tol = VERL_EPS if mode == "seq-mean-token-mean" else EXACT
    torch.testing.assert_close(loss, theirs, **tol)
    loss.backward()
    theirs.backward()
    close_on_mask(mine.grad, theirs_lp.grad, b.mask, tol)
