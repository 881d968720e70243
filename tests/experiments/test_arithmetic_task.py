"""The arithmetic task: its reward, its shipped prompts and its experiment config."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from hydra.utils import instantiate

from experiments.arithmetic.reward import first_number, first_number_correct
from rlhf_lightning.models import load_tokenizer
from rlhf_lightning.rewards import build_reward
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "experiments" / "arithmetic" / "data"


def _make_data():
    spec = importlib.util.spec_from_file_location("arithmetic_make_data", DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_first_number_hand_values():
    assert first_number(" 7") == 7
    assert first_number(" 12 apples, not 13") == 12
    assert first_number("The answer is -3.") == -3
    assert first_number(" seven") is None
    assert first_number("") is None


def test_first_number_correct_scores_each_response_against_its_answer():
    responses = [" 7", " 8", "It is 7", " seven", " 70"]
    assert first_number_correct([""] * 5, responses, [7, 7, 7, 7, 7]) == [1, 0, 1, 0, 0]
    assert first_number_correct(["", ""], [" 4", " 5"], ["4", "4"]) == [1.0, 0.0]  # str answers


def test_shipped_prompts_are_what_make_data_writes_and_answers_are_the_sums():
    make_data = _make_data()
    train, evals = make_data.make_splits(1024, 128, shots=3, terms=2, max_operand=5, seed=1234)
    assert _rows("prompts_train.jsonl") == train
    assert _rows("prompts_eval.jsonl") == evals
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    for row in train + evals:
        *solved, question = re.findall(r"Q: (\d) \+ (\d) = \?\nA:( \d+)?", row["prompt"])
        assert len(solved) == 3 and question[2] == ""
        for a, b, total in solved:  # the worked examples are right
            assert int(a) + int(b) == int(total)
        assert row["answer"] == int(question[0]) + int(question[1])
        assert row["prompt"].endswith("A:")


def test_shipped_preference_pairs_choose_the_right_answer_over_a_wrong_one():
    make_data = _make_data()
    train, evals = make_data.make_splits(1024, 128, shots=3, terms=2, max_operand=5, seed=1234)
    for split, rows, seed in (("train", train, 1234), ("eval", evals, 1235)):
        pairs = _rows(f"preferences_{split}.jsonl")
        assert pairs == make_data.make_pairs(rows, 10, seed)
        assert [p["prompt"] for p in pairs] == [r["prompt"] for r in rows]
        for pair, row in zip(pairs, rows):
            assert first_number_correct(
                [""] * 2, [pair["chosen"], pair["rejected"]], [row["answer"]] * 2
            ) == [1.0, 0.0]
            assert 0 <= int(pair["rejected"]) <= 10 and pair["chosen"] == f" {row['answer']}"


@pytest.mark.slow
def test_experiment_config_gives_the_reward_the_answer_column():
    """The composed experiment: its prompt data carries `answer`, and its reward, built as PPO
    builds it, scores the right answers 1 and wrong ones 0."""
    cfg = compose_config(["experiment=arithmetic"])
    assert cfg.task.name == "ppo" and cfg.policy.name_or_path == "builtin:smollm2"
    tokenizer = load_tokenizer(cfg.policy.name_or_path, padding_side="left")
    datamodule = instantiate(cfg.data.prompts, tokenizer=tokenizer)
    datamodule.setup("fit")  # too_long=error: every prompt fits max_prompt_length
    assert len(datamodule.train_items) == 1024 and len(datamodule.eval_items) == 128
    batch = next(iter(datamodule.val_dataloader()))
    answers = batch["columns"]["answer"]
    assert len(answers) == len(batch["prompts"]) == cfg.data.prompts.eval_batch_size
    reward = build_reward(instantiate(cfg.reward))
    right = [f" {a}" for a in answers]
    wrong = [f" {a + 1}" for a in answers]
    assert reward(batch["prompts"], right, answer=answers).tolist() == [1.0] * len(answers)
    assert reward(batch["prompts"], wrong, answer=answers).tolist() == [0.0] * len(answers)
