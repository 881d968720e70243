"""What `rlhf-train` shows in the terminal: one-line errors, --help, the end-of-run report and
no library noise. Each test runs the real command in a subprocess on the tiny model."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from rlhf_lightning.cli.train import (
    CONF_DIR,
    QUIET_LOG_LINES,
    TRACEBACKS_ENV,
    DropMessages,
    hydra_config_message,
    quiet_log_lines,
    user_error_message,
)
from rlhf_lightning.config import ConfigError
from tests.conftest import compose_config

TINY_PPO = ["task=ppo", "policy=tiny", "reward=token_fraction", "data/prompts=tiny"]


def _train(*args: str, **env: str) -> subprocess.CompletedProcess:
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", TRACEBACKS_ENV)
    }
    full_env = {**inherited, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    cmd = [sys.executable, "-m", "rlhf_lightning.cli.train", *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def _assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 2 and stderr exactly one line ``error: ...`` holding each ``expected``."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0]
    return lines[0]


# which errors are the user's (in process) -------------------------------------------------------


def _compose(*overrides: str):
    return compose_config([*TINY_PPO, *overrides])


def fails_inside(**kwargs):
    """A target with a bug: the TypeError comes from inside it, not from its arguments."""
    return len(42)


def rejects_config(**kwargs):
    raise ConfigError("invalid config: reward.scale: must be > 0")


def _instantiate_error(node: dict) -> Exception:
    with pytest.raises(Exception) as error:
        instantiate(node)
    return error.value


def test_user_errors_and_their_messages():
    assert user_error_message(ConfigError("invalid config: a.b: bad")) == "invalid config: a.b: bad"
    assert user_error_message(FileNotFoundError("ckpt_path: no checkpoint at x")) == (
        "ckpt_path: no checkpoint at x"
    )
    cfg = _compose("reward=learned")
    with pytest.raises(Exception) as missing:
        cfg.reward.path  # noqa: B018  (reading it raises)
    assert user_error_message(missing.value) == (
        "reward.path: required, no value set (e.g. reward.path=...)"
    )
    bad_argument = _instantiate_error(_compose("+reward.no_such_arg=1").reward)
    message = user_error_message(bad_argument)
    assert message.startswith("reward: ") and "unexpected keyword argument 'no_such_arg'" in message
    rejected = _instantiate_error({"_target_": f"{__name__}.rejects_config"})
    assert user_error_message(rejected) == "invalid config: reward.scale: must be > 0"


def test_bugs_are_not_user_errors():
    assert user_error_message(RuntimeError("boom")) is None
    assert user_error_message(KeyError("x")) is None
    assert user_error_message(_instantiate_error({"_target_": f"{__name__}.fails_inside"})) is None
    wrapped = RuntimeError("a bug while handling it")
    wrapped.__cause__ = ConfigError("invalid config: x: y")
    assert user_error_message(wrapped) is None  # only Hydra's instantiate wrapper is looked into


def test_hydra_composition_errors_read_as_one_line():
    with pytest.raises(ConfigCompositionException) as error:
        _compose("no_such_key=1")
    assert hydra_config_message(error.value) == (
        "Could not override 'no_such_key'. To append to your config use +no_such_key=1 "
        "(no_such_key: Key 'no_such_key' is not in struct)"
    )


# errors on the command line ----------------------------------------------------------------------


def test_a_bad_config_value_is_one_line_naming_the_key(tmp_path):
    proc = _train(*TINY_PPO, "algorithm.kl.reward.coef=-1", f"hydra.run.dir={tmp_path}")
    line = _assert_one_error_line(proc)
    assert line == "error: invalid config: algorithm.kl.reward.coef: must be >= 0, got -1"


def test_each_failing_sweep_job_reports_its_line(tmp_path):
    """Job 0 misses reward.path (checked before the data is read), job 1 its prompts file."""
    proc = _train(
        "-m",
        *TINY_PPO,
        "reward=learned,token_fraction",
        "data.prompts.path=/no/such/prompts.jsonl",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "full_key" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, proc.stderr[-3000:]  # the sweep went on after the first failure
    assert errors[0].startswith("error: invalid config: reward.path: required")
    assert errors[1] == "error: /no/such/prompts.jsonl: file not found"


def test_hydra_composition_errors_are_one_line_too():
    proc = _train("policy=no_such_policy")
    _assert_one_error_line(proc, "Could not find 'policy/no_such_policy'", "options: ", "tiny")


def test_tracebacks_on_request(tmp_path):
    args = [*TINY_PPO, "algorithm.kl.reward.coef=-1", f"hydra.run.dir={tmp_path}"]
    full = _train(*args, HYDRA_FULL_ERROR="1")
    assert full.returncode != 0
    assert "Traceback" in full.stderr
    assert "ConfigError: invalid config: algorithm.kl.reward.coef" in full.stderr
    debug = _train(*args, "debug=true")
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("error: invalid config: algorithm.kl")


def test_a_bug_keeps_its_traceback(tmp_path):
    # job_subdir(cfg) misses an argument: a TypeError that no config value explains
    proc = _train(
        *TINY_PPO, "task.fn=rlhf_lightning.cli.train.job_subdir", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "TypeError" in proc.stderr


# --help ----------------------------------------------------------------------------------------


def test_help_describes_the_tasks_and_lists_the_algorithm_presets():
    proc = _train("--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for task in ("pipeline", "reward_model", "ppo"):
        assert f"\n  {task} " in text
    presets = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))
    assert f"algorithm: {', '.join(presets)}" in text  # Hydra's list of the group's options
    assert "tensorboard --logdir" in text and "outputs/<task>/" in text


# a whole run -----------------------------------------------------------------------------------

NOISE = (
    "in eval mode at the start of training",
    "Tip:",
    "litlogger",
    "GPU available: False",
    "TPU available",
    "LeafSpec",
    "┏",  # Lightning's model summary table
    "_pb",
    "it/s",
)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny pipeline with the progress line on; log_every_n_steps=50 is more than the
    batches of an epoch, for which Lightning warns (a real warning that must still show)."""
    out = tmp_path_factory.mktemp("pipeline")
    proc = _train(
        "experiment=tiny_smoke",
        "trainer.enable_progress_bar=true",
        "trainer.log_every_n_steps=50",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_the_end_of_a_run_says_what_it_reached_and_where_the_outputs_are(pipeline_run):
    out, proc = pipeline_run
    report = proc.stdout[proc.stdout.index("pipeline done: val/gold_score = ") :].splitlines()
    assert len(report) <= 15
    assert report[1].startswith("  reward model: best val/accuracy ")
    assert any(line.startswith("  val/kl: 0 before PPO -> ") for line in report)
    assert f"run dir:      {out}" in report
    for label, path in (
        ("summary:", out / "summary.md"),
        ("policy:", out / "policy"),
        ("reward model:", out / "reward_model"),
        ("checkpoints:", out / "checkpoints"),
    ):
        assert f"{label:<14}{path}" in report and path.exists()
    assert report[-1] == f"tensorboard:  tensorboard --logdir {out / 'tb'}"


def test_a_run_shows_progress_lines_and_real_warnings_but_no_noise(pipeline_run):
    _, proc = pipeline_run
    assert "epoch 2/2 batch 6/6 | ETA 0:00 | train/loss " in proc.stdout  # the reward model
    assert "| objective/score " in proc.stdout and "| kl/sequence " in proc.stdout  # PPO
    for text in NOISE:
        assert text not in proc.stdout + proc.stderr, text
    assert "smaller than the logging interval Trainer(log_every_n_steps=50)" in proc.stderr


def test_the_log_line_filters_drop_only_the_listed_lines(caplog):
    lines = [
        ("optuna.storages._in_memory", "A new study created in memory with name: ppo_ppo"),
        ("alembic.runtime.migration", "Context impl SQLiteImpl."),
        ("lightning.pytorch.utilities.rank_zero", "GPU available: False, used: False"),
        ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
        ("lightning.pytorch.utilities.rank_zero", "GPU available: True (cuda), used: True"),
        ("lightning.pytorch.utilities.rank_zero", "`Trainer.fit` stopped: `max_epochs=2` reached."),
        ("optuna.storages._in_memory", "Something else"),
    ]
    try:
        quiet_log_lines()
        with caplog.at_level(logging.INFO):
            for name, message in lines:
                logging.getLogger(name).info(message)
    finally:
        for name in QUIET_LOG_LINES:
            logger = logging.getLogger(name)
            for f in [f for f in logger.filters if isinstance(f, DropMessages)]:
                logger.removeFilter(f)
    assert [r.getMessage() for r in caplog.records] == [message for _, message in lines[4:]]
