"""Reward-model training end to end on the tiny separable preference set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rlhf_lightning.data.validation import DataValidationError
from rlhf_lightning.models import ScalarRewardModel, load_reward_tokenizer
from rlhf_lightning.models.reward_model import score_pairs
from rlhf_lightning.modules.reward_model import fit_normalization
from rlhf_lightning.rewards import LearnedReward
from rlhf_lightning.tasks.reward_model import train_reward_model
from tests.conftest import compose_config

TINY_RM = [
    "task=reward_model",
    "reward_backbone=tiny",
    "data/preferences=tiny",
    "trainer.enable_progress_bar=false",
    "rm.lr=3e-3",
    "rm.warmup_ratio=0.0",
]


def _cfg(tmp_path, *overrides):
    return compose_config([f"paths.output_dir={tmp_path}", *TINY_RM, *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    result = train_reward_model(_cfg(out, "rm.max_epochs=3"))
    return out, result


def test_tiny_model_separates_the_trivial_preferences(trained):
    _, result = trained
    assert result["metric"] == pytest.approx(1.0)  # best val/accuracy


def test_normalisation_gives_mean_zero_std_one_on_the_training_responses(trained):
    out, result = trained
    from hydra.utils import instantiate

    tokenizer = load_reward_tokenizer(out / "reward_model")
    dm = instantiate(_cfg(out).data.preferences, tokenizer=tokenizer)
    dm.setup("fit")
    model = ScalarRewardModel.from_pretrained(out / "reward_model")
    # The exported model reads pairs as its preference data did (conf/data/preferences/tiny).
    assert model.text_format == dm.text_format
    assert (model.text_format.joiner, model.text_format.max_length) == (" ", 48)
    prompts, responses = zip(*dm.train_texts())
    normalized = score_pairs(model, tokenizer, prompts, responses, normalize=True)
    assert normalized.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert normalized.std().item() == pytest.approx(1.0, abs=1e-4)
    assert result["norm_gain"] == pytest.approx(model.gain.item())


def test_exported_model_reloads_with_identical_scores(trained):
    out, _ = trained
    model = ScalarRewardModel.from_pretrained(out / "reward_model")
    tokenizer = load_reward_tokenizer(out / "reward_model")
    prompts, responses = ["The film was", "The film is"], [" good good.", " bad."]
    ids = [tokenizer(f"{p} {r.strip()}")["input_ids"] for p, r in zip(prompts, responses)]
    direct = torch.cat(
        [model(torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long), True) for i in ids]
    )
    via_reward = LearnedReward(str(out / "reward_model"))(prompts, responses)
    torch.testing.assert_close(via_reward, direct)
    assert via_reward[0] > via_reward[1]


def test_fit_normalization_hand_values():
    gain, bias = fit_normalization(torch.tensor([1.0, 3.0]))
    # mean 2, unbiased std sqrt(2): gain = 1/sqrt(2), bias = -2/sqrt(2)
    assert gain == pytest.approx(2**-0.5) and bias == pytest.approx(-(2**0.5))
    with pytest.raises(ValueError):
        fit_normalization(torch.tensor([1.0, 1.0]))


def test_resume_continues_at_the_right_step_with_optimizer_state(tmp_path):
    first = train_reward_model(_cfg(tmp_path, "rm.max_epochs=1"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    steps_per_epoch = state["global_step"]
    assert steps_per_epoch > 0 and first["path"]
    resumed = train_reward_model(_cfg(tmp_path, "rm.max_epochs=2", "ckpt_path=last"))
    state2 = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state2["global_step"] == 2 * steps_per_epoch
    adam_steps = {int(s["step"]) for s in state2["optimizer_states"][0]["state"].values()}
    assert adam_steps == {2 * steps_per_epoch}  # optimizer state carried over, not restarted
    assert resumed["path"]


def test_bad_preference_file_stops_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
        '{"prompt": "a", "chosen": "same", "rejected": "same"}\n'
    )
    cfg = _cfg(tmp_path, f"data.preferences.path={bad}", "data.preferences.eval_fraction=0.5")
    with pytest.raises(DataValidationError, match=r"bad\.jsonl.*(row|line) 2"):
        train_reward_model(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_reward_model_under_ddp_with_two_cpu_processes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "rlhf_lightning.cli.train",
        *TINY_RM,
        "trainer=ddp_cpu",
        "rm.max_epochs=2",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    # 96 train pairs, batch 16: 6 batches per epoch on one process, 3 per rank on two.
    assert state["global_step"] == 2 * 3
    assert (tmp_path / "reward_model" / "reward_head.safetensors").is_file()
