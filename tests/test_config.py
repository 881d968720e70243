"""Config validation: every impossible setting fails at startup, naming the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from rlhf_lightning.cli.train import CONF_DIR
from rlhf_lightning.config import ConfigError, rl_config_from, rm_config_from

PRESETS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["task=ppo", "budget=cpu", *overrides])


# (command-line overrides, the key the message must name)
BAD_RL = [
    (["budget.rollout_batch_size=0"], "budget.rollout_batch_size"),
    (["budget.minibatch_size=-4"], "budget.minibatch_size"),
    (["budget.rollout_batch_size=10", "budget.minibatch_size=4"], "budget.minibatch_size"),
    (["budget.minibatch_size=8", "budget.micro_batch_size=3"], "budget.micro_batch_size"),
    (["budget.experience_batch_size=0"], "budget.experience_batch_size"),
    (["budget.micro_batch_size=2.0"], "budget.micro_batch_size"),  # a float is not a size
    (["algorithm.epochs=0"], "algorithm.epochs"),
    (["algorithm.epochs=true"], "algorithm.epochs"),
    (["algorithm.advantage.gamma=1.5"], "algorithm.advantage.gamma"),
    (["algorithm.advantage.gamma=-0.1"], "algorithm.advantage.gamma"),
    (["algorithm.advantage.lam=2.0"], "algorithm.advantage.lam"),
    (["algorithm.advantage.lam=banana"], "algorithm.advantage.lam"),
    (["algorithm.policy_loss.clip_low=0.0"], "algorithm.policy_loss.clip_low"),
    (["algorithm.policy_loss.clip_high=-0.2"], "algorithm.policy_loss.clip_high"),
    (["algorithm.policy_loss.clip_low=null"], "algorithm.policy_loss.clip_low"),
    (["algorithm.policy_loss.dual_clip=0.5"], "algorithm.policy_loss.dual_clip"),
    (["algorithm.value_model.clip=0.0"], "algorithm.value_model.clip"),
    (["algorithm.value_model.coef=-1.0"], "algorithm.value_model.coef"),
    (["algorithm.value_model.lr=0.0"], "algorithm.value_model.lr"),
    (["algorithm.ent_coef=-0.01"], "algorithm.ent_coef"),
    (["algorithm.target_kl=0.0"], "algorithm.target_kl"),
    (["algorithm/value_model=critic"], "algorithm.value_model.path"),
    (["algorithm.value_model.warmup_iterations=-1"], "algorithm.value_model.warmup_iterations"),
    (
        ["budget.num_iterations=3", "algorithm.value_model.warmup_iterations=3"],
        "algorithm.value_model.warmup_iterations",
    ),
    (
        ["algorithm.value_model.warmup_iterations=1", "algorithm.value_model.coef=0.0"],
        "algorithm.value_model.coef",
    ),
    (["algorithm.optimizer.lr=-1.0"], "algorithm.optimizer.lr"),
    (["+algorithm.optimizer.betas=1"], "algorithm.optimizer"),  # torch refuses it
    (["algorithm.optimizer._target_=torch.optim.Nope"], "algorithm.optimizer._target_"),
    (["algorithm.warmup_ratio=1.0"], "algorithm.warmup_ratio"),
    (["algorithm.lr_decay=cosine"], "algorithm.lr_decay"),
    (["algorithm.on_nonfinite=ignore"], "algorithm.on_nonfinite"),
    (["algorithm.kl.estimator=k4"], "algorithm.kl.estimator"),
    (["algorithm.kl.placement=both"], "algorithm.kl.placement"),
    (["algorithm.kl.coef=-0.1"], "algorithm.kl.coef"),
    (["kl=adaptive", "algorithm.kl.controller.target=0.0"], "algorithm.kl.controller.target"),
    (["kl=adaptive", "algorithm.kl.controller.horizon=0"], "algorithm.kl.controller.horizon"),
    # KL as a loss: only estimators whose expected gradient is grad KL(pi || pi_ref)
    (["algorithm.kl.placement=loss", "algorithm.kl.estimator=k1"], "algorithm.kl.estimator"),
    (["algorithm.kl.placement=loss", "algorithm.kl.estimator=k3"], "algorithm.kl.estimator"),
    (["algorithm.kl.placement=loss", "algorithm.kl.estimator=abs"], "algorithm.kl.estimator"),
    (["algorithm=grpo", "algorithm.samples_per_prompt=1"], "algorithm.samples_per_prompt"),
    (["algorithm=rloo", "algorithm.samples_per_prompt=3"], "algorithm.samples_per_prompt"),
    (["algorithm/value_model=none"], "algorithm.value_model"),  # GAE needs values
    (
        ["algorithm.missing_eos_penalty=-1.0", "generation.stop_token=null"],
        "algorithm.missing_eos_penalty",
    ),
    (["generation.temperature=0.0"], "generation.temperature"),
    (["generation.sampling_dtype=int8"], "generation.sampling_dtype"),
    (["generation.top_p=0.0"], "generation.top_p"),
    (["generation.max_new_tokens=0"], "generation.max_new_tokens"),
    (
        ["generation.max_new_tokens=4", "generation.min_new_tokens=5"],
        "generation.min_new_tokens",
    ),
    (["task.eval_every=-1"], "task.eval_every"),
    (["task.checkpoint_every=0"], "task.checkpoint_every"),
    (["+algorithm.rollout_size=8"], "algorithm.rollout_size"),  # typo: unknown key
    (["+algorithm.advantage.lamda=0.9"], "algorithm.advantage.lamda"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_RL, ids=[" ".join(o) for o, _ in BAD_RL])
def test_bad_setting_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"invalid config: {key.replace('.', '[.]')}: "):
        rl_config_from(_compose(*overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = rl_config_from(_compose(f"algorithm={preset}"))
    assert cfg.algorithm.name == preset
    assert cfg.budget.rollout_batch_size % cfg.algorithm.samples_per_prompt == 0


def test_derived_sizes_are_right():
    cfg = rl_config_from(
        _compose(
            "algorithm=rloo",
            "budget.rollout_batch_size=16",
            "budget.minibatch_size=4",
            "budget.micro_batch_size=2",
            "algorithm.epochs=3",
        )
    )
    assert cfg.budget.minibatches_per_epoch == 4
    assert cfg.optimizer_steps_per_iteration == 12
    assert cfg.prompts_per_iteration == 16 // 4


def test_the_kl_coefficient_has_one_source():
    """``algorithm.kl.coef`` sets the controller's coefficient; the controller node repeats it
    nowhere."""
    for kl in ("fixed", "adaptive"):
        cfg = _compose(f"kl={kl}", "algorithm.kl.coef=0.123")
        assert "coef" not in cfg.algorithm.kl.controller
        assert rl_config_from(cfg).algorithm.kl.build_controller().value == 0.123


BAD_RM = [
    ({"max_epochs": 0}, "rm.max_epochs"),
    ({"lr": -1.0}, "rm.lr"),
    ({"warmup_ratio": 1.0}, "rm.warmup_ratio"),
    ({"accumulate_grad_batches": 0}, "rm.accumulate_grad_batches"),
    ({"epochs": 2}, "rm.epochs"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_RM, ids=[k for _, k in BAD_RM])
def test_bad_rm_setting_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"invalid config: {key.replace('.', '[.]')}: "):
        rm_config_from(overrides)
