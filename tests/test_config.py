"""Config validation: every impossible setting fails at startup, naming the key."""

from __future__ import annotations

import pytest

from rlhf_lightning.config import ConfigError, ppo_config_from, rm_config_from

BAD_PPO = [
    ({"rollout_batch_size": 0}, "algorithm.rollout_batch_size"),
    ({"minibatch_size": -4}, "algorithm.minibatch_size"),
    ({"rollout_batch_size": 10, "minibatch_size": 4}, "algorithm.minibatch_size"),
    ({"minibatch_size": 8, "micro_batch_size": 3}, "algorithm.micro_batch_size"),
    ({"experience_batch_size": 0}, "algorithm.experience_batch_size"),
    ({"ppo_epochs": 0}, "algorithm.ppo_epochs"),
    ({"gamma": 1.5}, "algorithm.gamma"),
    ({"gamma": -0.1}, "algorithm.gamma"),
    ({"lam": 2.0}, "algorithm.lam"),
    ({"clip": 0.0}, "algorithm.clip"),
    ({"clip": -0.2}, "algorithm.clip"),
    ({"value_clip": 0.0}, "algorithm.value_clip"),
    ({"vf_coef": -1.0}, "algorithm.vf_coef"),
    ({"ent_coef": -0.01}, "algorithm.ent_coef"),
    ({"target_kl": 0.0}, "algorithm.target_kl"),
    ({"value_model": "twin"}, "algorithm.value_model"),
    ({"value_model": "critic"}, "algorithm.critic_path"),
    ({"critic_warmup_iterations": -1}, "algorithm.critic_warmup_iterations"),
    (
        {"num_iterations": 3, "critic_warmup_iterations": 3},
        "algorithm.critic_warmup_iterations",
    ),
    ({"critic_warmup_iterations": 1, "vf_coef": 0.0}, "algorithm.vf_coef"),
    ({"policy_lr": 0.0}, "algorithm.policy_lr"),
    ({"warmup_ratio": 1.0}, "algorithm.warmup_ratio"),
    ({"lr_decay": "cosine"}, "algorithm.lr_decay"),
    ({"on_nonfinite": "ignore"}, "algorithm.on_nonfinite"),
    ({"kl": {"estimator": "k4"}}, "algorithm.kl.estimator"),
    ({"kl": {"placement": "both"}}, "algorithm.kl.placement"),
    ({"kl": {"coef": -0.1}}, "algorithm.kl.coef"),
    ({"kl": {"target": 0.0}}, "algorithm.kl.target"),
    ({"generation": {"temperature": 0.0}}, "algorithm.generation.temperature"),
    ({"generation": {"sampling_dtype": "int8"}}, "algorithm.generation.sampling_dtype"),
    ({"generation": {"top_p": 0.0}}, "algorithm.generation.top_p"),
    ({"generation": {"max_new_tokens": 0}}, "algorithm.generation.max_new_tokens"),
    (
        {"generation": {"max_new_tokens": 4, "min_new_tokens": 5}},
        "algorithm.generation.min_new_tokens",
    ),
    ({"rollout_size": 8}, "algorithm.rollout_size"),  # typo: unknown key
]


@pytest.mark.parametrize(("overrides", "key"), BAD_PPO, ids=[k for _, k in BAD_PPO])
def test_bad_ppo_setting_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"invalid config: {key.replace('.', '[.]')}: "):
        ppo_config_from(overrides)


def test_defaults_are_valid_and_derived_sizes_are_right():
    cfg = ppo_config_from({"rollout_batch_size": 16, "minibatch_size": 4, "ppo_epochs": 3})
    assert cfg.minibatches_per_epoch == 4
    assert cfg.optimizer_steps_per_iteration == 12


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
