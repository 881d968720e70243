"""Config validation: every impossible setting fails at startup, naming the key."""

from __future__ import annotations

import pytest

from rlhf_lightning.cli.train import CONF_DIR
from rlhf_lightning.config import ConfigError, rl_config_from, rm_config_from
from tests.conftest import compose_config

PRESETS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))


def _compose(*overrides):
    return compose_config(["task=ppo", "budget=cpu", *overrides])


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
    (["algorithm=gspo", "algorithm.policy_loss.clip_low=0.0"], "algorithm.policy_loss.clip_low"),
    (["algorithm=cispo", "algorithm.policy_loss.clip_low=1.5"], "algorithm.policy_loss.clip_low"),
    (
        ["algorithm=reinforce_pp_baseline", "algorithm.samples_per_prompt=1"],
        "algorithm.samples_per_prompt",
    ),
    (
        ["algorithm/sampler_correction=seq_masked", "algorithm.sampler_correction.high=1"],
        "algorithm.sampler_correction.high",
    ),
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
    (["algorithm.lr_schedule.warmup_ratio=1.0"], "algorithm.lr_schedule.warmup_ratio"),
    (
        ["algorithm/lr_schedule=cosine_decay", "algorithm.lr_schedule.min_ratio=2.0"],
        "algorithm.lr_schedule.min_ratio",
    ),
    (["+algorithm.lr_decay=linear"], "algorithm.lr_decay"),  # not a key: the schedule is
    (["algorithm.on_nonfinite=ignore"], "algorithm.on_nonfinite"),
    (["algorithm.kl.reward.estimator=k4"], "algorithm.kl.reward.estimator"),
    (["algorithm.kl.reward.coef=-0.1"], "algorithm.kl.reward.coef"),
    (["algorithm.kl.reward.coef=banana"], "algorithm.kl.reward.coef"),
    (
        ["kl=adaptive", "algorithm.kl.reward.controller.target=0.0"],
        "algorithm.kl.reward.controller.target",
    ),
    (
        ["kl=adaptive", "algorithm.kl.reward.controller.horizon=0"],
        "algorithm.kl.reward.controller.horizon",
    ),
    (["algorithm=grpo", "kl=adaptive"], "algorithm.kl.reward.coef"),  # no KL in its rewards
    (["algorithm=grpo", "algorithm.kl.loss.coef=-1.0"], "algorithm.kl.loss.coef"),
    (["+algorithm.kl.placement=loss"], "algorithm.kl.placement"),  # unknown key
    (["+algorithm.kl.reward.beta=0.1"], "algorithm.kl.reward.beta"),
    (["algorithm.kl.reward=0.1"], "algorithm.kl.reward"),
    # Biased KL gradients without algorithm.kl.allow_biased_gradient: in the reward only k1,
    # as a loss only k2 and k3_plus.
    (["algorithm.kl.reward.estimator=k2"], "algorithm.kl.reward.estimator"),
    (["algorithm.kl.reward.estimator=k3"], "algorithm.kl.reward.estimator"),
    (["algorithm.kl.reward.estimator=k3_plus"], "algorithm.kl.reward.estimator"),
    (["algorithm.kl.reward.estimator=abs"], "algorithm.kl.reward.estimator"),
    (["algorithm=grpo", "algorithm.kl.loss.estimator=k1"], "algorithm.kl.loss.estimator"),
    (["algorithm=grpo", "algorithm.kl.loss.estimator=k3"], "algorithm.kl.loss.estimator"),
    (["algorithm=grpo", "algorithm.kl.loss.estimator=abs"], "algorithm.kl.loss.estimator"),
    (["algorithm.kl.allow_biased_gradient=maybe"], "algorithm.kl.allow_biased_gradient"),
    (["algorithm.kl.reward.clamp=0.0"], "algorithm.kl.reward.clamp"),
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


SAMPLER_CORRECTIONS = sorted(
    p.stem for p in (CONF_DIR / "algorithm" / "sampler_correction").glob("*.yaml")
)


@pytest.mark.parametrize("option", SAMPLER_CORRECTIONS)
def test_every_sampler_correction_composes_into_its_component(option):
    from rlhf_lightning.losses import SamplerCorrection

    cfg = rl_config_from(_compose(f"algorithm/sampler_correction={option}"))
    assert isinstance(cfg.algorithm.sampler_correction, SamplerCorrection)


BIASED_KL = [
    ("reward", "k2"),
    ("reward", "k3"),
    ("reward", "k3_plus"),
    ("reward", "abs"),
    ("loss", "k1"),
    ("loss", "k3"),
    ("loss", "abs"),
]


def _kl_at(site: str, estimator: str) -> list[str]:
    """Overrides that put the KL at ``site`` only, with ``estimator``."""
    other = "loss" if site == "reward" else "reward"
    return [
        f"algorithm.kl.{other}=null",
        f"++algorithm.kl.{site}.coef=0.1",
        f"++algorithm.kl.{site}.estimator={estimator}",
    ]


@pytest.mark.parametrize(("site", "estimator"), BIASED_KL)
def test_a_biased_kl_gradient_is_refused_by_default_and_runs_when_allowed(site, estimator):
    """The refusal names the key and the opt-in key; with it the term is accepted and says why
    it is biased; the unbiased pairs need no opt-in and say nothing."""
    keys = _kl_at(site, estimator)
    with pytest.raises(
        ConfigError,
        match=f"algorithm.kl.{site}.estimator: .*algorithm.kl.allow_biased_gradient=true",
    ):
        rl_config_from(_compose(*keys))
    kl = rl_config_from(_compose(*keys, "algorithm.kl.allow_biased_gradient=true")).algorithm.kl
    assert list(kl.biased_gradients()) == [site] and kl.allow_biased_gradient


@pytest.mark.parametrize(
    ("site", "estimator"), [("reward", "k1"), ("loss", "k2"), ("loss", "k3_plus")]
)
def test_an_unbiased_kl_gradient_needs_no_opt_in(site, estimator):
    kl = rl_config_from(_compose(*_kl_at(site, estimator))).algorithm.kl
    assert kl.biased_gradients() == {}
    assert getattr(kl, site).estimator.name == estimator and getattr(kl, site).coef == 0.1


def test_the_kl_can_be_in_the_rewards_and_in_the_loss_with_their_own_coefficients():
    kl = rl_config_from(
        _compose("++algorithm.kl.loss.coef=0.02", "++algorithm.kl.loss.estimator=k2")
    ).algorithm.kl
    assert (kl.reward_coef, kl.loss_coef) == (0.05, 0.02)
    assert kl.reward.controller is not kl.loss.controller


def test_a_kl_estimator_of_ones_own_by_target():
    kl = rl_config_from(
        _compose(
            "~algorithm.kl.reward.estimator",
            "+algorithm.kl.reward.estimator._target_=rlhf_lightning.kl.K1",
        )
    ).algorithm.kl
    assert type(kl.reward.estimator).__name__ == "K1"


def test_algorithm_defaults_have_one_home():
    """No field of the algorithm's config has a default in code: the YAML
    (conf/algorithm/common/defaults.yaml) is the only place a default can be read from."""
    from dataclasses import MISSING, fields

    from rlhf_lightning.config import AlgorithmConfig

    for f in fields(AlgorithmConfig):
        assert f.default is MISSING and f.default_factory is MISSING, f.name


@pytest.mark.parametrize("key", ["epochs", "kl.allow_biased_gradient", "kl.reward.coef"])
def test_a_required_algorithm_key_left_out_is_named(key):
    from omegaconf import OmegaConf

    from rlhf_lightning.config import algorithm_config_from

    node = OmegaConf.to_container(_compose().algorithm, resolve=True)
    *parents, leaf = key.split(".")
    owner = node
    for name in parents:
        owner = owner[name]
    del owner[leaf]
    with pytest.raises(ConfigError, match=f"invalid config: algorithm.{key}: required, not set"):
        algorithm_config_from(node)


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
    """``algorithm.kl.reward.coef`` sets the controller's coefficient; the controller node
    repeats it nowhere."""
    for kl in ("fixed", "adaptive"):
        cfg = _compose(f"kl={kl}", "algorithm.kl.reward.coef=0.123")
        assert "coef" not in cfg.algorithm.kl.reward.controller
        assert rl_config_from(cfg).algorithm.kl.reward.coef == 0.123


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


@pytest.mark.parametrize(
    "dataclass_name, yaml_file, under",
    [
        ("GenerationConfig", "generation/default.yaml", None),
        ("Budget", "budget/default.yaml", None),
        ("Cadence", "task/ppo.yaml", "task"),
        ("RMConfig", "rm/bradley_terry.yaml", None),
        ("LoRAConfig", "peft/lora.yaml", None),
        ("PolicyOptions", "policy/smollm2.yaml", None),
    ],
)
def test_config_defaults_in_code_agree_with_the_yaml(dataclass_name, yaml_file, under):
    """Where a config dataclass has a default and its group's default YAML sets the same key,
    the two are one value: a default changed in one home and not the other fails here."""
    from dataclasses import MISSING, fields

    from omegaconf import OmegaConf

    import rlhf_lightning.config as config

    node = OmegaConf.load(CONF_DIR / yaml_file)
    node = node[under] if under else node
    compared = 0
    for f in fields(getattr(config, dataclass_name)):
        if f.default is MISSING or f.name not in node:
            continue
        assert node[f.name] == f.default, f"{yaml_file}: {f.name}={node[f.name]} vs {f.default}"
        compared += 1
    assert compared >= 1
