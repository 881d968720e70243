"""``rlhf-train`` on impossible settings, run in this process: exit status 2 and one line
``error: invalid config: <key>: ...`` naming the key as written on the command line, no
traceback, and no model loaded.

The policy and the reward backbone are the tiny model's tokenizer alone, without weights (and
without a chat template): loading either model would fail with another error, so the line shown
proves that the check ran before any model loaded.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from rlhf_lightning.cli.train import TRACEBACKS_ENV, main


@pytest.fixture(scope="module")
def tokenizer_only(tiny_model_dir: Path, tmp_path_factory) -> str:
    """A directory holding the tiny model's tokenizer files, no weights, no chat template."""
    directory = tmp_path_factory.mktemp("tokenizer_only")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, directory / name)
    return str(directory)


def rlhf_train(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``rlhf-train *args`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored after the test (main sets it)
    monkeypatch.setenv(TRACEBACKS_ENV, "0")
    monkeypatch.setattr(sys, "argv", ["rlhf-train", *args])
    try:
        main()
        status = 0
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr()
    return status, out.out, out.err


def train_weightless(monkeypatch, capsys, tmp_path, tokenizer_only, *args: str):
    """``rlhf-train *args`` with the policy and the reward backbone weightless (see above)."""
    return rlhf_train(
        monkeypatch,
        capsys,
        f"policy.name_or_path={tokenizer_only}",
        f"reward_backbone.name_or_path={tokenizer_only}",
        f"hydra.run.dir={tmp_path}",
        *args,  # last: they may override the above
    )


def assert_one_line(status: int, err: str, key: str) -> str:
    assert status == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: invalid config: {key}: "), lines[0]
    return lines[0]


PPO = ["task=ppo", "reward=token_fraction", "data/prompts=tiny", "budget=tiny"]
RM = ["task=reward_model", "data/preferences=tiny"]

# (task overrides, the bad setting, the key named, a part of the message); every case the
# issue lists, each checked by the preflight before the task starts.
PREFLIGHT_CASES = [
    (PPO, "data.prompts.max_prompt_length=0", "data.prompts.max_prompt_length", "must be >= 1"),
    (PPO, "data.prompts.too_long=banana", "data.prompts.too_long", "must be one of"),
    (PPO, "data.prompts.on_bad_row=banana", "data.prompts.on_bad_row", "must be one of"),
    (PPO, "data.prompts.eval_fraction=0", "data.prompts.eval_fraction", "must be in (0, 1)"),
    (PPO, "data.prompts.eval_fraction=1.5", "data.prompts.eval_fraction", "got 1.5"),
    (PPO, "data.prompts.template='Review: {text}'", "data.prompts.template", "{prompt}"),
    (RM, "data.preferences.max_length=0", "data.preferences.max_length", "must be >= 1"),
    (PPO, "policy.name_or_path=builtin:banana", "policy.name_or_path", "unknown builtin"),
    (PPO, "policy.dtype=banana", "policy.dtype", "unknown dtype 'banana'"),
]


@pytest.mark.parametrize(
    ("task", "setting", "key", "reason"),
    PREFLIGHT_CASES,
    ids=[case[1] for case in PREFLIGHT_CASES],
)
def test_a_bad_setting_stops_before_the_task_starts(
    monkeypatch, capsys, tmp_path, tokenizer_only, task, setting, key, reason
):
    status, out, err = train_weightless(
        monkeypatch, capsys, tmp_path, tokenizer_only, *task, setting
    )
    assert reason in assert_one_line(status, err, key)
    assert "Seed set" not in out + err  # the task did not start


@pytest.mark.parametrize(
    ("task", "setting", "key", "reason"),
    [
        # the stop token is checked against the tokenizer, once it is loaded
        (PPO, "generation.stop_token='the end'", "generation.stop_token", "it must be exactly one"),
        (PPO, "policy.use_chat_template=true", "policy.use_chat_template", "no chat template"),
        # tiny preferences: 96 training pairs, batches of 16: 6 batches per epoch
        (RM, "rm.val_check_interval=1000", "rm.val_check_interval", "(6 batches of 16 pairs"),
    ],
    ids=["stop_token", "use_chat_template", "val_check_interval"],
)
def test_a_setting_checked_against_the_tokenizer_or_data_stops_before_any_model_loads(
    monkeypatch, capsys, tmp_path, tokenizer_only, task, setting, key, reason
):
    status, _, err = train_weightless(monkeypatch, capsys, tmp_path, tokenizer_only, *task, setting)
    assert reason in assert_one_line(status, err, key)


def test_the_pipeline_checks_its_ppo_stage_before_training_the_reward_model(
    monkeypatch, capsys, tmp_path, tokenizer_only
):
    status, _, err = train_weightless(
        monkeypatch,
        capsys,
        tmp_path,
        tokenizer_only,
        "task=pipeline",
        "data/prompts=tiny",
        "data/preferences=tiny",
        "generation.stop_token='the end'",
    )
    assert_one_line(status, err, "generation.stop_token")
    assert not (tmp_path / "checkpoints").exists()


def test_a_model_directory_without_weights_is_one_line(
    monkeypatch, capsys, tmp_path, tokenizer_only
):
    status, _, err = train_weightless(monkeypatch, capsys, tmp_path, tokenizer_only, *PPO)
    assert status == 2, err[-3000:]
    assert err.strip() == (
        f"error: model directory {tokenizer_only}: missing config.json and safetensors weights"
    )


def test_debug_shows_the_traceback_before_the_line(monkeypatch, capsys, tmp_path):
    status, _, err = rlhf_train(
        monkeypatch, capsys, *PPO, "policy=tiny", f"hydra.run.dir={tmp_path}", "debug=true",
        "data.prompts.too_long=banana",
    )  # fmt: skip
    assert status == 2
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: invalid config: data.prompts.too_long")
