"""Every algorithm preset runs through the public CLI and raises a toy reward on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_lightning.cli.train import CONF_DIR
from rlhf_lightning.scalars import read_scalars

PRESETS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))
REPO = Path(__file__).resolve().parents[1]


def test_the_ladder_experiment_sweeps_every_preset_once():
    """``experiment=ladder`` (and the ladder scripts, which read its list) covers every preset."""
    sys.path.insert(0, str(REPO / "experiments" / "ladder"))
    try:
        from presets import ladder_presets
    finally:
        sys.path.pop(0)
    ladder = ladder_presets()
    assert len(set(ladder)) == len(ladder), ladder
    assert sorted(ladder) == PRESETS


def test_the_family_experiment_gives_every_preset_equal_samples_and_steps():
    """``experiment=verifiable_family``: each preset it sweeps samples the same responses and
    takes the same optimizer steps (the preset's own epochs are overridden), and no run
    re-measures the starting policy."""
    from tests.conftest import compose_config

    sweep = compose_config(["experiment=verifiable_family"], hydra_config=True)
    presets = str(sweep.hydra.sweeper.params.algorithm).split(",")
    assert sorted(presets) == PRESETS  # every preset, as the study
    budgets = set()
    for preset in presets:
        cfg = compose_config(["experiment=verifiable_family", f"algorithm={preset}"])
        b = cfg.budget
        budgets.add(
            (b.num_iterations, b.rollout_batch_size, b.minibatch_size, cfg.algorithm.epochs)
        )
        assert cfg.task.eval_before is False and cfg.reward._target_.endswith("ReasoningGymReward")
    assert budgets == {(8, 32, 16, 2)}  # 256 responses, 8 x 2 epochs x 2 minibatches = 32 steps


@pytest.mark.slow
def test_every_preset_runs_through_rlhf_train_and_raises_a_toy_reward(tmp_path):
    """One sweep over the presets (``rlhf-train -m algorithm=...``): each job learns to write
    more 'e's (the tiny model starts near 0.01; all reached 0.85-1.0 when this was written) in
    24 iterations of 16 rollouts."""
    command = [
        sys.executable, "-m", "rlhf_lightning.cli.train", "-m", "task=ppo",
        "experiment=tiny_smoke", "reward=token_fraction", f"algorithm={','.join(PRESETS)}",
        "budget.num_iterations=24", "budget.rollout_batch_size=16", "budget.minibatch_size=8",
        "budget.micro_batch_size=8", "algorithm.optimizer.lr=1e-2", "algorithm.kl.reward=null",
        "algorithm.kl.loss=null",
        "generation.temperature=1.0", "generation.stop_token=null", "task.eval_every=0",
        "task.checkpoint_every=100", f"hydra.sweep.dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert len(jobs) == len(PRESETS)
    for job in jobs:
        preset = next(p for p in PRESETS if f"algorithm={p}" in job.name)
        scores = [value for _, value in read_scalars(job)["objective/score"]]
        assert len(scores) == 24, (preset, len(scores))
        first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
        assert last > first + 0.3, (preset, first, last)
