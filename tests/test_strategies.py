"""Trainer strategy configs (what each task accepts, checked before any model loads) and the FSDP2
sharding itself, in one process (a gloo group of size 1). Two-process runs: test_fsdp2.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from hydra.utils import instantiate

from rlhf_lightning.config import ConfigError
from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.strategies import (
    FSDP2Strategy,
    gathered_weights,
    is_sharded,
    is_transformer_block,
    shard_policy,
)
from rlhf_lightning.tasks.common import check_strategy_available, resolve_ckpt_path, strategy_name
from rlhf_lightning.tasks.ppo import validate_ppo_setup
from tests.conftest import compose_config


def _cfg(*overrides):
    return compose_config(["policy=tiny", "reward=token_fraction", *overrides])


@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu", "gpu", "ddp", "fsdp2", "fsdp2_cpu"])
def test_ppo_accepts_the_ddp_family_and_fsdp2(trainer):
    validate_ppo_setup(_cfg("task=ppo", f"trainer={trainer}"))


@pytest.mark.parametrize(
    "strategy", ["fsdp", "deepspeed_stage_3", "model_parallel", "fsdp_cpu_offload"]
)
@pytest.mark.parametrize("task", ["ppo", "reward_model"])
def test_untested_sharded_strategies_are_refused_with_the_alternative(strategy, task):
    cfg = _cfg(f"task={task}", "trainer=gpu", f"trainer.strategy={strategy}")
    with pytest.raises(ConfigError, match=r"^invalid config: trainer.strategy: .*trainer=fsdp2"):
        check_strategy_available(cfg)


def test_fsdp2_options_a_run_cannot_use_are_config_errors():
    cases = {
        "trainer.precision": ["trainer.precision=16-mixed"],
        "trainer.strategy.rollout_gather": ["trainer.strategy.rollout_gather=sometimes"],
        "generation.sampling_dtype": ["generation.sampling_dtype=bfloat16"],
        "policy.compile": ["+policy.compile={}"],
    }
    for key, overrides in cases.items():
        with pytest.raises(ConfigError, match=rf"^invalid config: {key}: "):
            validate_ppo_setup(_cfg("task=ppo", "trainer=fsdp2_cpu", *overrides))
    validate_ppo_setup(_cfg("task=ppo", "trainer=fsdp2_cpu", "trainer.precision=bf16-mixed"))


def test_fsdp2_configs_build_the_strategy_with_every_rank_in_one_data_parallel_group():
    """fsdp2_cpu: 2 CPU processes; fsdp2 with trainer.num_nodes (multi-node, e.g. through the
    SLURM launcher): data_parallel_size = nodes x devices, no tensor parallelism."""
    import lightning as L

    cfg = _cfg("task=ppo", "trainer=fsdp2_cpu")
    assert strategy_name(cfg) == "rlhf_lightning.strategies.FSDP2Strategy"
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 2)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and strategy.rollout_gather == "full"
    assert strategy._save_distributed_checkpoint
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    assert strategy.mesh_shape() == (2, 1) and trainer.world_size == 2

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = ["task=ppo", "trainer=fsdp2", "trainer.num_nodes=2",
                 "hydra/launcher=slurm", "hydra.launcher.nodes=2",
                 "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4"]  # fmt: skip
    cfg = compose_config(overrides, hydra_config=True)
    assert cfg.hydra.launcher.nodes == cfg.trainer.num_nodes == 2
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == "auto"
    strategy = instantiate(cfg.trainer.strategy)
    # What the Trainer sets up on a node of 4 GPUs (devices=auto); CPUs stand in for them here.
    trainer = L.Trainer(accelerator="cpu", devices=4, num_nodes=2, strategy=strategy, logger=False)
    assert strategy.mesh_shape() == (8, 1) and trainer.world_size == 8


def test_sharded_checkpoint_directories_resolve_and_partial_ones_are_skipped(tmp_path):
    import time

    directory = tmp_path / "checkpoints"
    (directory / "iterepoch=1.ckpt").mkdir(parents=True)
    (directory / "iterepoch=1.ckpt" / "meta.pt").write_bytes(b"meta")
    time.sleep(0.01)
    (directory / "iterepoch=2.ckpt").mkdir()  # shards of a save a crash interrupted: no meta.pt
    cfg = _cfg(f"paths.output_dir={tmp_path}", "ckpt_path=last")
    assert resolve_ckpt_path(cfg) == str(directory / "iterepoch=1.ckpt")
    (directory / "last.ckpt").symlink_to("iterepoch=1.ckpt")
    assert resolve_ckpt_path(cfg) == str(directory / "last.ckpt")
    explicit = _cfg(f"ckpt_path='{directory / 'iterepoch=1.ckpt'}'")
    assert resolve_ckpt_path(explicit) == str(directory / "iterepoch=1.ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resolve_ckpt_path(_cfg(f"ckpt_path='{directory / 'iterepoch=2.ckpt'}'"))


# --------------------------------------------------------------------- sharding, one process
@pytest.fixture
def mesh(tmp_path):
    """A 1-rank gloo process group and its device mesh (FSDP2 shards over one rank)."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _policy_and_ref(lora: bool = False):
    from rlhf_lightning.models.adapters import AdaptersDisabled, inject_lora
    from rlhf_lightning.models.value_head import PolicyWithValueHead

    torch.manual_seed(0)
    lm = load_causal_lm("builtin:tiny")
    ref = AdaptersDisabled(inject_lora(lm, r=2)) if lora else copy.deepcopy(lm)
    return PolicyWithValueHead(lm), ref


def test_shard_policy_makes_each_block_a_unit_and_keeps_the_value_head_fp32(mesh):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    policy, ref = _policy_and_ref()
    shard_policy(policy, ref, mesh, "bf16-mixed")
    units = [n for n, m in policy.named_modules() if isinstance(m, FSDPModule)]
    blocks = [n for n, m in policy.named_modules() if is_transformer_block(m)]
    assert len(blocks) == 2 and units == ["", *blocks, "value_head"]
    assert all(isinstance(p, DTensor) for p in policy.parameters())
    assert is_sharded(ref) and [n for n, m in ref.named_modules() if isinstance(m, FSDPModule)] == [
        "",
        "model.layers.0",
        "model.layers.1",
    ]
    with torch.no_grad():  # the frozen reference never runs backward: nothing stays gathered
        ref(input_ids=torch.tensor([[5, 6, 7]]))
    assert all(isinstance(p, DTensor) for p in ref.parameters())
    assert policy._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
    assert policy.value_head._get_fsdp_state()._mp_policy.param_dtype is None  # stays fp32
    assert not is_transformer_block(policy.lm.lm_head)

    # LoRA: the reference is the policy's own (sharded) weights; only adapters and head train.
    lora_policy, lora_ref = _policy_and_ref(lora=True)
    shard_policy(lora_policy, lora_ref, mesh, "32-true")
    assert lora_ref.lm is lora_policy.lm
    assert all(isinstance(p, DTensor) for p in lora_policy.parameters())
    trained = {n for n, p in lora_policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("value_head.") for n in trained)


@pytest.mark.parametrize("every_unit", [False, True])
def test_gathered_weights_make_the_lm_callable_on_its_own(mesh, every_unit):
    """Outside the block a sharded policy's LM cannot run on its own (its root weights are
    shards); inside it gives the unsharded model's logits, and afterwards every parameter is a
    shard again and blocks reshard after forward as before."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    policy, ref = _policy_and_ref()
    plain = copy.deepcopy(policy.lm)
    shard_policy(policy, ref, mesh, "32-true")
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = plain(input_ids=ids).logits
    with pytest.raises(Exception):  # noqa: B017 - DTensor and Tensor mixed: torch's own errors
        policy.lm(input_ids=ids)
    with gathered_weights(policy, every_unit):
        torch.testing.assert_close(policy.lm(input_ids=ids).logits, expected)
        held = not isinstance(policy.lm.model.layers[0].mlp.up_proj.weight, DTensor)
        assert held == every_unit
    assert all(isinstance(p, DTensor) for p in policy.parameters())
    block = policy.lm.model.layers[0]
    assert isinstance(block, FSDPModule)
    policy(ids, torch.ones_like(ids))  # through the root: blocks reshard after their forward
    assert isinstance(block.mlp.up_proj.weight, DTensor)


def test_gathered_weights_do_nothing_to_an_unsharded_policy():
    policy, _ = _policy_and_ref()
    with gathered_weights(policy, every_unit=True):
        assert not is_sharded(policy)


def test_a_crash_while_saving_a_sharded_checkpoint_leaves_the_previous_one(
    mesh, tmp_path, monkeypatch
):
    """The shards go to a hidden directory renamed into place only when complete: a save that
    dies half-way leaves the checkpoint of that name as it was."""
    import lightning.pytorch.strategies.model_parallel as model_parallel
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    strategy = FSDP2Strategy()
    path = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    saved = _load_distributed_checkpoint(path)
    assert saved["epoch"] == 1 and torch.equal(saved["state_dict"]["w"], torch.ones(3))

    real_save = model_parallel._distributed_checkpoint_save

    def dies_half_way(state, directory):
        real_save(state, directory)  # the shards are written, meta.pt is not
        raise KeyboardInterrupt

    monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    kept = _load_distributed_checkpoint(path)
    assert kept["epoch"] == 1 and torch.equal(kept["state_dict"]["w"], torch.ones(3))

    monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", real_save)
    strategy.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert _load_distributed_checkpoint(path)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name) == ["last.ckpt"]
