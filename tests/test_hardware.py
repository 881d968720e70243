"""Device-dependent defaults: bf16 only where the hardware computes in it, and said so."""

from __future__ import annotations

import logging

import pytest

from rlhf_lightning import hardware
from rlhf_lightning.hardware import Bf16Support, resolve_precision, resolve_sampling_dtype
from rlhf_lightning.tasks.common import trainer_precision_from
from tests.conftest import compose_config


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU does (``cpu_bf16(True)``) or does not have native bf16."""

    def pretend(native: bool) -> None:
        for fn in (resolve_precision, resolve_sampling_dtype):
            fn.cache_clear()
        monkeypatch.setattr(
            hardware,
            "bf16_support",
            lambda device_type: Bf16Support(device_type, native, f"pretend native={native}"),
        )

    yield pretend
    for fn in (resolve_precision, resolve_sampling_dtype):
        fn.cache_clear()


def _cfg(*overrides):
    return compose_config(overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the main job (task=pipeline)
        ["task=ppo"],
        ["task=reward_model"],
        ["experiment=sentiment_vader"],
        ["experiment=sentiment_kl_sweep"],
        ["trainer=ddp_cpu", "task=ppo"],
    ],
)
def test_cpu_defaults_choose_fp32_without_native_bf16_and_bf16_with_it(cpu_bf16, overrides):
    cfg = _cfg(*overrides)
    assert cfg.trainer.precision == "auto"
    cpu_bf16(False)
    assert trainer_precision_from(cfg) == "32-true"
    cpu_bf16(True)
    assert trainer_precision_from(cfg) == "bf16-mixed"


def test_the_choice_and_its_reason_are_logged_once(cpu_bf16, caplog):
    cpu_bf16(False)
    with caplog.at_level(logging.INFO, logger="rlhf_lightning.hardware"):
        resolve_precision("auto", "cpu")
        resolve_precision("auto", "cpu")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["trainer.precision=auto -> 32-true (pretend native=False)"]


def test_explicit_precision_is_obeyed_with_a_warning_where_bf16_is_emulated(cpu_bf16, caplog):
    cpu_bf16(False)
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.hardware"):
        assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
        assert resolve_precision("32-true", "cpu") == "32-true"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "10-50x slower" in warnings[0]
    cpu_bf16(True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.hardware"):
        assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_sampling_dtype_auto_follows_the_hardware(cpu_bf16, caplog):
    cpu_bf16(False)
    assert resolve_sampling_dtype("auto", "cpu") is None
    assert resolve_sampling_dtype(None, "cpu") is None
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.hardware"):
        assert resolve_sampling_dtype("bfloat16", "cpu") == "bfloat16"
    assert any("much slower" in r.getMessage() for r in caplog.records)
    cpu_bf16(True)
    assert resolve_sampling_dtype("auto", "cpu") == "bfloat16"


def test_this_machine_is_described_by_its_feature_flags():
    """The real probe: a reason naming the CPU capability, and a verdict that matches a timed
    matmul where the two disagree by far (emulated bf16 is ~100x slower than fp32)."""
    hardware.bf16_support.cache_clear()
    support = hardware.bf16_support("cpu")
    assert "CPU capability" in support.reason
    if not support.native:
        import torch

        ratio = hardware.matmul_gflops(torch.bfloat16, 256, 0.05) / hardware.matmul_gflops(
            torch.float32, 256, 0.05
        )
        assert ratio < 1.0, f"bf16 runs at {ratio:.2f}x fp32 on a CPU flagged non-native"
