"""experiments/sentiment/rm_analysis.py: error diagnostics and calibration of a reward-model run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_lightning.calibration import calibration_bins, expected_calibration_error
from rlhf_lightning.data.preferences import RewardTextFormat
from rlhf_lightning.models import ScalarRewardModel, load_reward_tokenizer
from rlhf_lightning.models.reward_model import score_pairs
from rlhf_lightning.tasks.reward_model import train_reward_model
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str = "rm_analysis"):
    """``experiments/sentiment/<name>.py`` imported as a module."""
    path = REPO / "experiments" / "sentiment" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rm_analysis = _load_script()


def test_words_strip_punctuation_and_case():
    assert rm_analysis.words("Great, GREAT film!! (not bad)") == {"great", "film", "not", "bad"}


def test_valence_sum_ignores_vaders_rules():
    lexicon = SentimentIntensityAnalyzer().lexicon
    assert rm_analysis.valence_sum(lexicon, "Not good, but DULL!") == pytest.approx(1.9 - 1.7)


def test_accuracy_by_bins_hand_values():
    values = [0.1, 0.15, 0.25, 0.5, 2.0]
    correct = [True, False, True, True, False]
    rows = rm_analysis.accuracy_by_bins(values, correct, (0.1, 0.2, 0.3, 2.0))
    assert [(r["low"], r["count"], r["accuracy"]) for r in rows] == [
        (0.1, 2, 0.5),
        (0.2, 1, 1.0),
        (0.3, 2, 0.5),  # 0.5 and 2.0 (the last edge belongs to the last bin)
    ]
    assert rm_analysis.accuracy_by_bins([5.0], [True], (0.0, 1.0, 2.0)) == []


def test_pair_features_on_a_shipped_pair_whose_label_flips_in_context():
    """A held-out pair of the shipped data: VADER of the responses alone prefers `chosen`, VADER
    of prompt + " " + response (what the reward model reads) prefers `rejected`."""
    item = {
        "prompt": "Film review: The opening scene was so dull that",
        "chosen": "I had to give it another shot. I'll be keeping a close eye on it and I'm going "
        "to go over it again.",
        "rejected": "the reader could not help but wonder what was going to happen.",
        "chosen_ids": [0] * 40,
        "rejected_ids": [0] * 20,
    }
    seen = rm_analysis.words(item["chosen"] + " " + item["rejected"])
    features = rm_analysis.pair_features(
        SentimentIntensityAnalyzer(), item, RewardTextFormat(" ", 96), seen
    )
    assert features["gap"] == pytest.approx(0.0 - (-0.1603))  # the stored scores
    assert features["new_lexicon_word"] is False
    assert features["flips_in_context"] is True
    assert features["flips_lowercased"] is False
    assert features["truncated"] is False and features["chosen_longer"] is True
    other = rm_analysis.pair_features(
        SentimentIntensityAnalyzer(), item, RewardTextFormat(" ", 40), seen - {"help"}
    )
    assert other["truncated"] is True
    assert other["new_lexicon_word"] is True  # "help" is in VADER's lexicon (+1.7)


def test_case_that_only_capitals_decide_is_flagged():
    # VADER boosts an all-caps sentiment word in mixed-case text: 0.5622 against 0.4404
    item = {"prompt": "Review:", "chosen": "The movie was GOOD.", "rejected": "The movie was good."}
    item |= {"chosen_ids": [1], "rejected_ids": [2]}
    features = rm_analysis.pair_features(
        SentimentIntensityAnalyzer(), item, RewardTextFormat(" ", 96)
    )
    assert features["gap"] > 0 and features["flips_lowercased"] is True
    assert features["rule_decided"] is True  # equal valence sums


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A reward-model run dir as `rlhf-train task=reward_model` leaves it (tiny model, data)."""
    run = tmp_path_factory.mktemp("rm_run")
    overrides = [
        f"paths.output_dir={run}",
        "task=reward_model",
        "reward_backbone=tiny",
        "data/preferences=tiny",
        "trainer.enable_progress_bar=false",
        "~logger",
        "rm.max_epochs=1",
        "rm.lr=3e-4",
    ]
    cfg = compose_config(overrides)
    train_reward_model(cfg)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run


def test_analysis_scores_the_validation_pairs_and_writes_only_into_out(tiny_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in (REPO / "experiments").rglob("*") if p.is_file()}
    out = tiny_run / "analysis"
    rm_analysis.main([str(tiny_run), "--out", str(out)])
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"pairs.jsonl", "reliability.png", "summary.json"}
    after = {p: p.stat().st_mtime_ns for p in (REPO / "experiments").rglob("*") if p.is_file()}
    assert before == after

    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 32  # the tiny eval split
    model = ScalarRewardModel.from_pretrained(tiny_run / "reward_model")
    tokenizer = load_reward_tokenizer(tiny_run / "reward_model")
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    scores = score_pairs(model, tokenizer, prompts, responses)
    margins = scores[:32] - scores[32:]
    torch.testing.assert_close(
        torch.tensor([p["margin"] for p in pairs]), margins, atol=1e-5, rtol=1e-5
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx((margins > 0).float().mean().item())
    assert summary["ece"] == pytest.approx(
        expected_calibration_error(calibration_bins(margins)), abs=1e-6
    )
    assert sum(row["count"] for row in summary["by_gap"]) == 32
    assert f"ECE {summary['ece']:.4f}" in printed and "| VADER gap |" in printed


def test_analysis_of_a_dir_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="expected .hydra/config.yaml and reward_model/"):
        rm_analysis.main([str(tmp_path)])


def _load_bow():
    return _load_script("bow_baseline")


def test_bow_count_matrix_and_valence_sum_hand_values():
    bow = _load_bow()
    counts = bow.count_matrix(["Good, good film!", "bad"], {"good": 0, "film": 1})
    assert counts.tolist() == [[2.0, 1.0], [0.0, 0.0]]
    pairs = [
        {"chosen": "The movie was good.", "rejected": "The movie was dull."},  # 1.9 > -1.7
        {"chosen": "The movie was good.", "rejected": "The movie was not good."},  # tie: wrong
    ]
    assert bow.valence_sum_accuracy(pairs) == 0.5


def test_bow_model_separates_the_tiny_pairs_it_was_not_fitted_on():
    """The tiny pairs: chosen from positive words only, rejected from negative ones. Fitted on
    the first 96, the word-count model orders the other 32 right."""
    bow = _load_bow()
    pairs = bow.read_pairs(REPO / "experiments" / "sentiment" / "data" / "tiny_preferences.jsonl")
    result = bow.evaluate(pairs[:96], pairs[96:], lexicon_only=False, penalty=1e-4)
    assert result["train_accuracy"] == 1.0 and result["eval_accuracy"] == 1.0
    assert result["vocabulary"] == 12  # the 6 positive and 6 negative words, all in VADER
    lexicon_only = bow.evaluate(pairs[:96], pairs[96:], lexicon_only=True, penalty=1e-4)
    assert lexicon_only["vocabulary"] == 12 and lexicon_only["eval_accuracy"] == 1.0
