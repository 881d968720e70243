"""PPO and the reward model under FSDP2 (``trainer=fsdp2_cpu``: Lightning's ModelParallelStrategy,
2 CPU processes, gloo) against DDP and one process.

The multi-process runs are subprocesses (Lightning re-launches the command for rank 1): the PPO
update through ``python -m tests.test_fsdp2 ...`` (:func:`_worker`), the tasks through the CLI.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
GLOBAL_ROLLOUTS = 16
VAL_PROMPTS = 8
MAX_GRAD_NORM = 0.05  # below the tiny model's gradient norm (~0.7): clipping is active
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}


# ------------------------------------------------------------------------------ update worker
def _rollout_rows(rollout, rows: slice):
    """The rows ``rows`` of a Rollout."""
    return dataclasses.replace(
        rollout,
        **{
            f.name: getattr(rollout, f.name)[rows]
            for f in dataclasses.fields(rollout)
            if getattr(rollout, f.name) is not None
        },
    )


def _worker(strategy: str, lora: bool, checkpointing: bool, out: Path) -> None:
    """Validation (sampling on 8 held-out prompts per rank), then one PPO iteration (2 optimizer
    steps on the whole batch, gradients clipped) on a fixed global batch of 16 rollouts split
    over the ranks, then the export. Rank 0 saves what the test compares to ``out``.
    ``checkpointing``: the policy recomputes its blocks' activations in backward."""
    import lightning as L

    from rlhf_lightning.models import load_causal_lm, load_tokenizer
    from rlhf_lightning.models.adapters import (
        AdaptersDisabled,
        enable_gradient_checkpointing,
        inject_lora,
    )
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.rewards import TokenFractionReward, build_reward
    from rlhf_lightning.rollout.generation import sample_responses
    from rlhf_lightning.strategies import FSDP2Strategy, gather_full_state_dict, is_sharded
    from rlhf_lightning.tasks.ppo import export_policy
    from tests.ppo_helpers import MetricHistory, fixed_prompt_loader, prompt_batch, tiny_config

    world = 1 if strategy == "single" else 2
    per_rank = GLOBAL_ROLLOUTS // world
    cfg = tiny_config(
        budget__rollout_batch_size=per_rank,
        budget__minibatch_size=per_rank,  # one minibatch: the same rows on any number of ranks
        budget__micro_batch_size=4,
        algorithm__max_grad_norm=MAX_GRAD_NORM,
        kl_coef=0.1,
        generation__stop_token="a",  # responses of uneven lengths
    )
    torch.manual_seed(0)
    tokenizer = load_tokenizer("builtin:tiny", padding_side="left")
    lm = load_causal_lm("builtin:tiny")
    if lora:
        ref_lm = AdaptersDisabled(inject_lora(lm, **LORA))
        with torch.no_grad():  # adapters that change the policy: non-zero KL terms
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
    else:
        ref_lm = copy.deepcopy(lm)
        with torch.no_grad():  # a reference unlike the policy: non-zero KL terms
            for p in ref_lm.parameters():
                p.add_(0.05 * torch.randn_like(p))
    if checkpointing:
        enable_gradient_checkpointing(lm)
    batch = prompt_batch(tokenizer, GLOBAL_ROLLOUTS)
    rollout = sample_responses(
        lm, tokenizer, batch["input_ids"], batch["attention_mask"], batch["prompts"],
        cfg.generation, [tokenizer.convert_tokens_to_ids("a")],
    )  # fmt: skip

    class FixedRollout(PPOModule):
        """Trains every rank on its rows of the same global rollout batch."""

        def sample(self, batch, samples_per_prompt=1):
            if self.trainer.validating:
                return super().sample(batch, samples_per_prompt)
            start = self.global_rank * per_rank
            return _rollout_rows(rollout, slice(start, start + per_rank))

    module = FixedRollout(
        cfg.algorithm.value_model.build(lm), ref_lm, tokenizer,
        build_reward(TokenFractionReward("e")), cfg,
        policy_lora=LORA if lora else None,
    )  # fmt: skip
    strategies = {
        "single": "auto",
        "ddp": "ddp",
        "fsdp2": FSDP2Strategy(rollout_gather="per_layer" if lora else "full"),
    }
    history = MetricHistory()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategies[strategy], max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=[history],
    )  # fmt: skip
    trainer.validate(module, fixed_prompt_loader(tokenizer, VAL_PROMPTS), verbose=False)
    val_samples = list(module.val_samples)
    trainer.fit(module, fixed_prompt_loader(tokenizer, per_rank))
    sharded = is_sharded(module.policy)
    full_state = gather_full_state_dict(module.policy) if sharded else None
    if trainer.is_global_zero:
        export_policy(module, tokenizer, out.with_suffix(".policy"), full_state)
        state = full_state or {n: t.detach().clone() for n, t in module.policy.state_dict().items()}
        torch.save(
            {
                "state": state,
                "metrics": history.rows[-1],
                "val_samples": val_samples,
                "param_types": {type(p).__name__ for p in module.policy.parameters()},
            },
            out,
        )


def _run(strategy: str, tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / f"{strategy}{''.join(flags)}.pt"
    cmd = [sys.executable, "-m", "tests.test_fsdp2", strategy, str(out), *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = torch.load(out, weights_only=False)
    run["export"] = load_file(out.with_suffix(".policy") / "model.safetensors")
    return run


def _assert_same_update(run: dict, single: dict) -> None:
    assert run["metrics"]["optim/grad_norm"] == pytest.approx(
        single["metrics"]["optim/grad_norm"], rel=1e-4
    )
    assert run["metrics"]["optim/clipped_frac"] == 1.0
    for name in (
        "optim/loss_total",
        "kl/sequence",
        "objective/score",
        "rollout/advantage_std",
        "policy/epochs",  # a per-rank count: its all-rank reduction must give the count again
    ):
        assert run["metrics"][name] == pytest.approx(single["metrics"][name], rel=1e-4), name
    assert run["state"].keys() == single["state"].keys()
    for name, value in single["state"].items():
        torch.testing.assert_close(run["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert run["export"].keys() == single["export"].keys()
    for name, value in single["export"].items():
        torch.testing.assert_close(run["export"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # Rank 0 sampled its 8 validation prompts with the same seed: the same responses.
    assert run["val_samples"] == single["val_samples"] and len(run["val_samples"]) == VAL_PROMPTS


@pytest.mark.slow
def test_one_ppo_update_under_fsdp2_equals_ddp_and_one_process(tmp_path):
    """The same global batch and update: parameters and the exported policy agree to fp32
    rounding, with the gradient norm clipped over all shards (the global norm); sampling from
    the gathered weights draws what the unsharded policy draws."""
    single, ddp, fsdp2 = (_run(s, tmp_path) for s in ("single", "ddp", "fsdp2"))
    assert fsdp2["param_types"] == {"DTensor"} and ddp["param_types"] == {"Parameter"}
    from tests.ppo_helpers import tiny_config, tiny_ppo_module

    torch.manual_seed(0)
    initial = tiny_ppo_module(tiny_config()).policy.state_dict()
    assert max((single["state"][n] - initial[n]).abs().max() for n in initial) > 1e-3
    _assert_same_update(ddp, single)
    _assert_same_update(fsdp2, single)


@pytest.mark.slow
def test_lora_update_under_fsdp2_equals_one_process(tmp_path):
    """LoRA (the reference is the policy with its adapters off, called on the gathered root)
    with per-layer gathering in sampling and gradient checkpointing under FSDP2; the export
    merges the adapters."""
    single = _run("single", tmp_path, "--lora")
    fsdp2 = _run("fsdp2", tmp_path, "--lora", "--gradient-checkpointing")
    assert any("lora_" in name for name in fsdp2["state"])
    _assert_same_update(fsdp2, single)
    assert not any("lora" in name for name in fsdp2["export"])


# ------------------------------------------------------------------------------- the tasks
TINY_PPO = [
    "task=ppo", "policy=tiny", "reward=vader", "data/prompts=tiny",
    "reward._target_=tests.test_reliability.fraction_of_e_or_die", "+reward._partial_=true",
    "trainer=fsdp2_cpu", "trainer.enable_progress_bar=false", "budget.num_iterations=4",
    "budget.rollout_batch_size=8", "budget.minibatch_size=4", "budget.micro_batch_size=2",
    "algorithm.epochs=2", "task.eval_every=0", "generation.max_new_tokens=8",
    "task.checkpoint_every=1", "~logger",
]  # fmt: skip


def _cli(run_dir: Path, *overrides: str, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf_lightning.cli.train", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(
        cmd, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True, timeout=600
    )


def _sharded_checkpoint(path: Path) -> dict:
    """A sharded checkpoint read into one process: full weights and optimizer states."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    assert path.is_dir() and (path / "meta.pt").is_file()
    return _load_distributed_checkpoint(path)


@pytest.mark.slow
def test_kill_9_then_resume_under_fsdp2_matches_an_uninterrupted_run(tmp_path):
    """Both ranks SIGKILL themselves inside iteration 2 (their 3rd reward call); ``ckpt_path=last``
    resumes from the sharded checkpoint of iteration 1 and ends like an uninterrupted run; the
    exported policy is a plain transformers model holding the final weights."""
    from transformers import AutoModelForCausalLM

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    died = _cli(crashed, *TINY_PPO, RLHF_TEST_DIE_AT_CALL="3")
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    last = crashed / "checkpoints" / "last.ckpt"
    assert _sharded_checkpoint(last)["epoch"] == 1  # iterations 0..1 saved, 2 lost mid-way
    resumed = _cli(crashed, *TINY_PPO, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _cli(straight, *TINY_PPO).returncode == 0

    a = _sharded_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = _sharded_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"] == 16
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, msg=name)
    torch.testing.assert_close(b["optimizer_0"]["state"], a["optimizer_0"]["state"])
    assert str(a["lr_schedulers"]) == str(b["lr_schedulers"])
    assert a["rlhf_lightning"] == b["rlhf_lightning"]

    lm = AutoModelForCausalLM.from_pretrained(crashed / "policy")
    for name, value in lm.state_dict().items():
        torch.testing.assert_close(value, b["state_dict"][f"policy.lm.{name}"], msg=name)
    head = load_file(crashed / "policy" / "value_head.safetensors")
    torch.testing.assert_close(head["weight"], b["state_dict"]["policy.value_head.weight"])


@pytest.mark.slow
def test_reward_model_under_fsdp2_equals_ddp(tmp_path):
    """Same data split, same steps (gradients clipped by Lightning over the sharded parameters):
    the exported reward models agree and hold the best (sharded) checkpoint's weights."""
    rm = [
        "task=reward_model", "reward_backbone=tiny", "data/preferences=tiny", "rm.max_epochs=2",
        "rm.gradient_clip_val=0.05", "trainer.enable_progress_bar=false", "~logger",
        "trainer.precision=32-true",  # the sharding is compared, on any CPU
    ]  # fmt: skip
    for trainer in ("ddp_cpu", "fsdp2_cpu"):
        proc = _cli(tmp_path / trainer, *rm, f"trainer={trainer}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    (best,) = (tmp_path / "fsdp2_cpu" / "checkpoints").glob("rm-*.ckpt")
    best_weights = _sharded_checkpoint(best)["state_dict"]
    exported = load_file(tmp_path / "fsdp2_cpu" / "reward_model" / "model.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(value, best_weights[f"model.backbone.{key}"], msg=key)
    for name in ("model.safetensors", "reward_head.safetensors"):
        ddp = load_file(tmp_path / "ddp_cpu" / "reward_model" / name)
        fsdp2 = load_file(tmp_path / "fsdp2_cpu" / "reward_model" / name)
        assert ddp.keys() == fsdp2.keys()
        for key, value in ddp.items():
            torch.testing.assert_close(fsdp2[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_pipeline_under_fsdp2(tmp_path):
    """Reward model, then PPO against it, in the same two processes: rank 1 starts PPO only once
    rank 0 has exported the reward model."""
    from transformers import AutoModelForCausalLM

    proc = _cli(
        tmp_path, "task=pipeline", "policy=tiny", "reward_backbone=tiny", "data/prompts=tiny",
        "data/preferences=tiny", "trainer=fsdp2_cpu", "trainer.enable_progress_bar=false",
        "rm.max_epochs=1", "budget.num_iterations=1", "budget.rollout_batch_size=8",
        "budget.minibatch_size=4", "budget.micro_batch_size=2", "algorithm.epochs=1",
        "task.eval_every=1", "task.eval_batches=1", "generation.max_new_tokens=8", "~logger",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "summary.md").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "policy")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy", choices=("single", "ddp", "fsdp2"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    _worker(args.strategy, args.lora, args.gradient_checkpointing, args.out)
