"""reasoning-gym tasks: the prompt data module (splits, seeds, prompt forms) and the verifier
reward (right, wrong, malformed and empty answers). Tiny character tokenizer, no model."""

from __future__ import annotations

import json

import pytest
import reasoning_gym
from hydra.utils import instantiate

from rlhf_lightning.config import ConfigError
from rlhf_lightning.data import ReasoningGymPrompts
from rlhf_lightning.data.reasoning_gym import ITEM_COLUMN
from rlhf_lightning.data.tokenize import render_chat
from rlhf_lightning.errors import UserError
from rlhf_lightning.models.tiny import build_char_tokenizer
from rlhf_lightning.rewards import RewardError
from rlhf_lightning.rewards.verifiers import (
    ReasoningGymReward,
    answer_tag,
    first_line,
    last_number,
)
from tests.conftest import compose_config

CHAIN_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def chain_sum(tokenizer, **overrides) -> ReasoningGymPrompts:
    settings = dict(
        generator="chain_sum",
        tokenizer=tokenizer,
        max_prompt_length=2000,
        batch_size=4,
        eval_batch_size=8,
        seed=0,
        train_size=40,
        eval_size=30,
        train_seed=1,
        eval_seed=2,  # Random(seed + index): seeds 1 and 2 share all but one item, shifted
        difficulty=CHAIN_SUM,
        shots=2,
    )
    module = ReasoningGymPrompts(**{**settings, **overrides})
    module.setup()
    return module


def questions(items) -> list[str]:
    """The question of each item, from the problem its ``reasoning_gym`` column names."""
    out = []
    for item in items:
        spec = json.loads(item["columns"][ITEM_COLUMN])
        dataset = reasoning_gym.create_dataset(
            spec["generator"], seed=spec["seed"], size=1, **spec["difficulty"]
        )
        out.append(dataset[spec["index"]]["question"])
    return out


# ------------------------------------------------------------------------------ data module


def test_splits_and_examples_are_disjoint_even_for_overlapping_seeds(tokenizer):
    module = chain_sum(tokenizer)
    train, held_out = questions(module.train_items), questions(module.eval_items)
    examples = [entry["question"] for entry in module.examples]
    assert (len(train), len(held_out), len(examples)) == (40, 30, 2)
    assert len(set(train)) == 40 and len(set(held_out)) == 30 and len(set(examples)) == 2
    assert not set(train) & set(held_out)
    assert not set(examples) & (set(train) | set(held_out))
    # The test means something: the generator's raw train stream repeats held-out problems.
    raw = reasoning_gym.create_dataset("chain_sum", seed=1, size=1, **CHAIN_SUM)
    assert {raw[i]["question"] for i in range(42)} & set(held_out)


def test_splits_are_reproducible_and_set_by_the_data_seeds_only(tokenizer):
    first, again = chain_sum(tokenizer), chain_sum(tokenizer, seed=7)  # another run seed
    assert [i["input_ids"] for i in first.train_items] == [
        i["input_ids"] for i in again.train_items
    ]
    assert [i["columns"] for i in first.eval_items] == [i["columns"] for i in again.eval_items]
    other = chain_sum(tokenizer, eval_seed=1000)
    assert questions(other.eval_items) != questions(first.eval_items)
    # The held-out split is the generator's own items at eval_seed, in order, duplicates out.
    dataset = reasoning_gym.create_dataset("chain_sum", seed=1000, size=1, **CHAIN_SUM)
    expected = list(dict.fromkeys(dataset[i]["question"] for i in range(60)))[:30]
    assert questions(other.eval_items) == expected


def test_text_prompt_shows_the_examples_with_their_answers(tokenizer):
    module = chain_sum(tokenizer, instruction="Answer with a number.")
    item = module.eval_items[0]
    (ex1, ex2), question = module.examples, questions([item])[0]
    expected = (
        f"Q: {ex1['question']}\nAnswer with a number.\nA: {ex1['answer']}\n"
        f"Q: {ex2['question']}\nAnswer with a number.\nA: {ex2['answer']}\n"
        f"Q: {question}\nAnswer with a number.\nA:"
    )
    assert item["prompt"] == expected
    assert item["input_ids"] == tokenizer(expected)["input_ids"]
    spec = json.loads(item["columns"][ITEM_COLUMN])
    dataset = reasoning_gym.create_dataset("chain_sum", seed=2, size=1, **CHAIN_SUM)
    assert item["columns"]["answer"] == dataset[spec["index"]]["answer"]


def test_chat_template_turns_the_examples_into_turns(tokenizer):
    module = chain_sum(tokenizer, chat_template=True)
    item = module.eval_items[0]
    (ex1, ex2), question = module.examples, questions([item])[0]
    messages = [
        {"role": "user", "content": ex1["question"]},
        {"role": "assistant", "content": ex1["answer"]},
        {"role": "user", "content": ex2["question"]},
        {"role": "assistant", "content": ex2["answer"]},
        {"role": "user", "content": question},
    ]
    assert item["input_ids"] == render_chat(tokenizer, messages).token_ids
    rendered = tokenizer.decode(item["input_ids"])
    assert rendered.endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")
    assert f"<|im_start|>assistant\n{ex1['answer']}<|im_end|>" in rendered
    assert item["prompt"] == question  # what a reward sees as the prompt


def test_shipped_configs_compose_and_build(tokenizer):
    for name in ("reasoning_gym_chain_sum", "reasoning_gym_basic_arithmetic"):
        cfg = compose_config(
            [
                f"data/prompts={name}",
                "data.prompts.train_size=8",
                "data.prompts.eval_size=4",
                "data.prompts.max_prompt_length=1000",
            ]
        )
        module = instantiate(cfg.data.prompts, tokenizer=tokenizer, batch_size=4)
        module.setup()
        assert len(module.train_items) == 8 and len(module.eval_items) == 4
        assert module.generator == cfg.data.prompts.generator


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"generator": "chain_sums"},
            r"data\.prompts\.generator: reasoning-gym has no .*chain_sum",
        ),
        ({"difficulty": {"min_term": 2}}, r"data\.prompts\.difficulty: chain_sum rejects"),
        ({"difficulty": {"min_terms": 5, "max_terms": 2}}, r"data\.prompts\.difficulty"),
        ({"difficulty": {"seed": 3}}, r"seed and size are set by"),
        ({"eval_seed": 1}, r"^eval_seed: must differ"),
        ({"train_size": 0}, r"^train_size: must be >= 1"),
        ({"shots": -1}, r"^shots: must be >= 0"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_key(tokenizer, overrides, message):
    """Built directly, a setting's error names the argument; through the config, the preflight
    names it by its key first (below)."""
    with pytest.raises(UserError, match=message):
        chain_sum(tokenizer, **overrides)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.prompts.train_size=0", "data.prompts.train_size"),
        ("data.prompts.shots=-1", "data.prompts.shots"),
        ("data.prompts.eval_seed=${data.prompts.train_seed}", "data.prompts.eval_seed"),
    ],
)
def test_the_preflight_names_a_bad_setting_by_its_key(override, key):
    from rlhf_lightning.preflight import preflight

    cfg = compose_config(
        [
            "task=ppo",
            "paths.output_dir=/tmp/unused",
            "data/prompts=reasoning_gym_chain_sum",
            override,
        ]
    )
    with pytest.raises(ConfigError, match=f"^invalid config: {key.replace('.', '[.]')}: "):
        preflight(cfg)


def test_too_few_distinct_problems_is_a_config_error(tokenizer):
    # 2 one-digit terms joined by + or -: at most 200 distinct questions.
    with pytest.raises(ConfigError, match=r"distinct training questions .* 300 asked for"):
        chain_sum(tokenizer, train_size=300)


# ----------------------------------------------------------------------------------- reward


def test_extractors():
    assert first_line("  7\nQ: 1 + 1 =") == "7"
    assert first_line(" \n ") is None and first_line("") is None
    assert last_number("The answer is -1,000.5 apples, not 3.") == "3"
    assert last_number("It is 12, I think\n5") == "12"
    assert last_number("no digits here") is None
    assert answer_tag("<answer>4</answer> then <answer> 5 </answer>") == "5"
    assert answer_tag("<answer></answer>") is None and answer_tag("4") is None


@pytest.fixture
def batch(tokenizer):
    """The first held-out batch of 8 chain_sum prompts, as the trainer sees it."""
    return next(iter(chain_sum(tokenizer).val_dataloader()))


def test_verifier_scores_right_wrong_malformed_and_empty_answers(batch):
    reward = ReasoningGymReward()
    answers = batch["columns"]["answer"]
    wrong = str(int(answers[1]) + 1)
    responses = [
        f" {answers[0]}\nQ: the model goes on",  # right, on the first line
        wrong,  # wrong
        f"{answers[2]}.0",  # right: chain_sum's verifier reads numbers
        "seven",  # malformed: not a number
        "",  # empty
        "   \n  ",  # blank
        f"\n\n{answers[6]}",  # right after blank lines: the first non-blank line
        f"{answers[7]} or {wrong}",  # two answers: not the answer
    ]
    scores = reward(batch["prompts"], responses, **batch["columns"])
    assert scores.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # The verifier's part marks: the reference's share of an answer that contains it.
    partial = ReasoningGymReward(partial_credit=True)(
        batch["prompts"], responses, **batch["columns"]
    )
    part = len(answers[7]) / len(responses[7])
    assert partial.tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, part])


def test_extract_is_configurable(batch):
    reward = ReasoningGymReward(extract=last_number)
    answers = batch["columns"]["answer"]
    responses = [f"The result is {a}." for a in answers]
    responses[3] = "I do not know."
    scores = reward(batch["prompts"], responses, **batch["columns"])
    assert scores.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    first = ReasoningGymReward()(batch["prompts"], responses, **batch["columns"])
    assert first.tolist() == [0.0] * 8


def test_verifier_is_the_generators_own(tokenizer):
    """leg_counting's verifier (reasoning-gym's default) gives part marks to an answer that
    contains the reference; the reward passes them on only with partial_credit."""
    module = chain_sum(
        tokenizer,
        generator="leg_counting",
        difficulty={"min_animals": 1, "max_animals": 2},
        train_size=4,
    )
    item = module.eval_items[0]
    spec = json.loads(item["columns"][ITEM_COLUMN])
    dataset = reasoning_gym.create_dataset(
        "leg_counting", seed=2, size=1, min_animals=1, max_animals=2
    )
    entry = dataset[spec["index"]]
    columns = {ITEM_COLUMN: [item["columns"][ITEM_COLUMN]] * 3}
    responses = [entry["answer"], entry["answer"] + " legs", "many"]
    part = len(entry["answer"]) / len(responses[1])
    partial = ReasoningGymReward(partial_credit=True)(["q"] * 3, responses, **columns)
    assert partial.tolist() == pytest.approx([1.0, part, 0.0])
    assert [dataset.score_answer(answer, entry) for answer in responses] == pytest.approx(
        [1.0, part, 0.0]
    )
    assert ReasoningGymReward()(["q"] * 3, responses, **columns).tolist() == [1.0, 0.0, 0.0]


def test_a_verifier_that_raises_on_a_malformed_answer_scores_it_0():
    dataset = reasoning_gym.create_dataset("coin_flip", seed=1, size=1)
    entry = dataset[0]
    with pytest.raises(OverflowError):  # coin_flip's own verifier, on a number too large
        dataset.score_answer("1e999999", entry)
    item = json.dumps({"generator": "coin_flip", "difficulty": {}, "seed": 1, "index": 0})
    responses = ["1e999999", entry["answer"]]
    scores = ReasoningGymReward()(["q"] * 2, responses, reasoning_gym=[item] * 2)
    assert scores.tolist() == [0.0, 1.0]


def test_missing_or_bad_problem_column_is_a_reward_error():
    reward = ReasoningGymReward()
    with pytest.raises(RewardError, match=r"takes 'reasoning_gym', which no column"):
        reward(["q"], ["1"], answer=["1"])
    with pytest.raises(RewardError, match=r"column 'reasoning_gym' must be a JSON object"):
        reward(["q"], ["1"], reasoning_gym=["not json"])
    spec = {"generator": "chain_sums", "difficulty": {}, "seed": 1, "index": 0}
    with pytest.raises(RewardError, match=r"no generator 'chain_sums'"):
        reward(["q"], ["1"], reasoning_gym=[json.dumps(spec)])


# ------------------------------------------------------------------------------ a real run


def test_grpo_on_a_reasoning_gym_task_writes_each_held_out_score(tmp_path):
    """The README's command on the tiny model: rewards from the verifier, the last evaluation's
    per-prompt scores in heldout.jsonl (what rlhf-compare --per-prompt reads)."""
    from rlhf_lightning.cli.train import run

    overrides = [
        f"paths.output_dir={tmp_path}",
        "task=ppo",
        "policy=tiny",
        "data/prompts=reasoning_gym_chain_sum",
        "reward=reasoning_gym",
        "algorithm=grpo",
        "budget=tiny",
        "generation=single_line",
        "generation.max_new_tokens=4",
        "data.prompts.train_size=16",
        "data.prompts.eval_size=6",
        "data.prompts.eval_batch_size=4",
        "data.prompts.max_prompt_length=400",
        "task.eval_every=1",
        "task.eval_batches=null",
        "trainer.enable_progress_bar=false",
        "~logger",
    ]
    cfg = compose_config(overrides)
    metric = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    module = instantiate(cfg.data.prompts, tokenizer=build_char_tokenizer(), batch_size=2)
    module.setup()
    assert [row["prompt"] for row in rows] == [item["prompt"] for item in module.eval_items]
    assert all(row["reward"] in (0.0, 1.0) for row in rows)
    assert metric == pytest.approx(sum(row["reward"] for row in rows) / 6)  # val/reward
