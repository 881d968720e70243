"""Trainer strategy configs: what each task accepts, checked before any model loads."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy

from rlhf_lightning.cli.train import CONF_DIR
from rlhf_lightning.config import ConfigError
from rlhf_lightning.models import load_backbone, load_causal_lm
from rlhf_lightning.strategies import is_transformer_block
from rlhf_lightning.tasks.common import check_strategy_available, strategy_name
from rlhf_lightning.tasks.ppo import validate_ppo_setup


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["policy=tiny", "reward=token_fraction", *overrides])


@pytest.mark.parametrize("trainer", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_ppo_refuses_sharded_strategies_with_the_reason(trainer):
    with pytest.raises(ConfigError, match=r"not supported for PPO.*peft=lora"):
        validate_ppo_setup(_cfg("task=ppo", f"trainer={trainer}"))


@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu", "gpu", "ddp"])
def test_ppo_accepts_the_ddp_family(trainer):
    validate_ppo_setup(_cfg("task=ppo", f"trainer={trainer}"))


def test_sharded_strategies_on_cpu_and_missing_deepspeed_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="needs GPUs"):
        check_strategy_available(
            _cfg("task=reward_model", "trainer=fsdp", "trainer.accelerator=cpu")
        )
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        check_strategy_available(_cfg("task=reward_model", "trainer=deepspeed_zero3"))


def test_fsdp_config_builds_a_strategy_that_wraps_each_transformer_block():
    cfg = _cfg("task=reward_model", "trainer=fsdp")
    assert strategy_name(cfg) == "rlhf_lightning.strategies.fsdp_strategy"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    wrap = strategy.kwargs["auto_wrap_policy"]
    for model in (load_causal_lm("builtin:tiny"), load_backbone("builtin:tiny")):
        wrapped = [
            n for n, m in model.named_modules() if wrap(module=m, recurse=False, nonwrapped_numel=0)
        ]
        layers = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert wrapped == layers and len(layers) >= 2
    assert not is_transformer_block(load_causal_lm("builtin:tiny").lm_head)
