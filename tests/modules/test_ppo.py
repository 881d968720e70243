"""PPOModule with a tiny random Llama: update mechanics, reward shaping, learning, resume."""

from __future__ import annotations

import copy
import dataclasses
import math

import lightning as L
import pytest
import torch

from rlhf_lightning.kl import AdaptiveKLController
from rlhf_lightning.modules.ppo import padding_stats
from rlhf_lightning.rollout.experience import make_experience
from rlhf_lightning.rollout.generation import Rollout
from rlhf_lightning.stats import Stats
from tests.ppo_helpers import (
    fit,
    perturb_reference,
    prompt_batch,
    replace_cfg,
    rollout_and_experience,
    sample_prompts,
    set_kl_coef,
    tiny_config,
    tiny_ppo_module,
)


def _experience(module, n=16, seed=0, kl_coef=None):
    return rollout_and_experience(module, n, seed, kl_coef)[1]


def _grads(module) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.clone() for name, p in module.policy.named_parameters() if p.grad is not None
    }


def test_response_start_keeps_only_the_positions_that_predict_the_response():
    module = tiny_ppo_module(tiny_config())
    exp = _experience(module, n=4)
    P = exp.query_ids.shape[1]
    torch.nn.init.normal_(module.policy.value_head.weight)  # non-zero values to compare
    full_logits, full_values = module.policy(exp.input_ids, exp.attention_mask)
    logits, values = module.policy(exp.input_ids, exp.attention_mask, response_start=P)
    torch.testing.assert_close(logits, full_logits[:, P - 1 : -1])
    torch.testing.assert_close(values, full_values[:, P - 1 : -1])
    # The reference path (logits_to_keep) gives the same logprobs as slicing full logits.
    from rlhf_lightning.ops import logprobs_from_logits
    from rlhf_lightning.rollout.experience import reference_logprobs

    expected = logprobs_from_logits(full_logits[:, P - 1 : -1], exp.response_ids, 1.0)
    got = reference_logprobs(module.policy.lm, exp.input_ids, exp.attention_mask, P, 1.0)
    torch.testing.assert_close(got, expected)


def test_first_minibatch_has_ratio_one_and_no_clipping():
    module = tiny_ppo_module(tiny_config(budget__micro_batch_size=4))
    exp = _experience(module)
    rows = torch.randperm(16)[:8]
    out = module.minibatch_backward(exp, rows, False, iteration=0)
    assert out is not None
    stats = out.reduce()
    assert stats["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert stats["policy/clipfrac"] == 0.0
    assert stats["policy/approx_kl"] == pytest.approx(0.0, abs=1e-10)
    # Values start at exactly 0 (zero-initialised head), so nothing is value-clipped either.
    assert stats["value/clipfrac"] == 0.0


@pytest.mark.parametrize(
    "preset, aggregation",
    [
        ("ppo", "token_mean"),
        ("ppo", "seq_mean_token_mean"),
        ("ppo", "seq_mean_token_sum"),
        ("grpo", "seq_mean_token_mean"),
    ],
)
def test_gradient_accumulation_matches_one_batch(preset, aggregation):
    """The accumulated gradient of micro-batches of 2 (rows regrouped by length) equals the
    gradient of the same loss on the whole minibatch, for each aggregation."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(f"conf/algorithm/loss_aggregation/{aggregation}.yaml")
    if "normalizer" in node:
        node.normalizer = 8
    overrides = {"generation__stop_token": "a", "kl_coef": 0.1}
    cfg = tiny_config(preset, **overrides, algorithm__samples_per_prompt=2)
    cfg = dataclasses.replace(
        cfg, algorithm=dataclasses.replace(cfg.algorithm, loss_aggregation=instantiate(node))
    )
    module = tiny_ppo_module(cfg)
    with torch.no_grad():  # a reference that differs from the policy: the KL terms matter
        for p in module.ref_lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exp = _experience(module, kl_coef=0.1)
    # Make the response lengths differ, so token weighting matters.
    exp.response_mask[::3, 4:] = False
    rows = torch.arange(8)
    module.minibatch_backward(exp, rows, False, iteration=0)
    whole = _grads(module)
    module.policy.zero_grad(set_to_none=True)
    replace_cfg(module, "budget", micro_batch_size=2)
    module.minibatch_backward(exp, rows, False, iteration=0)
    accumulated = _grads(module)
    assert whole.keys() == accumulated.keys() and whole
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-7)


def test_experience_batch_size_only_chunks_the_forwards():
    module = tiny_ppo_module(tiny_config(generation__stop_token="a"))
    torch.nn.init.normal_(module.policy.value_head.weight)  # non-zero values to compare
    with torch.no_grad():  # a reference that differs from the policy: non-zero KL
        for p in module.ref_lm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    whole = _experience(module, kl_coef=0.1)
    assert whole.kl.abs().sum() > 0 and whole.old_values.abs().sum() > 0
    chunk_sizes = []
    module.ref_lm.register_forward_hook(
        lambda _m, _args, kwargs, _out: chunk_sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    for rows in (1, 3, 16):
        replace_cfg(module, "budget", experience_batch_size=rows)
        chunk_sizes.clear()
        chunked = _experience(module, kl_coef=0.1)  # same seed: the same rollouts
        assert chunk_sizes == [min(rows, 16 - start) for start in range(0, 16, rows)]
        for name in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns"):
            torch.testing.assert_close(getattr(chunked, name), getattr(whole, name))


def _sample(module, seed=0):
    torch.manual_seed(seed)
    return module.sample(prompt_batch(module.tokenizer, 8)).response_ids


def test_sampling_copy_follows_the_policy_and_stays_out_of_the_state():
    module = tiny_ppo_module(tiny_config())
    keys = set(module.state_dict())
    exact = _sample(module)
    replace_cfg(module, "generation", sampling_dtype="float32")
    assert torch.equal(_sample(module), exact)  # a same-dtype copy samples exactly alike
    sampler = module.sampling_lm()
    assert sampler is not module.policy.lm and set(module.state_dict()) == keys
    with torch.no_grad():  # an "update": the copy must pick it up at the next rollout
        for p in module.policy.lm.parameters():
            p.add_(0.5 * torch.randn_like(p))
    replace_cfg(module, "generation", sampling_dtype=None)
    updated = _sample(module)
    assert not torch.equal(updated, exact)
    replace_cfg(module, "generation", sampling_dtype="float32")
    assert torch.equal(_sample(module), updated)
    assert module.sampling_lm() is sampler  # refreshed in place, not copied again


def test_bfloat16_sampling_copy_rounds_parameters_and_keeps_buffers():
    module = tiny_ppo_module(tiny_config(generation__sampling_dtype="bfloat16"))
    sampler = module.sampling_lm()
    for (name, p), src in zip(sampler.named_parameters(), module.policy.lm.parameters()):
        assert p.dtype == torch.bfloat16 and not p.requires_grad, name
        assert torch.equal(p, src.detach().to(torch.bfloat16)), name
    for (name, b), src in zip(sampler.named_buffers(), module.policy.lm.buffers()):
        assert b.dtype == src.dtype, name
    assert module.policy.lm.lm_head.weight.dtype == torch.float32  # the policy is untouched
    assert _sample(module).shape[0] == 8


def test_kl_coefficient_zero_gives_only_the_score_at_the_last_real_token():
    module = tiny_ppo_module(tiny_config())
    tok = module.tokenizer
    batch = prompt_batch(tok, 3)
    response_ids = torch.tensor([[10, 11, 12, 0, 0], [13, 14, 15, 16, 17], [18, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    rollout = Rollout(
        batch["input_ids"],
        batch["attention_mask"],
        response_ids,
        mask,
        torch.tensor([True, False, True]),
        batch["prompts"],
        ["", "", ""],
    )
    scores = torch.tensor([0.5, -1.0, 2.0])
    exp = make_experience(module.policy, module.ref_lm, rollout, scores, module.cfg)
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 4], expected[2, 0] = 0.5, -1.0, 2.0
    torch.testing.assert_close(exp.rewards, expected)
    # With a reference that differs and a coefficient, every real token gets -0.5 * KL_t (k1,
    # from a naive full forward of both models); padding still gets nothing.
    from tests.modules.test_ppo_update import naive_logprobs

    perturb_reference(module)
    set_kl_coef(module, 0.5)
    exp_kl = make_experience(module.policy, module.ref_lm, rollout, scores, module.cfg)
    kl = naive_logprobs(module.policy.lm, exp_kl, 1.0) - naive_logprobs(module.ref_lm, exp_kl, 1.0)
    assert kl[mask].abs().min() > 1e-4
    torch.testing.assert_close(exp_kl.rewards, expected + torch.where(mask, -0.5 * kl, 0.0))
    assert torch.all(exp_kl.advantages[~mask] == 0) and torch.all(exp_kl.returns[~mask] == 0)


def test_missing_eos_penalty_replaces_the_score_of_unfinished_responses():
    module = tiny_ppo_module(
        tiny_config(algorithm__missing_eos_penalty=-3.0, generation__stop_token="eos")
    )
    batch = prompt_batch(module.tokenizer, 2)
    rollout = Rollout(
        batch["input_ids"],
        batch["attention_mask"],
        torch.tensor([[10, 2], [11, 12]]),
        torch.ones(2, 2, dtype=torch.bool),
        torch.tensor([True, False]),
        batch["prompts"],
        ["", ""],
    )
    exp = make_experience(
        module.policy, module.ref_lm, rollout, torch.tensor([0.7, 0.9]), module.cfg
    )
    torch.testing.assert_close(exp.scores, torch.tensor([0.7, -3.0]))


def test_global_step_counts_optimizer_steps_and_epochs_count_iterations():
    cfg = tiny_config(budget__minibatch_size=4, budget__micro_batch_size=4)
    trainer, history = fit(tiny_ppo_module(cfg), max_epochs=2)
    assert trainer.current_epoch == 2
    assert trainer.global_step == 2 * cfg.optimizer_steps_per_iteration == 16
    assert len(history) == 2


def test_no_metric_is_nan_when_the_returns_do_not_vary():
    """Iteration 0 with a reward of 0: the policy is the reference (KL 0) and the value head is
    zero-initialised, so every return is 0 and the explained variance (1 - Var[R - V] / Var[R])
    is undefined: it is not logged, and nothing logged is NaN. With a reward that varies, it
    is."""
    module = tiny_ppo_module(
        tiny_config(), reward=lambda prompts, responses: [0.0] * len(responses)
    )
    _, rows = fit(module, max_epochs=1)
    assert "value/explained_variance" not in rows[0]
    assert [name for name, value in rows[0].items() if not math.isfinite(value)] == []
    _, rows = fit(tiny_ppo_module(tiny_config()), max_epochs=1)
    assert math.isfinite(rows[0]["value/explained_variance"])


@pytest.mark.slow
def test_ppo_learns_a_toy_reward_and_a_large_kl_coefficient_holds_it_back():
    """Reward = fraction of 'e' characters. Free PPO raises it; beta = 5 keeps the KL small."""
    results = {}
    for beta in (0.0, 5.0):
        L.seed_everything(0)
        cfg = tiny_config(
            budget__num_iterations=20,
            algorithm__epochs=4,
            kl_coef=beta,
            algorithm__optimizer__lr=1e-3,
            algorithm__value_model__lr=1e-3,
        )
        _, history = fit(tiny_ppo_module(cfg), max_epochs=20)
        results[beta] = history

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    free, held = results[0.0], results[5.0]
    assert mean(free[-3:], "objective/score") > mean(free[:2], "objective/score") + 0.05
    assert mean(held[-3:], "objective/score") < mean(free[-3:], "objective/score")
    assert mean(held[-3:], "kl/sequence") < 0.6 * mean(free[-3:], "kl/sequence")


def _adaptive_kl_module(cfg):
    """A module whose reference differs from the policy, with an adaptive KL coefficient that
    rises every iteration (the KL is above its tiny target)."""
    module = tiny_ppo_module(cfg)
    perturb_reference(module)
    module.cfg.algorithm.kl.reward.controller = AdaptiveKLController(0.1, target=1e-4, horizon=50.0)
    return module


def test_same_seed_gives_same_metrics_and_resume_matches_uninterrupted_run(tmp_path):
    """Also the adaptive KL coefficient: it is in the checkpoint, so the resumed run continues
    from the coefficient the interrupted one had reached, not from its start."""
    cfg = tiny_config(budget__num_iterations=3, kl_coef=0.1)
    L.seed_everything(7)
    _, straight = fit(_adaptive_kl_module(cfg), max_epochs=3)
    coefs = [row["kl/coef"] for row in straight]
    assert coefs == pytest.approx([0.1 * (1 + 0.2 * 16 / 50) ** k for k in (1, 2, 3)])

    L.seed_everything(7)
    _, again = fit(_adaptive_kl_module(cfg), max_epochs=3)
    assert [r["objective/score"] for r in again] == [r["objective/score"] for r in straight]

    # Stop after 2 iterations, then resume from the checkpoint in a fresh module.
    L.seed_everything(7)
    trainer, first_part = fit(_adaptive_kl_module(cfg), max_epochs=2, tmp_path=tmp_path)
    ckpt = (
        trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    )
    assert ckpt
    L.seed_everything(123)  # resume must not depend on the seed the new process starts with
    resumed_module = _adaptive_kl_module(cfg)
    _, resumed = fit(resumed_module, max_epochs=3, tmp_path=tmp_path, ckpt_path=ckpt)
    assert len(resumed) == 1
    keys = (
        "objective/score",
        "kl/sequence",
        "optim/loss_policy",
        "optim/loss_value",
        "optim/lr_policy",
        "kl/coef",
    )
    for key in keys:
        assert resumed[0][key] == pytest.approx(straight[2][key], rel=1e-5, abs=1e-7), key
    assert resumed_module.cfg.algorithm.kl.reward.coef == pytest.approx(
        0.1 * (1 + 0.2 * 16 / 50) ** 3, rel=1e-12
    )


def test_value_head_runs_in_fp32_under_bf16_autocast():
    module = tiny_ppo_module(tiny_config())
    head = module.policy.value_head
    torch.nn.init.normal_(head.weight, std=1.0)
    captured = {}
    head.register_forward_hook(lambda mod, args, out: captured.update(hidden=args[0], out=out))
    exp = _experience(module, n=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, values = module.policy(exp.input_ids, exp.attention_mask)
    assert captured["out"].dtype == torch.float32 and values.dtype == torch.float32
    expected = captured["hidden"].float() @ head.weight.T + head.bias
    torch.testing.assert_close(values, expected.squeeze(-1), rtol=1e-6, atol=1e-6)


def _with_critic(module):
    """The module's policy with a separate critic: a copy of the tiny LM's bare backbone."""
    from rlhf_lightning.models import PolicyWithValueHead

    lm = module.policy.lm
    module.policy = PolicyWithValueHead(lm, critic_backbone=copy.deepcopy(lm.model))
    return module


@pytest.mark.parametrize("value_model", ["shared", "critic"])
def test_warmup_forward_gives_the_same_values_and_trains_only_the_value_function(value_model):
    """``value_trains_trunk=False``: the values are unchanged, the value loss's gradient reaches
    the value head (and a separate critic) but not the policy LM."""
    module = tiny_ppo_module(tiny_config())
    if value_model == "critic":
        _with_critic(module)
    policy = module.policy
    torch.nn.init.normal_(policy.value_head.weight)  # non-zero values to compare
    exp = _experience(module, n=4)
    P = exp.prompt_len
    _, expected = policy(exp.input_ids, exp.attention_mask, response_start=P)
    _, values = policy(
        exp.input_ids, exp.attention_mask, response_start=P, value_trains_trunk=False
    )
    torch.testing.assert_close(values, expected)
    policy.zero_grad(set_to_none=True)
    values.sum().backward()
    assert all(p.grad is None for p in policy.lm.parameters())
    assert policy.value_head.weight.grad is not None
    if value_model == "critic":
        assert all(p.grad is not None for p in policy.critic_backbone.parameters())
    # The value head's gradient is that of the full value loss.
    head_grad = policy.value_head.weight.grad.clone()
    policy.zero_grad(set_to_none=True)
    policy(exp.input_ids, exp.attention_mask, response_start=P)[1].sum().backward()
    torch.testing.assert_close(policy.value_head.weight.grad, head_grad)


def _distinct_characters(prompts, responses):
    """A score that varies between responses of the tiny model, so the values have a target."""
    return [len(set(r)) / 10 for r in responses]


class _PolicySnapshots(L.Callback):
    """The policy LM's parameters and the value head's weight at the end of every iteration."""

    def __init__(self) -> None:
        self.lm, self.head = [], []

    def on_train_epoch_end(self, trainer, module) -> None:
        self.lm.append([p.detach().clone() for p in module.policy.lm.parameters()])
        self.head.append(module.policy.value_head.weight.detach().clone())


@pytest.mark.parametrize("value_model", ["shared", "critic"])
def test_critic_warmup_trains_only_the_value_function_then_the_policy(value_model):
    cfg = tiny_config(budget__num_iterations=3, algorithm__value_model__warmup_iterations=2)
    module = tiny_ppo_module(cfg, reward=_distinct_characters)
    module.cfg.algorithm.kl.reward.controller = AdaptiveKLController(
        0.1, target=6.0, horizon=100.0
    )  # KL 0 would lower it
    if value_model == "critic":
        _with_critic(module)
    start = [p.detach().clone() for p in module.policy.lm.parameters()]
    critic_start = (
        [p.detach().clone() for p in module.policy.critic_backbone.parameters()]
        if (value_model == "critic")
        else None
    )
    snapshots = _PolicySnapshots()
    _, history = fit(module, max_epochs=3, callbacks=[snapshots])
    for it in (0, 1):  # warm-up: the policy is bit-identical, the value function moves
        assert all(torch.equal(a, b) for a, b in zip(snapshots.lm[it], start))
        assert history[it]["value/warmup"] == 1.0
        assert history[it]["kl/coef"] == pytest.approx(0.1)  # controller untouched
    assert not torch.equal(snapshots.head[0], torch.zeros_like(snapshots.head[0]))
    assert not torch.equal(snapshots.head[1], snapshots.head[0])
    if critic_start is not None:
        moved = [p for p, q in zip(module.policy.critic_backbone.parameters(), critic_start)]
        assert any(not torch.equal(p, q) for p, q in zip(moved, critic_start))
    # Iteration 2 is a normal PPO iteration: the policy moves.
    assert history[2]["value/warmup"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(snapshots.lm[2], start))


@pytest.mark.parametrize("top_k", [0, 3])
def test_ppo_logs_how_far_the_sampler_is_from_the_learner(top_k):
    cfg = tiny_config(budget__num_iterations=1, generation__top_k=top_k)
    _, history = fit(tiny_ppo_module(cfg), max_epochs=1)
    if top_k == 0:
        assert abs(history[0]["rollout/sampler_kl"]) < 1e-4
        assert history[0]["rollout/sampler_logprob_max_abs_diff"] < 1e-3
    else:
        assert history[0]["rollout/sampler_kl"] > 0.05


def test_reward_gets_each_rollouts_prompt_columns_and_its_errors_name_the_iteration():
    """With 2 samples per prompt, a reward function's ``answer`` column is repeated like the
    prompts; a reward that fails stops the run naming the reward and the iteration."""
    from rlhf_lightning.rewards import CallableReward, RewardError

    seen = []

    def by_answer(prompts, responses, answer):
        seen.append(list(zip(prompts, answer)))
        return [float(len(r)) for r in responses]

    module = tiny_ppo_module(tiny_config("rloo", algorithm__samples_per_prompt=2))
    module.reward = CallableReward(by_answer)
    batch = prompt_batch(module.tokenizer, 3)
    batch["columns"] = {"answer": ["a0", "a1", "a2"]}
    rollout = module.sample(batch, 2)
    scores = module.score(rollout, batch, iteration=4)
    assert scores.shape == (6,)
    assert seen[0] == [(f"p{i}:", f"a{i}") for i in range(3) for _ in range(2)]

    def broken(prompts, responses):
        return [1.0] * (len(responses) - 1)

    module.reward = CallableReward(broken)
    with pytest.raises(RewardError, match=r"at iteration 4: reward .*broken returned 5 scores"):
        module.score(rollout, batch, iteration=4)


# ------------------------------------------------------------ old logprobs from the sampler
def _params_after_one_iteration(preset: str, old_logprobs: str, critic=False, **overrides):
    L.seed_everything(3)
    cfg = tiny_config(
        preset,
        budget__num_iterations=1,
        algorithm__old_logprobs=old_logprobs,
        kl_coef=0.05,
        generation__temperature=0.7,
        **overrides,
    )
    module = tiny_ppo_module(cfg)
    if critic:  # values from the critic's own forward, not from generation's hidden states
        _with_critic(module)
    with torch.no_grad():  # a reference that differs, so the KL enters the rewards
        for p in module.ref_lm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    calls = []  # the phases in which the policy's trunk ran (its embedding is the trunk's entry)
    embedding = module.policy.lm.get_input_embeddings()
    embedding.register_forward_hook(lambda *_: calls.append(module.phase))
    _, history = fit(module, max_epochs=1)
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}, history, calls


@pytest.mark.parametrize("preset, critic", [("ppo", False), ("ppo", True), ("rloo", False)])
def test_sampler_logprobs_give_the_same_update_as_recomputing_them(preset, critic):
    """Float32 sampling from the trained weights, no top-k/top-p: the logprobs generate recorded
    (and, for a shared value head, the values read from generate's hidden states) equal the
    recomputed ones, so the update is the same within fp32 tolerance -- without any forward of
    the policy's trunk in experience making (a separate critic runs its own)."""
    recomputed, history_r, calls_r = _params_after_one_iteration(preset, "recompute", critic)
    sampled, history_s, calls_s = _params_after_one_iteration(preset, "sampler", critic)
    assert "experience" in calls_r and "experience" not in calls_s
    for name, value in recomputed.items():
        torch.testing.assert_close(sampled[name], value, rtol=1e-4, atol=1e-6, msg=name)
    for key in ("objective/score", "kl/sequence", "optim/loss_policy"):
        assert history_s[0][key] == pytest.approx(history_r[0][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "reshape",
    [{"generation__top_p": 0.9}, {"generation__top_k": 3}, {"generation__min_new_tokens": 3}],
    ids=["top_p", "top_k", "min_new_tokens"],
)
def test_sampler_old_logprobs_are_the_full_tempered_softmax_when_sampling_is_reshaped(reshape):
    """With top-p, top-k or min_new_tokens the draw comes from a reshaped distribution, but the
    losses recompute the full softmax(logits / T): ``old_logprobs=sampler`` must record the
    latter, so that its old logprobs, KL and rewards are those of ``recompute`` (ratio 1 at the
    first minibatch) -- not the truncated logprobs of the draw."""
    cfg = tiny_config(
        "ppo",
        algorithm__old_logprobs="sampler",
        generation__temperature=0.7,
        generation__stop_token="e",
        **reshape,
    )
    module = tiny_ppo_module(cfg)
    perturb_reference(module)  # a reference that differs, so the KL is not 0
    sampled = _experience(module, kl_coef=0.05)
    replace_cfg(module, "algorithm", old_logprobs="recompute")
    recomputed = _experience(module, kl_coef=0.05)
    mask = recomputed.response_mask
    assert torch.equal(sampled.response_ids, recomputed.response_ids)
    for name in ("old_logprobs", "kl", "rewards"):
        torch.testing.assert_close(
            getattr(sampled, name)[mask], getattr(recomputed, name)[mask], atol=1e-4, rtol=0
        )
    drawn = (sampled.sampler_logprobs - recomputed.old_logprobs)[mask]
    assert drawn.mean() > 1e-3  # what was drawn from differs from the full softmax


def test_generation_hidden_states_give_the_forward_values():
    module = tiny_ppo_module(tiny_config(generation__stop_token="a"))
    torch.nn.init.normal_(module.policy.value_head.weight)
    rollout = sample_prompts(module, 6, keep_hidden=True)
    ids = torch.cat([rollout.query_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask.long()], 1)
    _, expected = module.policy(ids, mask, response_start=rollout.query_ids.shape[1])
    got = module.policy.values_from_hidden(rollout.last_hidden)
    keep = rollout.response_mask
    assert keep.sum() < keep.numel()  # some rows stopped early
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-5)


def test_truncated_importance_sampling_reweights_the_policy_loss_where_sampling_differs():
    """top_k=3 makes the sampler differ from the trained policy: TIS weights the policy loss by
    min(pi_old / pi_sampler, cap) and logs how many tokens it capped."""
    from rlhf_lightning.losses import TruncatedIS

    cfg = tiny_config(generation__top_k=3)
    module = tiny_ppo_module(cfg, reward=_distinct_characters)  # non-zero advantages
    exp = _experience(module)
    rows = torch.arange(8)
    module.minibatch_backward(exp, rows, False, iteration=0)
    plain = _grads(module)
    module.policy.zero_grad(set_to_none=True)
    replace_cfg(module, "algorithm", sampler_correction=TruncatedIS(cap=1.5))
    module.minibatch_backward(exp, rows, False, iteration=0)
    corrected = _grads(module)
    assert any(not torch.allclose(corrected[n], plain[n]) for n in plain)
    # Top-k renormalises: pi_sampler > pi_old on every kept token, so every ratio is < 1.
    ratio = torch.exp(exp.old_logprobs - exp.sampler_logprobs)[exp.response_mask]
    assert (ratio < 1).all() and (ratio > 0).all()
    stats = module.rollout_stats(exp, exp, exp.scores, 0.0).reduce()
    assert stats["rollout/is_weight_mean"] == pytest.approx(float(ratio.mean()), rel=1e-5)
    assert stats["rollout/is_cut_frac"] == 0.0 and stats["rollout/sampler_kl"] > 0
    # At the first minibatch (ratio 1, no clipping) weighting token t's loss by w_t is the same
    # as weighting its advantage: the corrected gradient is the plain one on A * w.
    weights, _ = TruncatedIS(cap=1.5)(exp.old_logprobs, exp.sampler_logprobs, exp.response_mask)
    module.policy.zero_grad(set_to_none=True)
    replace_cfg(module, "algorithm", sampler_correction=None)
    reweighted = dataclasses.replace(exp, advantages=exp.advantages * weights)
    module.minibatch_backward(reweighted, rows, False, iteration=0)
    for name, grad in _grads(module).items():
        torch.testing.assert_close(corrected[name], grad, rtol=1e-4, atol=1e-7)


def test_micro_batches_group_rows_by_length_and_trim_padding_without_changing_the_loss():
    """Extra all-padding columns (left of the prompts, right of the responses) are cut off,
    rows of similar length share a micro-batch, and the loss is the same as on the padded
    batch; the padding share is counted."""
    from rlhf_lightning.rollout.experience import Experience

    module = tiny_ppo_module(tiny_config(generation__stop_token="a"))
    torch.nn.init.normal_(module.policy.value_head.weight)
    exp = _experience(module, n=8)
    exp.response_mask[:4, 2:] = False  # four short responses
    B, P = exp.query_ids.shape
    pad = module.tokenizer.pad_token_id
    padded = Experience(
        **{
            **vars(exp),
            "query_ids": torch.cat([torch.full((B, 3), pad), exp.query_ids], 1),
            "query_mask": torch.cat([torch.zeros(B, 3, dtype=torch.long), exp.query_mask], 1),
            "response_ids": torch.cat([exp.response_ids, torch.full((B, 5), pad)], 1),
            "response_mask": torch.cat([exp.response_mask, torch.zeros(B, 5, dtype=torch.bool)], 1),
            **{
                name: torch.cat([getattr(exp, name), torch.zeros(B, 5)], 1)
                for name in ("old_logprobs", "ref_logprobs", "old_values", "kl", "rewards",
                             "advantages", "returns", "sampler_logprobs")
            },
        }
    )  # fmt: skip
    parts = list(padded.micro_batches(torch.arange(B), 4))
    lengths = [part.response_mask.sum(1).tolist() for part in parts]
    assert max(lengths[1]) <= 2 < min(lengths[0])  # long rows together, short rows together
    assert parts[1].response_ids.shape[1] == 2 and parts[0].prompt_len <= P
    denominator = padded.response_mask.sum().float()

    def micro_batch_loss(part):
        logits, values = module.policy(
            part.input_ids, part.attention_mask, response_start=part.prompt_len
        )
        return module.objective(logits, values, part, denominator, False)[0]

    trimmed = sum(micro_batch_loss(part) for part in parts)
    whole = micro_batch_loss(padded)
    torch.testing.assert_close(trimmed, whole, rtol=1e-5, atol=1e-7)
    stats = Stats()
    for part in parts:
        stats.merge(padding_stats(part, padded))
    reduced = stats.reduce()
    real = float(padded.attention_mask.sum())
    assert reduced["perf/padding_frac_untrimmed"] == pytest.approx(
        1 - real / padded.input_ids.numel()
    )
    assert reduced["perf/padding_frac"] < reduced["perf/padding_frac_untrimmed"]


def test_select_keeps_every_field_of_the_chosen_rows_and_cuts_only_all_padding_columns():
    """Rows 2 and 0 of a hand-made experience: lists, 1-D and 2-D fields follow the rows, a
    missing field stays None, and only the columns padded in both rows are dropped."""
    from rlhf_lightning.rollout.experience import Experience, first_real_column, last_real_column

    B, P, R = 3, 4, 5
    query_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    per_token = {
        name: torch.arange(B * R, dtype=torch.float32).reshape(B, R) + k
        for k, name in enumerate(("old_logprobs", "ref_logprobs", "old_values", "kl", "rewards",
                                  "advantages", "returns"))
    }  # fmt: skip
    exp = Experience(
        query_ids=torch.arange(B * P).reshape(B, P),
        query_mask=query_mask,
        response_ids=torch.arange(B * R).reshape(B, R) + 100,
        response_mask=response_mask,
        scores=torch.tensor([0.1, 0.2, 0.3]),
        ended=torch.tensor([True, False, True]),
        prompts=["p0", "p1", "p2"],
        responses=["r0", "r1", "r2"],
        **per_token,
    )
    part = exp.select(torch.tensor([2, 0]))
    assert part.prompts == ["p2", "p0"] and part.responses == ["r2", "r0"]
    assert part.scores.tolist() == pytest.approx([0.3, 0.1])
    assert part.ended.tolist() == [True, True]
    assert part.sampler_logprobs is None
    assert part.prompt_len == 3  # column 0 is padding in rows 2 and 0
    torch.testing.assert_close(part.query_ids, exp.query_ids[[2, 0], 1:])
    torch.testing.assert_close(part.response_ids, exp.response_ids[[2, 0], :3])
    torch.testing.assert_close(part.response_mask, response_mask[[2, 0], :3])
    for name, value in per_token.items():
        torch.testing.assert_close(getattr(part, name), value[[2, 0], :3])
    empty = torch.zeros(2, 3, dtype=torch.bool)  # no real token: nothing to cut, column 0
    assert first_real_column(empty) == 0 and last_real_column(empty) == 0
