"""Builders shared by the policy-optimisation tests: a tiny policy, a toy reward, prompt batches.

Configs are composed from the real presets (``conf/algorithm/``) through Hydra, then sized for
the tiny model, so the tests exercise what ``rlhf-train algorithm=<preset>`` runs.
"""

from __future__ import annotations

import copy
import dataclasses

import lightning as L
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader

from rlhf_lightning.config import RLConfig, rl_config_from
from rlhf_lightning.models import load_causal_lm, load_tokenizer
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.rewards import TokenFractionReward, build_reward
from rlhf_lightning.rollout.experience import make_experience
from rlhf_lightning.rollout.generation import sample_responses
from tests.conftest import compose_config

TINY = {
    "budget.num_iterations": 2,
    "budget.rollout_batch_size": 16,
    "budget.minibatch_size": 8,
    "budget.micro_batch_size": 8,
    "algorithm.epochs": 2,
    "algorithm.optimizer.lr": 3e-3,
    "generation.temperature": 1.0,
    "generation.max_new_tokens": 8,
    "generation.stop_token": None,
    "task.eval_every": 0,
    "task.sample_table_every": 0,
}


def tiny_config(preset: str = "ppo", kl_coef: float = 0.0, **overrides) -> RLConfig:
    """The ``preset``'s config sized for the tiny model, its KL terms (in the rewards, in the
    loss: whichever the preset has) at ``kl_coef``; ``overrides`` by dotted key, written with
    ``__`` for dots (``algorithm__kl__reward__estimator="k3"``)."""
    cfg = compose_config(["task=ppo", f"algorithm={preset}", "algorithm/lr_schedule=constant"])
    values = dict(TINY)
    if OmegaConf.select(cfg, "algorithm.value_model.lr") is not None:
        values["algorithm.value_model.lr"] = 3e-3
    for site in ("reward", "loss"):
        if OmegaConf.select(cfg, f"algorithm.kl.{site}") is not None:
            values[f"algorithm.kl.{site}.coef"] = kl_coef
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    return rl_config_from(cfg)


def tiny_ppo_module(cfg: RLConfig, reward=None) -> PPOModule:
    tokenizer = load_tokenizer("builtin:tiny", padding_side="left")
    lm = load_causal_lm("builtin:tiny")
    ref = copy.deepcopy(lm)
    return PPOModule(
        cfg.algorithm.value_model.build(lm),
        ref,
        tokenizer,
        build_reward(reward or TokenFractionReward("e")),
        cfg,
    )


def set_kl_coef(module: PPOModule, beta: float) -> None:
    """Set the current beta of every term of the module's KL penalty (a controller's value)."""
    for term in module.cfg.algorithm.kl.terms().values():
        term.controller.value = beta


def perturb_reference(module, scale: float = 0.05, seed: int = 1) -> None:
    """Move the frozen reference away from the policy (a deep copy): the KL is then not 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.ref_lm.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def prompt_batch(tokenizer, n: int) -> dict:
    prompts = [f"p{i}:" for i in range(n)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "prompts": prompts,
    }


def sample_prompts(module: PPOModule, n: int = 16, seed: int = 0, prompts=None, **kwargs):
    """A rollout of ``module``'s policy from ``prompts`` (default: ``n`` prompts of one length),
    sampled after ``torch.manual_seed(seed)``; ``kwargs`` go to ``sample_responses``."""
    torch.manual_seed(seed)
    if prompts is None:
        batch = prompt_batch(module.tokenizer, n)
    else:
        batch = {**module.tokenizer(prompts, return_tensors="pt", padding=True), "prompts": prompts}
    return sample_responses(
        module.policy.lm,
        module.tokenizer,
        batch["input_ids"],
        batch["attention_mask"],
        batch["prompts"],
        module.cfg.generation,
        module.stop_token_ids,
        **kwargs,
    )


def rollout_and_experience(
    module: PPOModule, n: int = 16, seed: int = 0, kl_coef: float | None = None, prompts=None
):
    """:func:`sample_prompts`, scored by the module's reward, and its experience (with the KL
    coefficient set to ``kl_coef`` first, when given)."""
    rollout = sample_prompts(module, n, seed, prompts)
    scores = module.reward(rollout.prompts, rollout.responses)
    if kl_coef is not None:
        set_kl_coef(module, kl_coef)
    return rollout, make_experience(module.policy, module.ref_lm, rollout, scores, module.cfg)


def fixed_prompt_loader(tokenizer, n: int) -> DataLoader:
    """One batch per epoch (= per iteration), the same prompts every time."""
    return DataLoader([prompt_batch(tokenizer, n)], batch_size=None)


class MetricHistory(L.Callback):
    """Records ``trainer.callback_metrics`` at the end of every training epoch (iteration)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def replace_cfg(module: PPOModule, group: str, **fields) -> None:
    """Replace fields of one part (budget, generation, algorithm) of the module's config."""
    part = dataclasses.replace(getattr(module.cfg, group), **fields)
    module.cfg = dataclasses.replace(module.cfg, **{group: part})


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
    loader = fixed_prompt_loader(module.tokenizer, module.cfg.prompts_per_batch)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, history.rows
