"""The main job's PPO settings give the numbers they gave before the algorithm family existed.

The expected values were recorded with the code of commit fc0d8e9 (PPO as the only algorithm,
``algorithm=ppo_cpu``) on the tiny model: the same seed and the same effective config must give
the same metrics after one, two and three iterations. The same check on SmolLM2 with the main
job's settings (``experiment=sentiment_vader``, 1 iteration, 32-true) agreed to 1e-6 relative on
score, losses and gradient norm; it takes minutes, so it is not part of the suite.
"""

from __future__ import annotations

import pytest
from omegaconf import open_dict

from rlhf_lightning.tasks.ppo import train_ppo
from tests.conftest import compose_config

MAIN_JOB_PPO = [
    "task=ppo",
    "policy=tiny",
    "reward=token_fraction",
    "data/prompts=tiny",
    "budget=cpu",
    "generation=single_line",
    "algorithm.epochs=2",
    "algorithm.optimizer.lr=3e-5",
    "task.checkpoint_every=5",
    "task.eval_every=1",
    "~logger",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",  # the recorded numbers' precision, whatever this CPU has
]

# fc0d8e9: rlhf-train task=ppo policy=tiny reward=token_fraction data/prompts=tiny
#   algorithm=ppo_cpu algorithm.num_iterations=2 algorithm.eval_every=1 (final metrics)
RECORDED_MAIN = {
    "objective/score": 0.006122109014540911,
    "optim/loss_policy": -0.0017007875721901655,
    "optim/loss_value": 3.471143645583652e-05,
    "kl/sequence": -0.001360967755317688,
    "policy/ratio_max": 1.0019067525863647,
    "optim/grad_norm": 0.5785170197486877,
    "value/mean": 0.0013645581202581525,
    "val/reward": 0.0096726194024086,
    "val/kl": -0.0010593384504318237,
    "rollout/response_length": 26.28125,
}
# ... with algorithm.num_iterations=3 algorithm.policy_lr=3e-3 algorithm.value_lr=3e-3
#   algorithm.kl.reward.coef=0.1: the policy moves, so iterations 2-3 depend on every update before
RECORDED_MOVING = {
    "objective/score": 0.006054687313735485,
    "optim/loss_policy": 0.012980924919247627,
    "optim/loss_value": 0.000841483473777771,
    "kl/sequence": 0.23429740965366364,
    "policy/ratio_max": 1.125262975692749,
    "optim/grad_norm": 0.6013920307159424,
    "value/mean": 0.0030060699209570885,
    "val/reward": 0.014318715780973434,
    "val/kl": 0.32881784439086914,
    "rollout/response_length": 24.09375,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "recorded"),
    [
        (["budget.num_iterations=2"], RECORDED_MAIN),
        (
            [
                "budget.num_iterations=3",
                "algorithm.optimizer.lr=3e-3",
                "algorithm.value_model.lr=3e-3",
                "algorithm.kl.reward.coef=0.1",
            ],
            RECORDED_MOVING,
        ),
    ],
    ids=["main", "moving"],
)
def test_main_job_ppo_numbers_are_unchanged(tmp_path, overrides, recorded):
    cfg = compose_config([*MAIN_JOB_PPO, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    final = train_ppo(cfg)["final"]
    for key, value in recorded.items():
        assert final[key] == pytest.approx(value, rel=2e-4, abs=1e-7), key
