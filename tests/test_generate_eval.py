"""Generation and evaluation: metrics by hand, KL, checkpoint loading, rlhf-generate, rlhf-eval."""

from __future__ import annotations

import json

import pytest
import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_lightning.cli import evaluate as eval_cli
from rlhf_lightning.cli import generate as generate_cli
from rlhf_lightning.cli.evaluate import reward_from_config
from rlhf_lightning.config import GenerationConfig
from rlhf_lightning.evaluation import (
    bootstrap_ci,
    distinct_n,
    evaluate_policy,
    generate_texts,
    load_policy_for_inference,
    policy_reference_kl,
    read_prompt_rows,
    read_prompts,
    sample_rollouts,
    std_error,
    win_rate,
    wins,
)
from rlhf_lightning.models import load_causal_lm, load_tokenizer, make_tiny_model_dir
from rlhf_lightning.rewards import CallableReward, TokenFractionReward, VaderReward

PROMPTS = ["The film was", "A much longer prompt about the movie", "x"]
GEN = GenerationConfig(temperature=0.7, max_new_tokens=6, stop_token=None)


def length_reward(prompts, responses):
    """Used through `python:tests.test_generate_eval:length_reward`."""
    return [float(len(r)) for r in responses]


def answer_reward(prompts, responses, answer):
    """Used through `python:tests.test_generate_eval:answer_reward`: the prompt's answer."""
    return [float(a) for a in answer]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("other_tiny"), seed=1)


# ------------------------------------------------------------------------------- pure metrics
def test_distinct_n_hand_values():
    texts = ["a b a b", "a c"]
    assert distinct_n(texts, 1) == 3 / 6  # a b a b a c
    assert distinct_n(texts, 2) == 3 / 4  # (a b) (b a) (a b) | (a c): n-grams do not cross texts
    assert distinct_n(["", "a"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(texts, 0)


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == 2.5 / 4
    assert win_rate(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    with pytest.raises(ValueError, match="equal length"):
        win_rate([1, 2], [1])


# ----------------------------------------------------------------------------- generation, KL
def test_generation_is_deterministic_for_a_seed_and_respects_max_new_tokens(tiny):
    lm, tok = tiny
    first = generate_texts(lm, tok, PROMPTS, GEN, batch_size=2, seed=3)
    assert first == generate_texts(lm, tok, PROMPTS, GEN, batch_size=2, seed=3)
    assert first != generate_texts(lm, tok, PROMPTS, GEN, batch_size=2, seed=4)
    rollouts = sample_rollouts(lm, tok, PROMPTS, GEN, batch_size=2, seed=3)
    assert [len(r.responses) for r in rollouts] == [2, 1]
    for r in rollouts:  # no stop token: every response has exactly max_new_tokens tokens
        assert r.response_ids.shape[1] == 6
        assert r.response_mask.sum(1).tolist() == [6] * len(r.responses)
    assert all(len(text) <= 6 for text in first)  # one character per token, specials dropped


def test_policy_reference_kl_matches_unpadded_forward_passes(tiny, other_dir):
    lm, tok = tiny
    other = load_causal_lm(other_dir)
    (rollout,) = sample_rollouts(lm, tok, PROMPTS, GEN, batch_size=3, seed=0)
    kl = policy_reference_kl(lm, other, rollout, GEN.temperature)
    assert kl.shape == (3,)
    for i, prompt in enumerate(PROMPTS):  # naive: each sequence alone, no padding
        prompt_ids = tok(prompt)["input_ids"]
        ids = torch.tensor([prompt_ids + rollout.response_ids[i].tolist()])
        expected = 0.0
        for model, sign in ((lm, 1), (other, -1)):
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0] / GEN.temperature, dim=-1)
            for t in range(len(prompt_ids), ids.shape[1]):
                expected += sign * logp[t - 1, ids[0, t]].item()
        assert kl[i].item() == pytest.approx(expected, abs=1e-4)
    assert kl.mean() > 0
    assert policy_reference_kl(lm, lm, rollout, GEN.temperature).abs().max() < 1e-5


def test_evaluate_policy_against_itself(tiny):
    lm, tok = tiny
    metrics = evaluate_policy(
        lm, lm, tok, PROMPTS, TokenFractionReward("e"), gold=VaderReward(), gen=GEN, seed=1
    )
    # Same model, same seed: identical samples, so every comparison is a tie and KL is 0.
    assert metrics["win_rate"] == 0.5
    assert abs(metrics["kl"]) < 1e-5
    assert metrics["reward"] == metrics["reference_reward"]
    responses = generate_texts(lm, tok, PROMPTS, GEN, seed=1)
    assert metrics["reward"] == pytest.approx(
        TokenFractionReward("e")(PROMPTS, responses).mean().item()
    )
    assert metrics["distinct_1"] == distinct_n(responses, 1)
    assert metrics["response_length"] == 6.0 and metrics["ended_frac"] == 0.0
    assert metrics["num_prompts"] == 3 and "gold_score" in metrics
    scores = TokenFractionReward("e")(PROMPTS, responses).tolist()
    mean = sum(scores) / 3
    naive_se = (sum((s - mean) ** 2 for s in scores) / 2) ** 0.5 / 3**0.5
    assert metrics["reward_std_error"] == pytest.approx(naive_se)
    assert metrics["reference_reward_std_error"] == metrics["reward_std_error"]
    gold = VaderReward()(PROMPTS, responses).double()
    assert metrics["gold_score_std_error"] == pytest.approx(std_error(gold))
    # all ties: every resample's win rate is 0.5
    assert metrics["win_rate_std_error"] == 0.0
    assert (metrics["win_rate_ci_low"], metrics["win_rate_ci_high"]) == (0.5, 0.5)
    # every response has 6 tokens and none ended: no spread
    assert metrics["response_length_std_error"] == 0.0 and metrics["ended_frac_std_error"] == 0.0
    assert metrics["kl_std_error"] < 1e-5


def test_evaluate_policy_std_errors_and_interval_match_the_samples(tiny, other_dir):
    lm, tok = tiny
    other = load_causal_lm(other_dir)
    prompts = [f"{word} was" for word in "abcdefghijkl"]
    samples = []
    metrics = evaluate_policy(
        lm,
        other,
        tok,
        prompts,
        TokenFractionReward("e"),
        gen=GEN,
        seed=2,
        samples=samples,
        confidence=0.9,
        num_resamples=500,
        bootstrap_seed=5,
    )
    for key in ("reward", "reference_reward", "kl", "response_length"):
        column = torch.tensor([row[key] for row in samples], dtype=torch.float64)
        assert metrics[f"{key}_std_error"] == pytest.approx(std_error(column), rel=1e-5), key
    outcomes = wins([r["reward"] for r in samples], [r["reference_reward"] for r in samples])
    assert [row["win"] for row in samples] == outcomes.tolist()
    assert metrics["win_rate"] == pytest.approx(outcomes.mean().item())
    assert metrics["win_rate_std_error"] == pytest.approx(std_error(outcomes))
    assert (metrics["win_rate_ci_low"], metrics["win_rate_ci_high"]) == bootstrap_ci(
        outcomes, confidence=0.9, num_resamples=500, seed=5
    )


def test_format_table_folds_std_errors_and_intervals_into_their_rows():
    table = eval_cli.format_table(
        {
            "reward": 0.5,
            "reward_std_error": 0.25,
            "win_rate": 0.625,
            "win_rate_std_error": 0.125,
            "win_rate_ci_low": 0.375,
            "win_rate_ci_high": 0.875,
            "distinct_1": 0.75,
            "num_prompts": 4,
        },
        confidence=0.9,
    )
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value", "std", "error", "90%", "CI", "(bootstrap)"]
    assert lines[1].split() == ["reward", "0.5000", "0.2500"]
    assert lines[2].split() == ["win_rate", "0.6250", "0.1250", "[0.3750,", "0.8750]"]
    assert lines[3].split() == ["distinct_1", "0.7500"]
    assert lines[4].split() == ["num_prompts", "4"]
    assert len(lines) == 5


def test_std_error():
    assert std_error(torch.tensor([1.0, 3.0])) == pytest.approx(1.0)  # std sqrt(2) / sqrt(2)
    assert std_error(torch.tensor([2.0])) == 0.0
    # 1..4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, var 5/3, se sqrt(5/3)/2
    assert std_error(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx((5 / 3) ** 0.5 / 2)
    # win outcomes 1, 0.5, 0, 1: mean 0.625, var (0.140625 + 0.015625 + 0.390625 + 0.140625) / 3
    assert std_error(wins([2, 1, 0, 5], [1, 1, 3, 4])) == pytest.approx((0.6875 / 3) ** 0.5 / 2)


def test_wins_per_pair():
    assert wins([2, 1, 0], [1, 1, 3]).tolist() == [1.0, 0.5, 0.0]


def test_bootstrap_ci_hand_cases():
    # every resample of a constant is that constant
    assert bootstrap_ci([0.7] * 5) == pytest.approx((0.7, 0.7))
    # two values 0 and 1: resample means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles are 0 and 1, and the 30% and 70% quantiles are both 0.5
    assert bootstrap_ci([0.0, 1.0], num_resamples=4000) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], confidence=0.4, num_resamples=4000) == (0.5, 0.5)


def test_bootstrap_ci_is_seeded_and_leaves_the_global_rng_alone():
    values = torch.arange(50, dtype=torch.float64) % 7
    state = torch.random.get_rng_state()
    first = bootstrap_ci(values, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert bootstrap_ci(values, seed=3) == first
    assert bootstrap_ci(values, seed=4) != first
    low, high = first
    assert low < values.mean().item() < high


def test_bootstrap_ci_width_and_coverage_on_bernoulli_data():
    """Win outcomes ~ Bernoulli(0.7), n = 200: the 95% interval should be about as wide as the
    normal one (2 * 1.96 * sqrt(p (1 - p) / n) = 0.127) and cover 0.7 in about 95% of data sets."""
    p, n, datasets = 0.7, 200, 400
    generator = torch.Generator().manual_seed(0)
    covered, widths = 0, []
    for k in range(datasets):
        data = (torch.rand(n, generator=generator) < p).double()
        low, high = bootstrap_ci(data, num_resamples=1000, seed=k)
        covered += low <= p <= high
        widths.append(high - low)
    assert 0.91 <= covered / datasets <= 0.98  # binomial sd of the rate at 400 sets: 0.011
    normal_width = 2 * 1.96 * (p * (1 - p) / n) ** 0.5
    assert sum(widths) / datasets == pytest.approx(normal_width, rel=0.05)
    # a 4x larger sample halves the width
    big = (torch.rand(4 * n, generator=generator) < p).double()
    low, high = bootstrap_ci(big)
    assert high - low == pytest.approx(normal_width / 2, rel=0.15)


def test_bootstrap_ci_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)
    with pytest.raises(ValueError, match="num_resamples"):
        bootstrap_ci([1.0], num_resamples=0)


# ------------------------------------------------------------------------------- checkpoints
def _changed_state(tiny_model_dir) -> dict:
    lm = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.25)
    return {k: v.clone() for k, v in lm.state_dict().items()}


def test_load_policy_from_checkpoint(tiny_model_dir, tmp_path):
    changed = _changed_state(tiny_model_dir)
    state = {f"policy.lm.{k}": v for k, v in changed.items()}
    state["policy.value_head.weight"] = torch.zeros(1, 32)
    del state["policy.lm.lm_head.weight"]  # tied to the embeddings: may be absent
    path = tmp_path / "last.ckpt"
    torch.save(
        {"state_dict": state, "rlhf_lightning": {"policy_source": str(tiny_model_dir)}}, path
    )

    lm, tok = load_policy_for_inference(path)
    assert tok.padding_side == "left"
    loaded = lm.state_dict()
    assert loaded.keys() == changed.keys()
    for key, value in changed.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)

    rows_file = tmp_path / "rows.jsonl"  # the CLI takes the checkpoint too
    generate_cli.main([str(path), "hello", "--max-new-tokens", "3", "--output", str(rows_file)])
    assert json.loads(rows_file.read_text())["prompt"] == "hello"


def test_checkpoint_errors(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_policy_for_inference(tmp_path / "missing.ckpt")
    no_policy = tmp_path / "rm.ckpt"
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, no_policy)
    with pytest.raises(ValueError, match="no policy weights"):
        load_policy_for_inference(no_policy)

    no_source = tmp_path / "nosource.ckpt"
    changed = _changed_state(tiny_model_dir)
    torch.save({"state_dict": {f"policy.lm.{k}": v for k, v in changed.items()}}, no_source)
    with pytest.raises(ValueError, match="--base MODEL"):
        load_policy_for_inference(no_source)
    lm, _ = load_policy_for_inference(no_source, base=str(tiny_model_dir))
    torch.testing.assert_close(lm.state_dict()["model.norm.weight"], changed["model.norm.weight"])

    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": {"policy.lm.model.extra": torch.zeros(1)}}, wrong)
    with pytest.raises(ValueError, match="do not match the base model"):
        load_policy_for_inference(wrong, base=str(tiny_model_dir))
    with pytest.raises(ValueError, match="only applies to a .ckpt"):
        load_policy_for_inference(tiny_model_dir, base="builtin:tiny")


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_policy_for_inference(str(tmp_path / "nope") + "/")


# -------------------------------------------------------------------------- reward configs
def test_rewards_are_the_configs_of_conf_reward_with_overrides():
    from rlhf_lightning.rewards.verifiers import ReasoningGymReward, last_number

    assert isinstance(reward_from_config(["vader"]), VaderReward)
    assert reward_from_config(["token_fraction", "target=e"]).target == "e"
    python = reward_from_config(["python", "fn=tests.test_generate_eval:length_reward"])
    assert isinstance(python, CallableReward)
    assert python(["p", "q"], ["ab", ""]).tolist() == [2.0, 0.0]
    extract = "extract._target_=rlhf_lightning.rewards.verifiers.last_number"
    verifier = reward_from_config(["reasoning_gym", extract, "partial_credit=true"])
    assert isinstance(verifier, ReasoningGymReward) and verifier.partial_credit
    assert verifier.extract.func is last_number
    bad = {
        ("vaderx",): "--reward vaderx: no config 'vaderx' in conf/reward/; one of: .*vader",
        ("learned",): "--reward learned: path is required",
        ("vader", "bogus=1"): "--reward vader bogus=1: .*bogus",
        (
            "token_fraction",
            "target=ee",
        ): "--reward token_fraction target=ee: target: must be a single character",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message):
            reward_from_config(list(spec))
    with pytest.raises(ValueError, match="--gold python fn=no.such:fn: cannot import"):
        reward_from_config(["python", "fn=no.such:fn"], "--gold")


def test_classifier_spec_with_and_without_label(tmp_path, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.id2label, config.label2id = {0: "NEG", 1: "POS"}, {"NEG": 0, "POS": 1}
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path)
    spec = ["classifier_imdb", f"name_or_path={tmp_path}"]
    assert reward_from_config([*spec, "label=POS"]).label_id == 1
    with pytest.raises(ValueError, match="label 'POSITIVE' is not a class"):
        reward_from_config(spec)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["first", "second"]
    assert read_prompts("shipped:sentiment/data/tiny_prompts.jsonl")[0] == "The film was"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        read_prompts(str(tmp_path / "none.jsonl"))


def test_read_prompt_rows_returns_the_scalar_columns(tmp_path):
    lines = [
        '{"prompt": "a", "answer": 3, "tags": ["x"], "note": "n"}',
        "",
        '{"prompt": "b", "answer": 4.5, "tags": []}',
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    prompts, columns = read_prompt_rows(str(tmp_path / "p.jsonl"))
    assert prompts == ["a", "b"]
    assert columns == {"answer": [3, 4.5], "note": ["n", None]}  # lists are not columns
    (tmp_path / "p.txt").write_text("first\n")
    assert read_prompt_rows(str(tmp_path / "p.txt")) == (["first"], {})


# ------------------------------------------------------------------------------------- CLIs
def test_rlhf_generate_prompts_from_args_and_file(tiny_model_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "From file"}\n')
    out = tmp_path / "out" / "rows.jsonl"
    argv = [str(tiny_model_dir), "The film was", "Hi", "--prompts-file", str(prompts_file)]
    options = ["--num-samples", "2", "--max-new-tokens", "4", "--stop-token", "none"]
    generate_cli.main([*argv, *options, "--seed", "5", "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The film was"] * 2 + ["Hi"] * 2 + ["From file"] * 2
    assert all(set(r) == {"prompt", "response"} and len(r["response"]) <= 4 for r in rows)
    lm, tok = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    gen = GenerationConfig(max_new_tokens=4, stop_token=None)
    expected = generate_texts(lm, tok, [r["prompt"] for r in rows], gen, seed=5)
    assert [r["response"] for r in rows] == expected

    generate_cli.main([str(tiny_model_dir), "Hi", "--max-new-tokens", "2", "--chat-template"])
    printed = capsys.readouterr().out
    assert printed.startswith("=== Hi\n--- [1] ")


def test_rlhf_generate_usage_errors(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main([str(tiny_model_dir)])
    assert exit_info.value.code == 2 and "no prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main([str(tmp_path / "nope") + "/", "hi"])
    assert exit_info.value.code == 2 and "model directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli.main([str(tiny_model_dir), "hi", "--top-p", "0"])
    assert "top_p" in capsys.readouterr().err


def test_rlhf_eval_end_to_end(tiny_model_dir, other_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = [str(tiny_model_dir), "--prompts", "shipped:sentiment/data/tiny_prompts.jsonl"]
    argv += [
        "--reference",
        str(other_dir),
        "--reward",
        "token_fraction",
        "target=e",
        "--gold",
        "vader",
    ]
    argv += ["--num-prompts", "5", "--max-new-tokens", "5", "--batch-size", "2"]
    samples_file = tmp_path / "samples.jsonl"
    eval_cli.main([*argv, "--output", str(out), "--samples", str(samples_file)])
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(rows) == 5 and set(result) == {"metrics", "settings"}
    assert {"prompt", "response", "reference_response", "gold_score"} <= set(rows[0])
    for key in ("reward", "reference_reward", "kl", "gold_score", "response_length"):
        assert sum(r[key] for r in rows) / 5 == pytest.approx(metrics[key], abs=1e-6), key
    # the reference's own responses, scored by the gold source (VADER's compound score)
    vader = SentimentIntensityAnalyzer()
    ref_gold = [vader.polarity_scores(r["reference_response"])["compound"] for r in rows]
    assert [r["reference_gold_score"] for r in rows] == pytest.approx(ref_gold, abs=1e-6)
    assert metrics["reference_gold_score"] == pytest.approx(sum(ref_gold) / 5, abs=1e-6)
    expected_keys = {"reward", "reference_reward", "gold_score", "reference_gold_score", "kl"}
    expected_keys |= {"response_length"}
    expected_keys |= {"ended_frac", "distinct_1", "distinct_2", "win_rate", "num_prompts"}
    means = {"reward", "reference_reward", "gold_score", "reference_gold_score", "kl"}
    means |= {"response_length", "ended_frac"}
    expected_keys |= {f"{key}_std_error" for key in (*means, "win_rate")}
    expected_keys |= {
        f"{key}{end}"
        for key in ("reward", "reference_reward", "gold_score", "reference_gold_score", "win_rate")
        for end in ("_ci_low", "_ci_high")
    }
    assert set(metrics) == expected_keys
    rewards = [row["reward"] for row in rows]
    assert (metrics["reward_ci_low"], metrics["reward_ci_high"]) == bootstrap_ci(rewards)
    assert metrics["win_rate_ci_low"] <= metrics["win_rate"] <= metrics["win_rate_ci_high"]
    assert result["settings"]["confidence"] == 0.95
    assert result["settings"]["bootstrap_resamples"] == 1000
    assert metrics["num_prompts"] == 5 and 0 < metrics["response_length"] <= 5
    assert 0 <= metrics["win_rate"] <= 1 and metrics["kl"] > 0
    assert result["settings"]["reference"] == str(other_dir)
    assert "win_rate" in capsys.readouterr().out


def test_rlhf_eval_gives_the_prompt_columns_to_the_rewards(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Sum {i}", "answer": i} for i in range(6)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "eval.json"
    argv = [str(tiny_model_dir), "--prompts", str(prompts), "--reference", str(tiny_model_dir)]
    argv += ["--reward", "python", "fn=tests.test_generate_eval:answer_reward", "--gold", "vader"]
    argv += ["--num-prompts", "4", "--max-new-tokens", "3", "--output", str(out)]
    eval_cli.main(argv)
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["reward"] == pytest.approx((0 + 1 + 2 + 3) / 4)  # the first 4 answers
    assert metrics["reference_reward"] == metrics["reward"]
    (tmp_path / "plain.txt").write_text("Sum 1\n")
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([*argv[:2], str(tmp_path / "plain.txt"), *argv[3:]])
    assert exit_info.value.code == 2
    assert "takes 'answer', which no column of the prompt data fills" in capsys.readouterr().err


def test_rlhf_eval_without_a_reference(tiny_model_dir, tmp_path):
    out, samples_file = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    argv = [str(tiny_model_dir), "--prompts", "shipped:sentiment/data/tiny_prompts.jsonl"]
    argv += ["--reference", "none", "--reward", "token_fraction", "target=e", "--num-prompts", "6"]
    argv += ["--max-new-tokens", "4", "--output", str(out), "--samples", str(samples_file)]
    eval_cli.main(argv)
    metrics = json.loads(out.read_text())["metrics"]
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "response", "reward", "response_length"}
    means = ("reward", "response_length", "ended_frac")
    assert set(metrics) == {
        *means,
        *(f"{key}_std_error" for key in means),
        "reward_ci_low",
        "reward_ci_high",
        "distinct_1",
        "distinct_2",
        "num_prompts",
    }
    lm, tok = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompts = read_prompts("shipped:sentiment/data/tiny_prompts.jsonl")[:6]
    gen = GenerationConfig(max_new_tokens=4)
    responses = generate_texts(lm, tok, prompts, gen, seed=0)
    assert [row["response"] for row in rows] == responses  # what a reference run samples too
    scores = TokenFractionReward("e")(prompts, responses)
    assert metrics["reward"] == pytest.approx(scores.mean().item())
    assert metrics["reward_std_error"] == pytest.approx(std_error(scores))


def test_rlhf_eval_scores_the_held_out_problems_of_a_prompt_config(tiny_model_dir, tmp_path):
    """--data: the data module's held-out prompts and columns; the verifier's accuracy."""
    from tests.data.test_reasoning_gym import chain_sum

    out, samples_file = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    argv = [str(tiny_model_dir), "--reference", "none", "--reward", "reasoning_gym"]
    argv += ["--data", "reasoning_gym_chain_sum", "eval_size=12", "train_size=4"]
    argv += ["max_prompt_length=400"]
    argv += ["--max-new-tokens", "3", "--output", str(out), "--samples", str(samples_file)]
    eval_cli.main(argv)
    metrics = json.loads(out.read_text())["metrics"]
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    module = chain_sum(  # conf/data/prompts/reasoning_gym_chain_sum.yaml with the overrides
        load_tokenizer(tiny_model_dir),
        max_prompt_length=400,
        batch_size=1,
        eval_batch_size=1,
        train_size=4,
        eval_size=12,
        eval_seed=1000000,
        difficulty={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
        shots=3,
    )
    assert [row["prompt"] for row in rows] == [item["prompt"] for item in module.eval_items]
    right = [
        float(row["response"].strip().split("\n")[0].strip() == item["columns"]["answer"])
        for row, item in zip(rows, module.eval_items)
    ]
    assert [row["reward"] for row in rows] == right
    assert metrics["num_prompts"] == 12 and metrics["reward"] == sum(right) / 12


def test_rlhf_eval_errors(tiny_model_dir, tmp_path, capsys):
    base = [str(tiny_model_dir), "--prompts", "shipped:sentiment/data/tiny_prompts.jsonl"]
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([*base, "--reference", str(tiny_model_dir), "--reward", "bogus"])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and "--reward bogus: no config 'bogus' in conf/reward/; one of: classifier_imdb" in err
    )
    with pytest.raises(SystemExit):
        eval_cli.main(base)
    assert "--reference MODEL is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([*base, "--reference", str(tiny_model_dir), "--confidence", "95"])
    assert exit_info.value.code == 2
    assert "--confidence must be in (0, 1), got 95.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main([*base, "--reference", str(tiny_model_dir), "--bootstrap-resamples", "0"])
    assert "--bootstrap-resamples must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([str(tiny_model_dir), "--reference", "none", "--data", "no_such_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--data no_such_config: no config 'no_such_config' in conf/data/prompts/; one of:" in err
    assert "Loading weights" not in err  # before any model loads
