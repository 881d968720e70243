"""Builders shared by the PPO tests: a tiny policy, a toy reward and one fixed prompt batch."""

from __future__ import annotations

import copy

import lightning as L
from torch.utils.data import DataLoader

from rlhf_lightning.config import GenerationConfig, KLConfig, PPOConfig
from rlhf_lightning.kl import FixedKLController
from rlhf_lightning.models import PolicyWithValueHead, load_causal_lm, load_tokenizer
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.rewards import TokenFractionReward


def tiny_ppo_config(**overrides) -> PPOConfig:
    generation = GenerationConfig(
        temperature=1.0, max_new_tokens=8, stop_token=overrides.pop("stop_token", None)
    )
    kl = KLConfig(coef=overrides.pop("kl_coef", 0.0), estimator=overrides.pop("kl_kind", "k1"))
    base = dict(
        num_iterations=2,
        rollout_batch_size=16,
        minibatch_size=8,
        micro_batch_size=8,
        ppo_epochs=2,
        policy_lr=3e-3,
        value_lr=3e-3,
        eval_every=0,
        sample_table_every=0,
        lr_decay="constant",
    )
    base.update(overrides)
    return PPOConfig(**base, generation=generation, kl=kl)


def tiny_ppo_module(cfg: PPOConfig, reward=None) -> PPOModule:
    tokenizer = load_tokenizer("builtin:tiny", padding_side="left")
    lm = load_causal_lm("builtin:tiny")
    return PPOModule(
        PolicyWithValueHead(lm),
        copy.deepcopy(lm),
        tokenizer,
        reward or TokenFractionReward("e"),
        cfg,
        FixedKLController(cfg.kl.coef),
    )


def prompt_batch(tokenizer, n: int) -> dict:
    prompts = [f"p{i}:" for i in range(n)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "prompts": prompts,
    }


def fixed_prompt_loader(tokenizer, n: int) -> DataLoader:
    """One batch per epoch (= per PPO iteration), the same prompts every time."""
    return DataLoader([prompt_batch(tokenizer, n)], batch_size=None)


class MetricHistory(L.Callback):
    """Records ``trainer.callback_metrics`` at the end of every training epoch (PPO iteration)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(
    module: PPOModule, max_epochs: int, tmp_path=None, ckpt_path=None, callbacks=(), **trainer_kw
):
    history = MetricHistory()
    trainer = L.Trainer(
        **trainer_kw,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=tmp_path is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[history, *callbacks],
        default_root_dir=tmp_path,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    loader = fixed_prompt_loader(module.tokenizer, module.cfg.rollout_batch_size)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, history.rows
