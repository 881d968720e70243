"""Preflight checks of the composed config (rlhf_lightning/preflight.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import lightning as L
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rlhf_lightning.cli.train import CONF_DIR
from rlhf_lightning.config import ConfigError, rm_config_from
from rlhf_lightning.preflight import (
    RM_METRICS,
    check_interpolations,
    check_rm_monitor,
    check_seed,
    check_targets,
    check_trainer,
    preflight,
)
from tests.conftest import compose_config


def _cfg(*overrides: str):
    return compose_config(["paths.output_dir=/tmp/unused", "policy=tiny", *overrides])


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
)
def test_every_experiment_config_composes_and_passes(experiment):
    preflight(compose_config(["paths.output_dir=/tmp/unused", f"experiment={experiment}"]))


def test_overopt_verifiable_trains_on_the_proxy_and_judges_by_the_verifier():
    cfg = compose_config(["paths.output_dir=/tmp/unused", "experiment=overopt_verifiable"])
    assert cfg.reward._target_ == "rlhf_lightning.rewards.LearnedReward"
    assert cfg.gold_reward._target_ == "rlhf_lightning.rewards.ReasoningGymReward"
    assert cfg.algorithm.kl.loss.coef == 0.0 and cfg.algorithm.kl.reward is None
    assert cfg.algorithm.name == "grpo"


def _trainer(**values):
    return OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, **values})


def test_the_default_configs_pass():
    preflight(_cfg())
    preflight(_cfg("task=ppo", "reward=token_fraction", "experiment=tiny_smoke"))


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"precision": "17"}, "trainer.precision"),
        ({"precision": "bf16"}, "trainer.precision"),
        ({"accelerator": "gpux"}, "trainer.accelerator"),
        ({"devices": 0}, "trainer.devices"),
        ({"devices": "two"}, "trainer.devices"),
        ({"devices": True}, "trainer.devices"),
        ({"devices": []}, "trainer.devices"),
        ({"devices": [0, -1]}, "trainer.devices"),
        ({"num_nodes": 0}, "trainer.num_nodes"),
        ({"num_nodes": "1"}, "trainer.num_nodes"),
    ],
)
def test_bad_trainer_values_name_their_key(values, key):
    with pytest.raises(ConfigError, match=f"^invalid config: {key}: "):
        check_trainer(_trainer(**values), cuda_devices=0)


@pytest.mark.parametrize(
    "values",
    [
        {"precision": p}
        for p in ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
    ]
    + [{"devices": "auto"}, {"devices": 2}, {"num_nodes": 2}, {"precision": 32}],
)
def test_good_trainer_values_pass(values):
    check_trainer(_trainer(**values), cuda_devices=0)


def test_cuda_accelerator_needs_cuda_devices():
    with pytest.raises(ConfigError, match=r"^invalid config: trainer.accelerator: 'gpu' needs a"):
        check_trainer(_trainer(accelerator="gpu"), cuda_devices=0)
    with pytest.raises(ConfigError, match=r"trainer.devices: 4 needs 4 CUDA devices.* has 2"):
        check_trainer(_trainer(accelerator="cuda", devices=4), cuda_devices=2)
    with pytest.raises(ConfigError, match=r"trainer.devices: \[0, 3\] needs 4 CUDA"):
        check_trainer(_trainer(accelerator="gpu", devices=[0, 3]), cuda_devices=2)
    for devices in (2, "auto", [0, 1]):
        check_trainer(_trainer(accelerator="gpu", devices=devices), cuda_devices=2)
    check_trainer(_cfg("trainer=gpu").trainer, cuda_devices=1)  # the shipped GPU config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "reward._target_=mypkg.fn",
            "invalid config: reward._target_: cannot import mypkg.fn: No module named 'mypkg'",
        ),
        (
            "reward._target_=rlhf_lightning.rewards.NoSuchReward",
            "invalid config: reward._target_: cannot import rlhf_lightning.rewards.NoSuchReward: "
            "module 'rlhf_lightning.rewards' has no attribute 'NoSuchReward'",
        ),
        (
            "reward._target_=rlhf_lightning.preflight.PRECISIONS",
            "invalid config: reward._target_: rlhf_lightning.preflight.PRECISIONS is not callable",
        ),
        (
            "++algorithm.kl.reward.controller._target_=rlhf_lightning.nokl.Fixed",  # nested
            "invalid config: algorithm.kl.reward.controller._target_: cannot import "
            "rlhf_lightning.nokl.Fixed: module 'rlhf_lightning' has no attribute 'nokl'",
        ),
    ],
)
def test_every_target_is_an_importable_callable(override, message):
    cfg = _cfg(override)
    with pytest.raises(ConfigError) as error:
        check_targets(cfg)
    assert str(error.value) == message


def test_targets_in_lists_are_found_with_their_index():
    cfg = OmegaConf.create({"callbacks": [{"_target_": "builtins.dict"}, {"_target_": "no.pe"}]})
    with pytest.raises(ConfigError, match=r"^invalid config: callbacks\[1\]._target_: cannot"):
        check_targets(cfg)


@pytest.mark.parametrize(
    "group",
    [
        "reward=vader",
        "reward=learned",
        "reward=classifier_imdb",
        "kl=adaptive",
        "trainer=fsdp2",
        "data/prompts=imdb",
        "hparams_search=ppo_optuna",
    ],
)
def test_the_shipped_targets_import(group):
    check_targets(_cfg(group))


def test_rm_monitor_is_a_metric_the_reward_model_logs():
    with pytest.raises(
        ConfigError, match=r"^invalid config: rm.monitor: must be a metric .* 'acc'"
    ):
        check_rm_monitor(_cfg("rm.monitor=acc"))
    for metric in RM_METRICS:
        check_rm_monitor(_cfg(f"rm.monitor={metric}"))


def test_the_rm_metric_list_is_what_a_training_step_logs():
    from rlhf_lightning.models import ScalarRewardModel, load_tokenizer
    from rlhf_lightning.modules.reward_model import RewardModelModule

    cfg = _cfg("reward_backbone=tiny", "data/preferences=tiny")
    tokenizer = load_tokenizer("builtin:tiny", padding_side="right")
    datamodule = instantiate(cfg.data.preferences, tokenizer=tokenizer)
    module = RewardModelModule(
        ScalarRewardModel.from_backbone("builtin:tiny"), rm_config_from(cfg.rm)
    )
    trainer = L.Trainer(
        fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=datamodule)
    assert set(trainer.callback_metrics) == set(RM_METRICS)


def test_seed_must_be_an_int():
    with pytest.raises(ConfigError, match=r"^invalid config: seed: must be an integer, got 'x'"):
        check_seed(_cfg("seed=x"))
    with pytest.raises(ConfigError, match="seed"):
        check_seed(_cfg("seed=true"))
    check_seed(_cfg("seed=7"))


def test_an_unresolvable_interpolation_names_its_key():
    cfg = _cfg("data.prompts.template=${nokey}")
    with pytest.raises(ConfigError) as error:
        check_interpolations(cfg)
    assert str(error.value) == (
        "invalid config: data.prompts.template: Interpolation key 'nokey' not found"
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.prompts.template=${nokey}", "data.prompts.template"),
        ("seed=banana", "seed"),
        ("trainer.precision=17", "trainer.precision"),
        ("reward._target_=mypkg.fn", "reward._target_"),
        ("rm.monitor=val/acc", "rm.monitor"),
    ],
)
def test_preflight_runs_every_check(override, key):
    with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(key)}: "):
        preflight(_cfg(override))


def test_preflight_runs_before_the_data_and_any_model_load(tmp_path):
    """A missing data file is found when the task reads its data, before its models load; a
    bad trainer setting is reported first, and the task has not started (no seed log)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "rlhf_lightning.cli.train", "task=ppo", "policy=tiny",
        "reward=token_fraction", "data/prompts=tiny", f"hydra.run.dir={tmp_path}",
        "data.prompts.path=/no/such/prompts.jsonl", "trainer.num_nodes=0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        "error: invalid config: trainer.num_nodes: must be a positive int, got 0"
    )
    assert "Seed set" not in proc.stdout and "prompts:" not in proc.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+foo=1"], "foo: unknown key; the top-level keys are seed, debug"),
        (["seed=-1"], "seed: must be in [0, 4294967295], got -1"),
        (["+trainer.max_epochs=3"], "trainer.max_epochs: set by the task"),
        (["+trainer.max_epoch=3"], "trainer.max_epoch: unknown key: not an argument of"),
        (["trainer.strategy=dpp"], "trainer.strategy: unknown strategy 'dpp'; known: auto, ddp,"),
        (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps: must be >= 1, got 0"),
        (["+task.eval_evry=3"], "task.eval_evry: unknown key"),
        (["task.fn=rlhf_lightning.tasks.nope.run"], "task.fn: cannot import"),
        (["+policy.compile.fullgraf=true"], "policy.compile.fullgraf: unknown key: torch.compile"),
        (["+policy.compile.model=x"], "policy.compile.model: unknown key"),  # the policy is
        (["policy.gguf_file=x.gguf"], "policy.gguf_file: builtin:tiny takes no gguf_file"),
        (["+algorithm.optimizer._convert_=al"], "algorithm.optimizer._convert_: must be one of"),
        (["+reward._recursive_=1"], "reward._recursive_: must be true or false, got 1"),
        (["gold_reward=rlhf_lightning.nope"], "gold_reward: cannot use 'rlhf_lightning.nope'"),
        (["gold_reward=3"], "gold_reward: must be dict | str | None, got 3"),
        (["gold_reward={a: 1}"], "gold_reward: must be a reward source (a node with a _target_"),
        (["logger.default_hp_metric=1"], "logger.default_hp_metric: must be bool, got 1"),
        (["logger=csv", "+logger.bogus=1"], "logger.bogus: unknown key: lightning.pytorch.loggers"),
    ],
)
def test_added_keys_and_values_name_their_key(overrides, message):
    """What the config-leaf property (tests/test_config_leaves.py) cannot reach by changing the
    composed values: keys added with ``+``, and values of other forms."""
    with pytest.raises(ConfigError) as error:
        preflight(_cfg("task=ppo", "reward=token_fraction", *overrides))
    assert str(error.value).startswith(f"invalid config: {message}")


def test_unset_values_and_legal_forms_pass():
    preflight(_cfg("task=reward_model", "reward=learned"))  # reward.path=??? unused here
    preflight(_cfg("task=ppo", "gold_reward=tests.ddp_helpers.fraction_of_e"))  # a function path
    preflight(_cfg("task=ppo", "logger=csv", "logger.version=3", "+policy.compile.fullgraph=true"))
