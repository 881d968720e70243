"""PPO's experience and update against hand or naive computations: the KL penalty in the
rewards (a reference that differs from the policy), the sampling temperature in every logprob,
reward whitening and clipping, the loss terms of a minibatch, the entropy bonus, the KL as a
loss, the critic warm-up step, gradient clipping, the target-KL early stop, the adaptive KL
controller, the two learning-rate groups and the warm-up schedule.

The tests without a Trainer are fast; the mutation run (README, Development) uses this file.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import lightning as L
import pytest
import torch

from rlhf_lightning.kl import AdaptiveKLController
from rlhf_lightning.models.masking import position_ids_from_mask
from rlhf_lightning.rollout.experience import make_experience
from rlhf_lightning.rollout.generation import Rollout
from rlhf_lightning.stats import Stats
from tests.ppo_helpers import (
    fit,
    perturb_reference,
    prompt_batch,
    replace_cfg,
    rollout_and_experience,
    tiny_config,
    tiny_ppo_module,
)


@torch.no_grad()
def naive_log_softmax(lm, exp, temperature: float) -> torch.Tensor:
    """(B, R, V) log_softmax(logits / T) of a full forward, at the positions predicting the
    response tokens."""
    mask = exp.attention_mask
    logits = lm(
        input_ids=exp.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
    ).logits
    return torch.log_softmax(logits[:, exp.prompt_len - 1 : -1].float() / temperature, dim=-1)


def naive_logprobs(lm, exp, temperature: float) -> torch.Tensor:
    """(B, R) log-probabilities of the response tokens under softmax(logits / T)."""
    logp = naive_log_softmax(lm, exp, temperature)
    return logp.gather(-1, exp.response_ids.unsqueeze(-1)).squeeze(-1)


def naive_entropy(lm, exp, temperature: float) -> torch.Tensor:
    """(B, R) entropy of softmax(logits / T)."""
    logp = naive_log_softmax(lm, exp, temperature)
    return -(logp.exp() * logp).sum(dim=-1)


def distinct_characters(prompts, responses):
    """A score that varies between the tiny model's responses (its 'e' fraction is mostly 0)."""
    return [len(set(r)) / 10 for r in responses]


def score_at_last_token(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, R) zeros with each row's score at its last real token."""
    out = torch.zeros(mask.shape)
    for row in range(mask.shape[0]):
        out[row, int(mask[row].nonzero().max())] = float(scores[row])
    return out


# ------------------------------------------------------------------------- experience
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_in_the_rewards_matches_a_naive_computation(estimator):
    """r_t = -beta * KL_t on every response token plus the score at the last one, with KL_t
    the reward term's estimator from a full forward of the policy and of a reference that
    differs from it; the experience's ``kl`` is the log-ratio (k1) whatever the estimator."""
    beta = 0.3
    cfg = tiny_config(
        algorithm__kl__reward__estimator=estimator,
        algorithm__kl__allow_biased_gradient=True,  # k3 in the reward: a value, biased gradient
        generation__stop_token="a",
    )
    module = tiny_ppo_module(cfg)
    perturb_reference(module)
    _, exp = rollout_and_experience(module, n=8, kl_coef=beta)
    mask = exp.response_mask
    assert mask.sum(dim=1).unique().numel() > 1  # responses of different lengths
    d = naive_logprobs(module.policy.lm, exp, 1.0) - naive_logprobs(module.ref_lm, exp, 1.0)
    kl = d if estimator == "k1" else torch.exp(-d) - 1 + d
    assert kl[mask].abs().mean() > 1e-2  # the reference differs: the penalty is not 0
    raw_scores = torch.as_tensor(module.reward(exp.prompts, exp.responses))
    expected = torch.where(mask, -beta * kl, 0.0) + score_at_last_token(raw_scores, mask)
    torch.testing.assert_close(exp.kl[mask], d[mask], rtol=1e-4, atol=1e-5)  # logged: k1
    assert (exp.kl[~mask] == 0).all()
    torch.testing.assert_close(exp.rewards, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exp.scores, raw_scores)


@pytest.mark.parametrize("temperature", [0.7, 1.7])
def test_every_logprob_uses_the_sampling_temperature(temperature):
    """Old, reference and sampler logprobs equal log_softmax(logits / T) computed naively; the
    update's logprobs do too, so the first minibatch's ratio is exactly 1; the entropy is that
    of softmax(logits / T)."""
    cfg = tiny_config(
        generation__temperature=temperature,
        generation__stop_token="a",
        budget__micro_batch_size=4,
    )
    module = tiny_ppo_module(cfg)
    perturb_reference(module)
    rollout, exp = rollout_and_experience(module)
    mask = exp.response_mask
    old = naive_logprobs(module.policy.lm, exp, temperature)
    ref = naive_logprobs(module.ref_lm, exp, temperature)
    torch.testing.assert_close(exp.old_logprobs[mask], old[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exp.ref_logprobs[mask], ref[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rollout.sampler_logprobs[mask], old[mask], rtol=1e-4, atol=1e-4)
    # T = 1 gives visibly different numbers: the checks above see the temperature.
    assert (naive_logprobs(module.policy.lm, exp, 1.0) - old)[mask].abs().max() > 0.05

    rows = torch.arange(8)
    out = module.minibatch_backward(exp, rows, False, iteration=0)
    assert out is not None
    stats = out.reduce()
    assert stats["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert stats["policy/approx_kl"] == pytest.approx(0.0, abs=1e-10)
    entropy = naive_entropy(module.policy.lm, exp, temperature)[rows][mask[rows]]
    assert stats["policy/entropy"] == pytest.approx(float(entropy.mean()), rel=1e-4)


def test_whiten_rewards_scales_the_token_rewards_to_std_one_and_keeps_their_mean():
    beta = 0.2
    cfg = tiny_config("reinforce_rtg", algorithm__whiten_rewards=True, generation__stop_token="a")
    module = tiny_ppo_module(cfg)
    perturb_reference(module)
    _, exp = rollout_and_experience(module, n=8, kl_coef=beta)
    mask = exp.response_mask
    raw = torch.where(mask, -beta * exp.kl, 0.0) + score_at_last_token(exp.scores, mask)
    real = raw[mask].tolist()
    mean, std = statistics.mean(real), statistics.stdev(real)
    assert abs(mean) > 1e-3 and abs(std - 1) > 0.05  # whitening changes these rewards
    expected = [(r - mean) / math.sqrt(std**2 + 1e-8) + mean for r in real]
    assert exp.rewards[mask].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert (exp.rewards[~mask] == 0).all()
    # The advantages (rewards-to-go, gamma 1) are made from the whitened rewards.
    for row in range(len(exp)):
        rewards = exp.rewards[row][mask[row]].tolist()
        to_go = [sum(rewards[t:]) for t in range(len(rewards))]
        assert exp.advantages[row][mask[row]].tolist() == pytest.approx(to_go, abs=1e-5)


def _hand_rollout(module, ended):
    batch = prompt_batch(module.tokenizer, 3)
    response_ids = torch.tensor([[10, 11, 12, 0], [13, 14, 15, 16], [18, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    return Rollout(
        batch["input_ids"], batch["attention_mask"], response_ids, mask, torch.tensor(ended),
        batch["prompts"], ["", "", ""],
    )  # fmt: skip


def test_score_clip_clamps_the_scores_after_the_missing_eos_penalty():
    cfg = tiny_config(
        algorithm__score_clip=1.0,
        algorithm__missing_eos_penalty=-3.0,
        generation__stop_token="eos",
    )
    module = tiny_ppo_module(cfg)
    rollout = _hand_rollout(module, [True, False, True])
    scores = torch.tensor([5.0, 0.5, -0.3])
    exp = make_experience(module.policy, module.ref_lm, rollout, scores, module.cfg)
    # row 0: 5 -> 1; row 1 never ended: -3 -> -1; row 2 inside the range.
    assert exp.scores.tolist() == pytest.approx([1.0, -1.0, -0.3])
    expected = torch.zeros(3, 4)
    expected[0, 2], expected[1, 3], expected[2, 0] = 1.0, -1.0, -0.3
    torch.testing.assert_close(exp.rewards, expected)
    cfg = tiny_config(algorithm__score_clip=2.0)
    module = tiny_ppo_module(cfg)
    rollout = _hand_rollout(module, [True, False, True])
    exp = make_experience(module.policy, module.ref_lm, rollout, scores, module.cfg)
    assert exp.scores.tolist() == pytest.approx([2.0, 0.5, -0.3])


# ------------------------------------------------------------------------- loss terms
def _terms(stats: Stats) -> dict[str, float]:
    return {
        k.removeprefix("optim/loss_"): v
        for k, v in stats.reduce().items()
        if k.startswith("optim/loss_")
    }


def test_a_minibatch_of_one_sequence_under_a_sequence_mean_is_that_sequence_s_loss():
    """One row, sequence-mean aggregation: one unit in the denominator, so at ratio 1 the
    policy loss is minus the row's token-mean advantage (nothing divides it further)."""
    cfg = tiny_config(
        generation__stop_token="a",
        algorithm__loss_aggregation={"_target_": "rlhf_lightning.losses.SequenceMeanTokenMean"},
    )
    module = tiny_ppo_module(cfg)
    _, exp = rollout_and_experience(module)
    row = 3
    out = module.minibatch_backward(exp, torch.tensor([row]), False, iteration=0)
    assert out is not None
    advantages = exp.advantages[row][exp.response_mask[row]]
    assert abs(float(advantages.mean())) > 1e-3
    assert _terms(out)["policy"] == pytest.approx(-float(advantages.mean()), abs=1e-6)


def test_first_minibatch_loss_terms_match_hand_computations():
    """At the rollout's own parameters (ratio 1, V = V_old): policy = -mean A, value =
    0.5 * mean (V - R)^2, total = policy + coef * value, over the minibatch's real tokens, for
    micro-batches of 2 rows."""
    cfg = tiny_config(generation__stop_token="a", budget__micro_batch_size=2)
    module = tiny_ppo_module(cfg)
    torch.nn.init.normal_(module.policy.value_head.weight, std=0.5)  # values that are not 0
    _, exp = rollout_and_experience(module)
    rows = torch.tensor([0, 3, 4, 7, 9, 10, 12, 15])
    out = module.minibatch_backward(exp, rows, False, iteration=0)
    assert out is not None
    mask = exp.response_mask[rows]
    advantages = exp.advantages[rows][mask]
    errors = (exp.old_values - exp.returns)[rows][mask]
    assert errors.abs().max() > 0.1  # a real value loss
    terms = _terms(out)
    assert terms["policy"] == pytest.approx(-float(advantages.mean()), abs=1e-6)
    assert terms["value"] == pytest.approx(0.5 * float((errors**2).mean()), rel=1e-5)
    coef = cfg.algorithm.value_model.coef
    assert terms["total"] == pytest.approx(terms["policy"] + coef * terms["value"], abs=1e-6)
    assert "kl" not in terms  # the KL is in the rewards (placement: reward)
    stats = out.reduce()
    assert stats["policy/clipfrac"] == 0.0 and stats["value/clipfrac"] == 0.0


def test_loss_terms_and_diagnostics_after_a_step_match_hand_computations():
    """After one large step the ratios and values have moved: the clipped policy loss, the
    clipped value loss, the ratio mean and max, the approx KL and both clip fractions equal
    their formulas over the minibatch's real tokens (micro-batches of 4 rows)."""
    cfg = tiny_config(
        generation__stop_token="a",
        budget__micro_batch_size=4,
        algorithm__optimizer__lr=0.05,
        algorithm__value_model__lr=0.05,
    )
    module = tiny_ppo_module(cfg, reward=distinct_characters)
    _, exp = rollout_and_experience(module)
    rows = torch.tensor([1, 2, 5, 6, 8, 11, 13, 14])
    optimizer = _optimizer(module)
    assert module.minibatch_backward(exp, torch.arange(8), False, iteration=0) is not None
    module.optimizer_step(optimizer, warmup=False)
    module.policy.zero_grad(set_to_none=True)
    out = module.minibatch_backward(exp, rows, False, iteration=0)
    assert out is not None
    stats, terms = out.reduce(), _terms(out)

    mask = exp.response_mask[rows]
    log_ratio = (naive_logprobs(module.policy.lm, exp, 1.0)[rows] - exp.old_logprobs[rows])[mask]
    ratio, adv = log_ratio.exp(), exp.advantages[rows][mask]
    clipped = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert 0 < float(clipped.float().mean()) < 1  # some tokens clipped, some not
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
    assert terms["policy"] == pytest.approx(float(policy), rel=1e-4, abs=1e-6)
    assert stats["policy/ratio_max"] == pytest.approx(float(ratio.max()), rel=1e-4)
    assert stats["policy/ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-4)
    assert stats["policy/approx_kl"] == pytest.approx(float((0.5 * log_ratio**2).mean()), rel=1e-3)
    assert stats["policy/clipfrac"] == pytest.approx(float(clipped.float().mean()))

    with torch.no_grad():
        _, values = module.policy(exp.input_ids, exp.attention_mask, response_start=exp.prompt_len)
    values, old, returns = values[rows][mask], exp.old_values[rows][mask], exp.returns[rows][mask]
    bounded = old + (values - old).clamp(-0.2, 0.2)
    value_clipped = (bounded - returns) ** 2 > (values - returns) ** 2
    assert 0 < float(value_clipped.float().mean()) < 1
    value = 0.5 * torch.maximum((values - returns) ** 2, (bounded - returns) ** 2).mean()
    assert terms["value"] == pytest.approx(float(value), rel=1e-4)
    assert stats["value/clipfrac"] == pytest.approx(float(value_clipped.float().mean()))
    coef = cfg.algorithm.value_model.coef
    assert terms["total"] == pytest.approx(terms["policy"] + coef * terms["value"], abs=1e-6)


def test_kl_as_a_loss_term_matches_a_naive_k2():
    """A KL loss term and none in the rewards: the loss gets beta * mean_t 0.5 * (logp -
    ref)^2."""
    beta = 0.2
    cfg = tiny_config(
        "grpo",
        algorithm__kl__loss__estimator="k2",
        algorithm__samples_per_prompt=2,
        generation__stop_token="a",
    )
    module = tiny_ppo_module(cfg)
    perturb_reference(module)
    _, exp = rollout_and_experience(module, kl_coef=beta)
    mask = exp.response_mask
    raw_scores = torch.as_tensor(module.reward(exp.prompts, exp.responses))
    torch.testing.assert_close(exp.rewards, score_at_last_token(raw_scores, mask))
    rows = torch.arange(8)
    out = module.minibatch_backward(exp, rows, False, iteration=0)
    assert out is not None
    d = naive_logprobs(module.policy.lm, exp, 1.0) - naive_logprobs(module.ref_lm, exp, 1.0)
    k2 = 0.5 * d[rows] ** 2  # GRPO aggregates per sequence: mean over tokens, then sequences
    per_sequence = [float(k2[i][mask[rows][i]].mean()) for i in range(len(rows))]
    terms = _terms(out)
    assert terms["kl"] == pytest.approx(statistics.mean(per_sequence), rel=1e-4)
    assert terms["total"] == pytest.approx(terms["policy"] + beta * terms["kl"], abs=1e-6)


def _mean_entropy(module, exp) -> float:
    entropy = naive_entropy(module.policy.lm, exp, module.cfg.generation.temperature)
    return float(entropy[exp.response_mask].mean())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_step_on_the_entropy_bonus_alone_raises_the_entropy(temperature):
    """Advantages 0 and no value model or KL: the loss is -ent_coef * entropy, and a gradient
    step on it raises the entropy; optim/loss_entropy is the mean entropy of softmax(logits / T)."""
    cfg = tiny_config("reinforce", algorithm__ent_coef=1.0, generation__temperature=temperature)
    module = tiny_ppo_module(cfg)
    with torch.no_grad():  # a sharper policy than the random one, whose entropy is near log V
        module.policy.lm.lm_head.weight.mul_(4.0)
    _, exp = rollout_and_experience(module)
    exp.advantages = torch.zeros_like(exp.advantages)
    before = _mean_entropy(module, exp)
    rows = torch.arange(len(exp))
    out = module.minibatch_backward(exp, rows, False, iteration=0)
    assert out is not None
    terms = _terms(out)
    assert terms["entropy"] == pytest.approx(before, rel=1e-4)
    assert terms["total"] == pytest.approx(-terms["entropy"], rel=1e-5)
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
    assert _mean_entropy(module, exp) > before + 0.01


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_left_padded_prompts_get_the_logprobs_of_their_row_alone(temperature):
    """Prompts of different lengths are left-padded into one batch; every row's old and
    reference logprobs equal those of a forward of that row alone, without padding (the
    attention mask and the position ids reach both forwards)."""
    cfg = tiny_config(generation__stop_token="a", generation__temperature=temperature)
    module = tiny_ppo_module(cfg)
    perturb_reference(module)
    prompts = ["p0:", "p1: a longer prompt with many more tokens in it:", "p2: medium length:"]
    _, exp = rollout_and_experience(module, kl_coef=0.1, prompts=prompts)
    assert (exp.query_mask == 0).any()  # some rows are left-padded
    for row in range(len(prompts)):
        alone = exp.select(torch.tensor([row]))  # its own columns only: no padding
        assert bool(alone.query_mask.all())
        real = alone.response_mask[0]
        r = real.shape[0]
        for lm, logprobs in (
            (module.policy.lm, exp.old_logprobs),
            (module.ref_lm, exp.ref_logprobs),
        ):
            expected = naive_logprobs(lm, alone, temperature)[0]
            torch.testing.assert_close(
                logprobs[row, :r][real], expected[real], rtol=1e-4, atol=1e-5
            )


def test_sequence_kl_sums_each_rows_token_kl():
    from rlhf_lightning.kl import sequence_kl

    module = tiny_ppo_module(tiny_config(generation__stop_token="a"))
    perturb_reference(module)
    _, exp = rollout_and_experience(module, n=4, kl_coef=0.1)
    expected = [sum(exp.kl[b][exp.response_mask[b]].tolist()) for b in range(4)]
    assert sequence_kl(
        exp.old_logprobs, exp.ref_logprobs, exp.response_mask
    ).tolist() == pytest.approx(expected, rel=1e-5)


def test_a_one_sequence_minibatch_is_its_own_mean():
    """A minibatch of one row (seq-mean aggregation: 1 unit) is divided by 1."""
    module = tiny_ppo_module(tiny_config("rloo", algorithm__samples_per_prompt=2))
    _, exp = rollout_and_experience(module, n=4)
    out = module.minibatch_backward(exp, torch.tensor([2]), False, iteration=0)
    assert out is not None
    row = exp.advantages[2][exp.response_mask[2]]
    assert _terms(out)["policy"] == pytest.approx(-float(row.mean()), rel=1e-5)


class _NaNInMicroBatch:
    """Wraps the module's objective: the ``which``-th micro-batch's loss is NaN."""

    def __init__(self, module, which: int) -> None:
        self.inner, self.which, self.calls = module.objective, which, 0

    def __call__(self, *args, **kwargs):
        loss, terms = self.inner(*args, **kwargs)
        self.calls += 1
        return (loss * float("nan"), terms) if self.calls == self.which else (loss, terms)


@pytest.mark.parametrize("which", [1, 2])
def test_a_nonfinite_later_micro_batch_fails_the_whole_minibatch(which):
    from rlhf_lightning.modules.ppo import NonFiniteError

    cfg = tiny_config(budget__micro_batch_size=4)
    module = tiny_ppo_module(cfg)
    _, exp = rollout_and_experience(module, n=8)
    module.objective = _NaNInMicroBatch(module, which)
    message = r"^non-finite loss at iteration 3; the last good checkpoint is kept$"
    with pytest.raises(NonFiniteError, match=message):
        module.minibatch_backward(exp, torch.arange(8), False, iteration=3)
    module = tiny_ppo_module(
        tiny_config(budget__micro_batch_size=4, algorithm__on_nonfinite="skip")
    )
    objective = module.objective
    for skips in (1, 2):  # each skipped minibatch is counted, and gives no metrics
        module.objective = _NaNInMicroBatch(module, which)
        assert module.minibatch_backward(exp, torch.arange(8), False, iteration=3) is None
        assert module.nonfinite_skips == skips
        module.objective = objective


def test_a_nonfinite_loss_in_training_names_its_iteration():
    from rlhf_lightning.modules.ppo import NonFiniteError

    module = tiny_ppo_module(tiny_config(budget__num_iterations=2))
    module.objective = _NaNInMicroBatch(module, which=5)  # 4 micro-batches per iteration
    with pytest.raises(NonFiniteError, match="^non-finite loss at iteration 1; "):
        fit(module, max_epochs=2)


# ------------------------------------------------------------------------- optimizer step
def _optimizer(module):
    (optimizer,), _ = module.configure_optimizers()
    return optimizer


def test_warmup_step_trains_the_value_head_alone_and_leaves_the_policy_state_empty():
    cfg = tiny_config(algorithm__value_model__warmup_iterations=1)
    module = tiny_ppo_module(cfg, reward=lambda prompts, responses: [len(r) for r in responses])
    _, exp = rollout_and_experience(module)
    optimizer = _optimizer(module)
    lm_before = [p.detach().clone() for p in module.policy.lm.parameters()]
    head_before = module.policy.value_head.weight.detach().clone()
    out = module.minibatch_backward(exp, torch.arange(8), True, iteration=0)
    assert out is not None
    terms = _terms(out)
    coef = cfg.algorithm.value_model.coef
    assert terms["value"] > 0 and terms["total"] == pytest.approx(coef * terms["value"])
    assert "policy/ratio_mean" not in out.reduce()  # no policy statistics in warm-up
    module.optimizer_step(optimizer, warmup=True)
    assert all(torch.equal(a, b) for a, b in zip(module.policy.lm.parameters(), lm_before))
    assert not torch.equal(module.policy.value_head.weight, head_before)
    assert all(p not in optimizer.state for p in module.policy.lm.parameters())
    # A normal step moves the policy.
    optimizer.zero_grad()
    assert module.minibatch_backward(exp, torch.arange(8, 16), False, iteration=1) is not None
    module.optimizer_step(optimizer, warmup=False)
    assert any(not torch.equal(a, b) for a, b in zip(module.policy.lm.parameters(), lm_before))


@pytest.mark.parametrize("warmup", [False, True])
def test_the_value_loss_reaches_the_shared_trunk_only_outside_warmup(warmup):
    """Through the module's loss (shared value head): outside warm-up the value loss's gradient
    reaches the policy LM, so the LM's gradient changes with ``value_model.coef``; in warm-up the
    LM gets no gradient at all (the policy terms weigh 0 and the trunk is detached)."""
    module = tiny_ppo_module(tiny_config())
    torch.nn.init.normal_(module.policy.value_head.weight)  # values, and their loss, non-trivial
    _, exp = rollout_and_experience(module, n=8)

    def lm_grads(coef: float) -> list[torch.Tensor]:
        value_model = dataclasses.replace(module.cfg.algorithm.value_model, coef=coef)
        replace_cfg(module, "algorithm", value_model=value_model)
        module.policy.zero_grad(set_to_none=True)
        assert module.minibatch_backward(exp, torch.arange(8), warmup, iteration=0) is not None
        return [
            torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for p in module.policy.lm.parameters()
        ]

    with_value = lm_grads(1.0)
    if warmup:
        assert all(not g.any() for g in with_value)
    else:
        without = lm_grads(0.0)
        assert any(not torch.allclose(a, b) for a, b in zip(without, with_value))


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_gradient_norm_is_logged_before_clipping_and_clipped_to_the_maximum(max_grad_norm):
    cfg = tiny_config(algorithm__max_grad_norm=max_grad_norm)
    module = tiny_ppo_module(cfg)
    _, exp = rollout_and_experience(module, n=8)
    optimizer = _optimizer(module)
    stats = module.minibatch_backward(exp, torch.arange(8), False, iteration=0)
    assert stats is not None
    grads = [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    assert norm > 1e-2
    captured = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: captured.append(
            [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]
        )
    )
    stats.merge(module.optimizer_step(optimizer, warmup=False))
    reduced = stats.reduce()
    assert reduced["optim/grad_norm"] == pytest.approx(norm, rel=1e-5)
    (stepped,) = captured
    if max_grad_norm is None:
        assert reduced["optim/clipped_frac"] == 0.0
        assert all(torch.equal(a, b) for a, b in zip(stepped, grads))
    else:
        assert reduced["optim/clipped_frac"] == 1.0
        clipped = float(torch.sqrt(sum((g.double() ** 2).sum() for g in stepped)))
        assert clipped == pytest.approx(max_grad_norm, rel=1e-3)


# ------------------------------------------------------------------------- with a Trainer
@pytest.mark.parametrize("target_kl, epochs_done", [(1e-9, 1), (1e9, 4)])
def test_target_kl_stops_the_epoch_loop_early(target_kl, epochs_done):
    """4 epochs of 2 minibatches; after the first epoch its approx KL (> 0 once the policy has
    stepped) exceeds a tiny target: the loop stops, with 2 optimizer steps instead of 8."""
    cfg = tiny_config(budget__num_iterations=1, algorithm__epochs=4, algorithm__target_kl=target_kl)
    trainer, history = fit(tiny_ppo_module(cfg), max_epochs=1)
    assert history[0]["policy/approx_kl"] > 0
    assert history[0]["policy/epochs"] == epochs_done
    assert trainer.global_step == 2 * epochs_done


class PolicySnapshots(L.Callback):
    """The policy LM's parameters at the end of every iteration."""

    def __init__(self) -> None:
        self.lm: list[list[torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, module) -> None:
        self.lm.append([p.detach().clone() for p in module.policy.lm.parameters()])


def test_a_warmup_iteration_keeps_the_policy_and_runs_every_epoch():
    """Iteration 0 (warm-up) trains only the value head: the policy, with AdamW's weight decay,
    stays bit-identical, and target_kl (no policy KL in warm-up) does not stop it; iteration 1
    trains the policy and stops after its first epoch."""
    cfg = tiny_config(
        budget__num_iterations=2,
        algorithm__epochs=2,
        algorithm__target_kl=1e-9,
        algorithm__value_model__warmup_iterations=1,
        algorithm__optimizer__weight_decay=0.1,  # would shrink a policy AdamW stepped in warm-up
    )
    module = tiny_ppo_module(cfg, reward=distinct_characters)
    start = [p.detach().clone() for p in module.policy.lm.parameters()]
    snapshots = PolicySnapshots()
    trainer, history = fit(module, max_epochs=2, callbacks=[snapshots])
    assert all(torch.equal(a, b) for a, b in zip(snapshots.lm[0], start))
    assert [row["value/warmup"] for row in history] == [1.0, 0.0]
    assert "policy/approx_kl" not in history[0]  # the warm-up loss has no policy terms
    assert [row["policy/epochs"] for row in history] == [2.0, 1.0]
    assert history[1]["policy/approx_kl"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(snapshots.lm[1], start))
    assert trainer.global_step == 4 + 2


def _adaptive_run(target: float | None) -> dict[str, float]:
    cfg = tiny_config(budget__num_iterations=1, kl_coef=0.1)
    module = tiny_ppo_module(cfg)
    perturb_reference(module)
    if target is not None:
        module.cfg.algorithm.kl.reward.controller = AdaptiveKLController(
            0.1, target=target, horizon=100.0
        )
    _, history = fit(module, max_epochs=1)
    return history[0]


def test_adaptive_kl_controller_steps_from_the_iterations_sequence_kl():
    """coef *= 1 + clip(KL / target - 1, +-0.2) * B / horizon with KL the iteration's mean
    sequence KL and B its 16 rollouts. The target is set 10% under the KL (measured by a run
    with a fixed coefficient: iteration 0's KL does not depend on it), so the step is not
    clipped."""
    kl = _adaptive_run(None)["kl/sequence"]
    assert kl > 1e-2
    row = _adaptive_run(kl / 1.1)
    assert row["kl/sequence"] == pytest.approx(kl, rel=1e-6)
    assert row["kl/coef"] == pytest.approx(0.1 * (1 + 0.1 * 16 / 100.0), rel=1e-6)


class StepLearningRates(L.Callback):
    """The learning rate of each parameter group (by name) at every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_start(self, trainer, module) -> None:
        trainer.optimizers[0].register_step_pre_hook(self.record)

    def record(self, optimizer, args, kwargs) -> None:
        self.steps.append({group["name"]: group["lr"] for group in optimizer.param_groups})


def test_learning_rate_groups_and_warmup_schedule():
    """The policy's lr is algorithm.optimizer.lr and the value head's algorithm.value_model.lr,
    logged as optim/lr_policy and optim/lr_value; warmup_ratio 0.5 of 8 steps ramps both over 4
    steps."""
    cfg = tiny_config(
        budget__num_iterations=1,
        algorithm__epochs=4,
        algorithm__optimizer__lr=1e-3,
        algorithm__value_model__lr=5e-3,
        algorithm__lr_schedule__warmup_ratio=0.5,
    )
    module = tiny_ppo_module(cfg)
    lrs = StepLearningRates()
    trainer, history = fit(module, max_epochs=1, callbacks=[lrs])
    ramp = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [step["policy"] for step in lrs.steps] == pytest.approx([1e-3 * m for m in ramp])
    assert [step["value"] for step in lrs.steps] == pytest.approx([5e-3 * m for m in ramp])
    assert history[0]["optim/lr_policy"] == pytest.approx(1e-3)
    assert history[0]["optim/lr_value"] == pytest.approx(5e-3)
    groups = {group["name"]: group["params"] for group in trainer.optimizers[0].param_groups}
    assert {id(p) for p in groups["policy"]} == {id(p) for p in module.policy.lm.parameters()}
    head = module.policy.value_head.parameters()
    assert {id(p) for p in groups["value"]} == {id(p) for p in head}


# ------------------------------------------------------------------------------- DAPO's pieces
def test_overlong_penalty_is_zero_then_linear_to_minus_one_at_the_limit():
    from rlhf_lightning.rollout.experience import overlong_penalty

    lengths = torch.tensor([1, 5, 6, 7, 8, 10])
    assert overlong_penalty(lengths, max_length=10, cache=4).tolist() == pytest.approx(
        [0.0, 0.0, 0.0, -0.25, -0.5, -1.0]
    )


def test_overlong_penalty_is_added_to_the_score_before_clipping():
    cfg = tiny_config(
        generation__stop_token="a",
        algorithm__overlong_penalty={"cache": 4, "coef": 0.5},
        algorithm__score_clip=0.9,
    )
    module = tiny_ppo_module(cfg)
    rollout, exp = rollout_and_experience(module, n=16)
    raw = torch.as_tensor(module.reward(exp.prompts, exp.responses)).float()
    lengths = exp.response_mask.sum(dim=1).float()
    penalty = 0.5 * ((8 - 4 - lengths) / 4).clamp(-1.0, 0.0)
    assert (penalty < 0).any() and (penalty == 0).any()  # both kinds of response
    torch.testing.assert_close(exp.scores, (raw + penalty).clamp(-0.9, 0.9))


def test_mask_truncated_trains_on_the_ended_responses_alone():
    """With mask_truncated the gradient of a minibatch is that of its ended rows alone: the cut
    responses count in neither the loss nor its denominator."""
    cfg = tiny_config(generation__stop_token="a", algorithm__mask_truncated=True)
    module = tiny_ppo_module(cfg, reward=distinct_characters)
    _, exp = rollout_and_experience(module, n=16)
    ended = exp.ended
    assert ended.any() and (~ended).any()
    assert torch.equal(exp.loss_mask, exp.response_mask & ended[:, None])
    assert module.minibatch_backward(exp, torch.arange(16), False, iteration=0) is not None
    masked = [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]
    module.policy.zero_grad(set_to_none=True)
    exp.in_loss = None
    assert module.minibatch_backward(exp, ended.nonzero()[:, 0], False, iteration=0) is not None
    alone = [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]
    for a, b in zip(masked, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def odd_prompts_vary(prompts, responses):
    """0 for every response to an even prompt ``p<even>:`` (a group of equal scores), a number
    that differs between responses for an odd one."""
    return [
        0.0 if int(p[1:-1]) % 2 == 0 else float(sum(map(ord, r)))
        for p, r in zip(prompts, responses)
    ]


def _dynamic_module(max_rounds: int, reward) -> object:
    cfg = tiny_config(
        "grpo",
        algorithm__samples_per_prompt=2,
        budget__rollout_batch_size=8,  # 4 prompts x 2 samples per iteration
        budget__minibatch_size=8,
        budget__micro_batch_size=4,
        algorithm__dynamic_sampling={"max_rounds": max_rounds},
    )
    return tiny_ppo_module(cfg, reward=reward)


def test_dynamic_sampling_samples_more_prompts_until_every_group_is_informative():
    """Round 1 (p0-p3) keeps the groups of p1 and p3, round 2 (p4-p7) those of p5 and p7: the
    batch is full after 2 of the 3 rounds, every group has unequal scores."""
    module = _dynamic_module(3, odd_prompts_vary)
    assert module.cfg.prompts_per_batch == 12
    torch.manual_seed(0)
    rollout, scores, stats = module.collect(prompt_batch(module.tokenizer, 12), iteration=0)
    assert rollout.prompts == [p for p in ("p1:", "p3:", "p5:", "p7:") for _ in range(2)]
    assert len(scores) == 8 and all(a != b for a, b in scores.view(-1, 2).tolist())
    torch.testing.assert_close(
        scores, torch.tensor(odd_prompts_vary(rollout.prompts, rollout.responses))
    )
    reduced = stats.reduce()
    assert reduced["rollout/sampling_rounds"] == 2
    assert reduced["rollout/informative_groups_frac"] == 0.5
    assert reduced["rollout/filled_groups"] == 0


def test_dynamic_sampling_fills_the_batch_when_the_rounds_run_out():
    module = _dynamic_module(2, lambda prompts, responses: [1.0] * len(responses))
    torch.manual_seed(0)
    rollout, scores, stats = module.collect(prompt_batch(module.tokenizer, 8), iteration=0)
    assert len(rollout.prompts) == 8 and rollout.response_ids.shape[0] == 8
    reduced = stats.reduce()
    assert reduced["rollout/sampling_rounds"] == 2 and reduced["rollout/filled_groups"] == 4
    _, history = fit(_dynamic_module(2, odd_prompts_vary), max_epochs=1)
    assert history[0]["rollout/informative_groups_frac"] == 0.5
