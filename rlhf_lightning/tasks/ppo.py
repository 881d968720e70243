"""``rlhf-train task=ppo``: PPO of the policy against the configured reward source.

Reads top to bottom: validate config -> tokenizer + prompts (validated before any model loads)
-> reward sources -> policy, value head / critic, frozen reference -> module -> callbacks ->
trainer -> (baseline eval) -> fit -> export with ``save_pretrained``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from rlhf_lightning.config import (
    ConfigError,
    PolicyOptions,
    RLConfig,
    policy_options_from,
    rl_config_from,
)
from rlhf_lightning.models import load_reward_tokenizer
from rlhf_lightning.models.adapters import (
    AdaptersDisabled,
    compile_policy,
    enable_gradient_checkpointing,
    has_adapters,
    inject_lora,
    merged_copy,
)
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.rewards import build_reward
from rlhf_lightning.rollout.generation import resolve_stop_token_ids
from rlhf_lightning.tasks.checkpoints import (
    ResumeCheckpoint,
    resume_checkpoint,
    resume_command,
    run_settings,
)
from rlhf_lightning.tasks.common import (
    build_trainer,
    check_strategy_available,
    checkpoint_dir,
    load_policy_lm,
    load_policy_tokenizer,
    run_dir,
    strategy_name,
    task_metric,
)
from rlhf_lightning.tracking import log_final_hparams

log = logging.getLogger(__name__)

SUPPORTED_STRATEGIES = (
    "auto",
    "ddp",
    "ddp_spawn",
    "ddp_find_unused_parameters_true",
    "single_device",
)


def run(cfg: DictConfig) -> float | None:
    return train_ppo(cfg)["metric"]


def validate_ppo_setup(cfg: DictConfig) -> RLConfig:
    """Every check that needs no model: returns the validated RLConfig."""
    ppo_cfg = rl_config_from(cfg)
    policy_options_from(cfg.policy)
    strategy = strategy_name(cfg)
    if strategy not in SUPPORTED_STRATEGIES:
        raise ConfigError(
            f"invalid config: trainer.strategy: {strategy!r} is not supported for PPO: rollouts "
            "call generate() on the policy and on a frozen reference outside the Lightning "
            "module, which needs full parameters on every rank (FSDP / DeepSpeed shard them). "
            f"Use one of {', '.join(SUPPORTED_STRATEGIES)}; to fit a larger policy, "
            "peft=lora (no reference copy) and policy.gradient_checkpointing=true"
        )
    check_strategy_available(cfg)
    if OmegaConf.select(cfg, "reward._target_") is None:
        raise ConfigError("invalid config: reward: needs a _target_ (e.g. reward=vader)")
    missing = OmegaConf.missing_keys(cfg.reward)
    if missing:
        raise ConfigError(
            f"invalid config: {sorted(missing)[0]}: required (e.g. reward.path=DIR for "
            "reward=learned)"
        )
    return ppo_cfg


def check_critic_tokenizer(ppo_cfg: RLConfig, tokenizer) -> None:
    """A separate critic reads the policy's token ids: its tokenizer must be the policy's."""
    path = getattr(ppo_cfg.algorithm.value_model, "path", None)
    if path is None:
        return
    critic_tokenizer = load_reward_tokenizer(path)
    if critic_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"invalid config: algorithm.value_model.path: the critic at {path} uses a "
            "different tokenizer from the policy's; a critic must share the policy's tokenizer"
        )


def build_policy(cfg: DictConfig, ppo_cfg: RLConfig, options: PolicyOptions | None = None):
    """Policy with its value model (``algorithm.value_model``) and the frozen reference, in the
    policy's dtype.

    With ``policy.lora`` the reference is the policy with its adapters disabled (no copy of the
    weights); otherwise a frozen deep copy of the policy LM. ``options`` default to
    ``policy_options_from(cfg.policy)``.
    """
    options = options or policy_options_from(cfg.policy)
    lm = load_policy_lm(cfg)
    if options.lora is not None:
        ref_lm = AdaptersDisabled(inject_lora(lm, **asdict(options.lora)))
    else:
        ref_lm = copy.deepcopy(lm)
    policy = ppo_cfg.algorithm.value_model.build(lm)
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(policy.lm)
        if policy.critic_backbone is not None:
            enable_gradient_checkpointing(policy.critic_backbone)
    if options.compile is not None:
        compile_policy(policy, **options.compile)
    return policy, ref_lm


def export_policy(module: PPOModule, tokenizer, out_dir: Path) -> Path:
    """``save_pretrained`` of the policy LM (plain transformers loads it) + the value head.

    LoRA adapters are merged into the exported weights (the export needs no PEFT).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = merged_copy(module.policy.lm) if has_adapters(module.policy.lm) else module.policy.lm
    lm.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if module.policy.value_head is not None:
        head = module.policy.value_head.state_dict()
        head = {k: v.detach().cpu().contiguous() for k, v in head.items()}
        save_file(head, out_dir / "value_head.safetensors")
    return out_dir


def train_ppo(cfg: DictConfig, stage_dir: str | None = None) -> dict:
    """Run PPO; returns the final metrics, the baseline eval metrics and the export path."""
    ppo_cfg = validate_ppo_setup(cfg)
    ckpt_path = resume_checkpoint(cfg, "ppo", stage_dir)  # checked before any model loads
    L.seed_everything(cfg.seed, workers=True)

    tokenizer = load_policy_tokenizer(cfg, padding_side="left")
    datamodule = instantiate(
        cfg.data.prompts,
        tokenizer=tokenizer,
        batch_size=ppo_cfg.prompts_per_iteration,
        chat_template=cfg.policy.get("use_chat_template", False),
    )
    datamodule.setup("fit")  # reads and validates every prompt before any model loads
    check_critic_tokenizer(ppo_cfg, tokenizer)
    resolve_stop_token_ids(tokenizer, ppo_cfg.generation.stop_token)  # fails before models load

    reward = build_reward(instantiate(cfg.reward))
    gold = build_reward(instantiate(cfg.gold_reward)) if cfg.get("gold_reward") else None
    options = policy_options_from(cfg.policy)
    policy, ref_lm = build_policy(cfg, ppo_cfg, options)
    kl_controller = ppo_cfg.algorithm.kl.build_controller()
    module = PPOModule(
        policy,
        ref_lm,
        tokenizer,
        reward,
        ppo_cfg,
        kl_controller,
        gold,
        seed=cfg.seed,
        policy_source=cfg.policy.name_or_path,
        policy_lora=asdict(options.lora) if options.lora else None,
    )

    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir(cfg, stage_dir),
        filename="iter{epoch}",
        save_top_k=1,  # the newest iteration (no monitor); last.ckpt links to it
        save_last="link",
        every_n_epochs=ppo_cfg.cadence.checkpoint_every,
        save_on_train_epoch_end=True,
    )
    # Records the run's settings in each checkpoint; saves last.ckpt on SIGTERM / SIGINT.
    on_signal = ResumeCheckpoint(
        checkpoint_dir(cfg, stage_dir), "ppo", run_settings(cfg, "ppo"), resume_command(cfg)
    )
    cadence = ppo_cfg.cadence
    trainer = build_trainer(
        cfg,
        callbacks=[checkpoint, on_signal],
        stage="ppo",
        max_epochs=ppo_cfg.budget.num_iterations,
        check_val_every_n_epoch=cadence.eval_every or None,
        limit_val_batches=(cadence.eval_batches or 1.0) if cadence.eval_every else 0,
        use_distributed_sampler=False,
        reload_dataloaders_every_n_epochs=0,
    )
    baseline, baseline_samples = {}, []
    if cadence.eval_every and ckpt_path is None:
        trainer.validate(module, datamodule, verbose=False)
        baseline = {k: float(v) for k, v in trainer.callback_metrics.items()}
        baseline_samples = list(module.val_samples)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    result = {
        "metric": task_metric(trainer, cfg.task.metric),
        "baseline": baseline,
        "final": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "baseline_samples": baseline_samples,
        "final_samples": list(module.val_samples),
        "path": None,
    }
    log_final_hparams(trainer, cfg, {cfg.task.metric: result["metric"]})
    if trainer.is_global_zero:
        result["path"] = str(export_policy(module, tokenizer, run_dir(cfg) / "policy"))
        log.info("exported policy to %s", result["path"])
    return result
