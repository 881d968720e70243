"""PPO under DDP with 2 gloo CPU processes, through the command line (`strategy=ddp` re-launches
the command as rank 1, so under pytest DDP runs only in a subprocess): critic warm-up, and
decisions every rank must take together (a NaN reward on one rank, in training or in the
evaluation, a non-finite loss on one rank, skipped or stopping the run), each checked on every
rank: an error stops both with the same line. The subprocess timeout is the hang detector."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ddp_helpers import load_dump

ROOT = Path(__file__).resolve().parents[1]
DDP_PPO = [
    "task=ppo",
    "trainer=ddp_cpu",
    "experiment=tiny_smoke",
    "reward=token_fraction",
    "trainer.enable_progress_bar=false",
    "~logger",
    "task.eval_every=0",
    "task.fn=tests.ddp_helpers.ppo_with_rank_dumps",
]
TIMEOUT = 300  # seconds; a rank waiting in a collective the other never enters hangs forever


def run_ddp(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        sys.executable, "-m", "rlhf_lightning.cli.train", *DDP_PPO,
        f"hydra.run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def reward_fn(name: str) -> tuple[str, ...]:
    """The overrides that make ``tests.ddp_helpers.<name>(prompts, responses)`` the reward."""
    return ("reward=vader", f"reward._target_=tests.ddp_helpers.{name}", "+reward._partial_=true")


def policy_lm(params: dict) -> dict:
    return {name: value for name, value in params.items() if name.startswith("lm.")}


def value_head(params: dict) -> dict:
    return {name: value for name, value in params.items() if name.startswith("value_head.")}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_critic_warmup_runs_under_ddp_and_every_rank_holds_the_same_weights(tmp_path):
    """Iteration 0 trains the value head alone (the policy's zero gradients are all-reduced,
    then dropped), iteration 1 the whole policy; after each, both ranks hold identical weights."""
    proc = run_ddp(tmp_path, "budget.num_iterations=2", "algorithm.value_model.warmup_iterations=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = [load_dump(tmp_path, r, "start")["params"] for r in (0, 1)]
    warm = [load_dump(tmp_path, r, "iter0")["params"] for r in (0, 1)]
    trained = [load_dump(tmp_path, r, "iter1")["params"] for r in (0, 1)]
    assert same(start[0], start[1])
    for r in (0, 1):
        assert same(policy_lm(warm[r]), policy_lm(start[r]))  # the policy did not move
        assert not same(value_head(warm[r]), value_head(start[r]))  # the value head did
        assert not same(policy_lm(trained[r]), policy_lm(warm[r]))
    assert same(warm[0], warm[1]) and same(trained[0], trained[1])


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines of both ranks, after checking the run stopped with status 2, no
    traceback and no torch.distributed error (a rank that went on alone)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "Connection closed" not in output, output[-3000:]
    return [line for line in output.splitlines() if line.startswith("error: ")]


NAN_SCORE = (
    "reward tests.ddp_helpers.nan_on_rank_one returned non-finite scores at positions [0]: "
    "[nan] (rank 1)"
)


@pytest.mark.slow
def test_a_nan_reward_on_rank_one_stops_every_rank_with_one_message(tmp_path):
    proc = run_ddp(tmp_path, *reward_fn("nan_on_rank_one"), "budget.num_iterations=2")
    line = f"error: at iteration 0: {NAN_SCORE}; the last good checkpoint is kept"
    assert error_lines(proc) == [line, line]  # every rank, the same line


@pytest.mark.slow
def test_a_nan_reward_on_rank_one_in_the_evaluation_stops_every_rank_with_one_message(tmp_path):
    """The evaluation before training (ranks may hold different numbers of eval batches, so
    the ranks agree at its end)."""
    proc = run_ddp(tmp_path, *reward_fn("nan_on_rank_one"), "task.eval_every=1")
    line = f"error: in the evaluation after 0 iterations: {NAN_SCORE}"
    assert error_lines(proc) == [line, line]


@pytest.mark.slow
def test_a_nonfinite_loss_on_rank_one_is_skipped_on_every_rank(tmp_path):
    """Rank 1's scores of iteration 1 make its value loss inf (rank 0's loss is finite): with
    on_nonfinite=skip both ranks skip all 4 minibatch steps of that iteration and keep the
    weights of iteration 0, identical on both."""
    proc = run_ddp(
        tmp_path,
        *reward_fn("huge_on_rank_one_at_second_call"),
        "algorithm.on_nonfinite=skip",
        "budget.num_iterations=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        first, second = load_dump(tmp_path, r, "iter0"), load_dump(tmp_path, r, "iter1")
        assert first["nonfinite_skips"] == 0 and first["global_step"] == 4
        assert second["nonfinite_skips"] == 4 and second["global_step"] == 4
        assert same(second["params"], first["params"])
        assert all(torch.isfinite(p).all() for p in second["params"].values())
    assert same(
        load_dump(tmp_path, 0, "iter1")["params"], load_dump(tmp_path, 1, "iter1")["params"]
    )


@pytest.mark.slow
def test_a_nonfinite_loss_on_rank_one_stops_every_rank_saying_where_it_was(tmp_path):
    """With on_nonfinite=error rank 1's inf loss of iteration 1 stops both ranks with the same
    line, naming the rank that saw it."""
    proc = run_ddp(
        tmp_path,
        *reward_fn("huge_on_rank_one_at_second_call"),
        "algorithm.on_nonfinite=error",
        "budget.num_iterations=2",
    )
    line = "error: non-finite loss (rank 1) at iteration 1; the last good checkpoint is kept"
    assert error_lines(proc) == [line, line]


@pytest.mark.slow
def test_dynamic_sampling_keeps_every_ranks_batch_when_one_rank_has_no_informative_group(tmp_path):
    """DAPO under DDP: every group of rank 1 has equal scores, so rank 1 asks for every round of
    dynamic sampling and fills its batch with set-aside groups; rank 0 samples the same rounds
    (no collective left waiting), both ranks take the same optimizer steps and end with the same
    weights."""
    proc = run_ddp(
        tmp_path, *reward_fn("equal_on_rank_one"), "algorithm=dapo", "budget.num_iterations=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dumps = [load_dump(tmp_path, r, "iter1") for r in (0, 1)]
    assert dumps[0]["global_step"] == dumps[1]["global_step"] == 2 * 2 * 2  # its x epochs x mbs
    assert same(dumps[0]["params"], dumps[1]["params"])
    for dump in dumps:
        # 3 rounds of 2 prompts x 4 samples scored per iteration, on every rank
        assert [len(r) for r in dump["responses"]] == [8] * 6
        metrics = dump["metrics"]
        assert metrics["rollout/sampling_rounds"] == 3
        assert metrics["rollout/filled_groups"] >= 1  # rank 1 fills both of its groups
