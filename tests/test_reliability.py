"""Crashes, resume from the command line, and numerical guards."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_lightning.modules.ppo import NonFiniteError
from tests.ppo_helpers import fit, tiny_config, tiny_ppo_module

TINY_PPO = [
    "task=ppo",
    "policy=tiny",
    "reward=token_fraction",
    "data/prompts=tiny",
    "trainer.enable_progress_bar=false",
    "budget.rollout_batch_size=8",
    "budget.minibatch_size=4",
    "budget.micro_batch_size=2",
    "algorithm.epochs=2",
    "task.eval_every=0",
    "generation.max_new_tokens=8",
    "task.checkpoint_every=1",
    "~logger",
]


def _cli(run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "rlhf_lightning.cli.train", *TINY_PPO,
        f"hydra.run.dir={run_dir}", *overrides,
    ]  # fmt: skip


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


_calls = 0


def fraction_of_e_or_die(prompts: list[str], responses: list[str]) -> list[float]:
    """Toy reward; with RLHF_TEST_DIE_AT_CALL=N the process SIGKILLs itself on the N-th call."""
    global _calls
    _calls += 1
    if os.environ.get("RLHF_TEST_DIE_AT_CALL") == str(_calls):
        os.kill(os.getpid(), signal.SIGKILL)
    return [r.count("e") / max(len(r), 1) for r in responses]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    """The run kills itself (SIGKILL, no cleanup) inside iteration 3; resume finishes it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    reward = [
        "reward=vader",
        "reward._target_=tests.test_reliability.fraction_of_e_or_die",
        "+reward._partial_=true",
        "budget.num_iterations=6",
    ]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    cwd = Path(__file__).resolve().parents[1]

    def run(run_dir, *extra, **env_extra):
        return subprocess.run(
            _cli(run_dir, *reward, *extra), env={**env, **env_extra}, cwd=cwd,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    died = run(crashed, RLHF_TEST_DIE_AT_CALL="4")
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert _final_state(crashed)["epoch"] == 2  # iterations 0..2 checkpointed, 3 lost mid-way
    resumed = run(crashed, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = run(straight)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    a, b = _final_state(straight), _final_state(crashed)
    assert a["epoch"] == b["epoch"] == 5
    assert a["global_step"] == b["global_step"]
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, msg=name)
    for key in ("optimizer_states", "lr_schedulers"):
        assert str(a[key]) == str(b[key])


def test_nan_in_values_stops_with_the_quantity_and_iteration():
    module = tiny_ppo_module(tiny_config())
    with torch.no_grad():
        module.policy.value_head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite old values at iteration 0"):
        fit(module, max_epochs=1)


def test_nan_in_the_reward_model_loss_stops_with_the_split_and_step():
    from rlhf_lightning.config import rm_config_from
    from rlhf_lightning.data.preferences import collate_pairs
    from rlhf_lightning.errors import UserError
    from rlhf_lightning.models import ScalarRewardModel
    from rlhf_lightning.modules.reward_model import RewardModelModule

    model = ScalarRewardModel.from_backbone("builtin:tiny")
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    module = RewardModelModule(model, rm_config_from({}))
    batch = collate_pairs([{"chosen_ids": [5, 6, 7], "rejected_ids": [5, 8]}], pad_id=0)
    with pytest.raises(NonFiniteError, match=r"^non-finite train loss \(nan\) at step 0$") as error:
        module.training_step(batch, 0)
    assert isinstance(error.value, UserError)  # one line from rlhf-train, no traceback


class _NaNOnFirstMinibatch:
    """Wraps the module's objective: the first minibatch's loss is NaN, the others are real."""

    def __init__(self, module) -> None:
        self.module, self.inner, self.calls = module, module.objective, 0

    def __call__(self, *args, **kwargs):
        loss, terms = self.inner(*args, **kwargs)
        self.calls += 1
        return (loss * float("nan"), terms) if self.calls == 1 else (loss, terms)


def test_nonfinite_loss_raises_or_skips_the_minibatch_when_configured():
    module = tiny_ppo_module(tiny_config())
    module.objective = _NaNOnFirstMinibatch(module)
    with pytest.raises(NonFiniteError, match="non-finite loss at iteration 0"):
        fit(module, max_epochs=1)

    cfg = tiny_config(algorithm__epochs=1, algorithm__on_nonfinite="skip")
    module = tiny_ppo_module(cfg)
    module.objective = _NaNOnFirstMinibatch(module)
    trainer, history = fit(module, max_epochs=1)
    assert module.nonfinite_skips == 1
    assert history[0]["perf/nonfinite_skips"] == 1
    # 2 minibatches, one skipped: one optimizer step, and the parameters stayed finite.
    assert trainer.global_step == 1
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


@pytest.mark.slow
def test_kill_9_reward_model_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL a reward-model run once epoch 1 is checkpointed; the resumed run ends identical."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rm = [
        sys.executable, "-m", "rlhf_lightning.cli.train", "task=reward_model",
        "reward_backbone=tiny", "data/preferences=tiny", "trainer.enable_progress_bar=false",
        "rm.max_epochs=40", "rm.lr=1e-3", "~logger",
    ]  # fmt: skip
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    proc = subprocess.Popen(
        [*rm, f"hydra.run.dir={crashed}"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = crashed / "checkpoints" / "last.ckpt"
    while proc.poll() is None:
        try:
            if last.is_file() and _final_state(crashed)["epoch"] >= 1:
                break
        except (OSError, RuntimeError, EOFError):  # replaced while we read it: look again
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _final_state(crashed)["epoch"]
    assert killed_at < 39, "the run ended before it was killed"

    for run_dir, extra in ((crashed, ["ckpt_path=last"]), (straight, [])):
        done = subprocess.run(
            [*rm, f"hydra.run.dir={run_dir}", *extra], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = _final_state(straight), _final_state(crashed)
    assert a["global_step"] == b["global_step"]
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, msg=name)


def test_offline_mode_opens_no_network_connection(monkeypatch):
    from rlhf_lightning.models import ModelNotAvailableError, load_causal_lm, load_tokenizer

    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="not reachable and not in the local cache"):
        load_causal_lm("lvwerra/gpt2-imdb")
    with pytest.raises(ModelNotAvailableError):
        load_tokenizer("lvwerra/gpt2-imdb")
    assert attempts == []


# ---------------------------------------------------------------------- SIGTERM / SIGINT
TINY_RM = [
    "task=reward_model", "reward_backbone=tiny", "data/preferences=tiny",
    "trainer.enable_progress_bar=false", "rm.lr=1e-3", "rm.checkpoint_every_n_steps=4", "~logger",
]  # fmt: skip
SIGNAL_RUNS = {
    "ppo": [*TINY_PPO, "budget.num_iterations=8", "task.checkpoint_every=4"],
    "reward_model": [*TINY_RM, "rm.max_epochs=6"],
}


def _train(run_dir: Path, overrides: list[str], *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "rlhf_lightning.cli.train", *overrides,
        f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parents[1], **popen)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "signum"),
    [("ppo", signal.SIGTERM), ("reward_model", signal.SIGTERM), ("reward_model", signal.SIGINT)],
    ids=["ppo-SIGTERM", "reward_model-SIGTERM", "reward_model-SIGINT"],
)
def test_a_signal_saves_a_checkpoint_stops_promptly_and_the_run_resumes_exactly(
    tmp_path, stage, signum
):
    """SIGTERM (SLURM, kill) or SIGINT (Ctrl-C) once the first checkpoint exists: the run
    finishes its PPO iteration or optimizer step, saves last.ckpt, exits with one message that
    says how to resume, well before its end; the resume ends like an uninterrupted run."""
    overrides = SIGNAL_RUNS[stage]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = _train(stopped, overrides, stdout=subprocess.DEVNULL, stderr=stderr)
        last = stopped / "checkpoints" / "last.ckpt"
        while not last.exists():
            assert proc.poll() is None, "the run ended before it was signalled"
            time.sleep(0.05)
        proc.send_signal(signum)
        signalled = time.monotonic()
        assert proc.wait(timeout=120) == 2
        seconds = time.monotonic() - signalled
        stderr.seek(0)
        errors = stderr.read()
    assert seconds < 30, f"{seconds:.1f} s from the signal to the exit"
    assert "Traceback" not in errors, errors[-3000:]
    lines = [line for line in errors.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, errors[-3000:]
    name = signal.Signals(signum).name
    assert f"error: stopped by {name}: saved {last}" in lines[0]
    assert f"resume with: rlhf-train {' '.join(overrides[:2])}" in lines[0]
    assert lines[0].endswith(f"hydra.run.dir={stopped} ckpt_path=last")
    state = _final_state(stopped)
    total = {"ppo": (8, 8 * 4), "reward_model": (6, 6 * 6)}[stage]  # (epochs, optimizer steps)
    assert state["global_step"] < total[1], "the run was not stopped before its end"

    for run_dir, extra in ((stopped, ["ckpt_path=last"]), (straight, [])):
        done = _train(
            run_dir, overrides, *extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        _, err = done.communicate(timeout=600)
        assert done.returncode == 0, err[-3000:]
    a, b = _final_state(straight), _final_state(stopped)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["global_step"] == total[1]
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=0, msg=name)
    for key in ("optimizer_states", "lr_schedulers"):
        assert str(a[key]) == str(b[key])


# --------------------------------------------------------------- SIGKILL at random moments
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "reward_model", "pipeline"])
def test_random_sigkills_then_resumes_end_like_an_uninterrupted_run(tmp_path, stage):
    """experiments/reliability/kill_resume.py with 2 kills (seeded): every chain of kills and
    resumes ends with the reference's weights, optimizer state, step counts and exports."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "reliability"))
    from kill_resume import run_stage

    with open(tmp_path / "runs.log", "w") as log:
        result = run_stage(stage, tmp_path, 2, 2, random.Random(1), log)
    kills = [kill for chain in result["chains"] for kill in chain["kills"]]
    assert len(kills) == 2
    assert all(chain["ok"] for chain in result["chains"]), result
