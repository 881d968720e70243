"""``rlhf-train task=ppo``: PPO of the policy against the configured reward source.

Reads top to bottom: validate config -> tokenizer + prompts (validated, with the settings that
need the tokenizer, before any model loads) -> callbacks -> trainer (the eval prompts checked
against its ranks) -> reward sources -> policy, value head / critic, frozen reference -> module
-> (baseline eval) -> fit -> the last evaluation's per-prompt scores (``heldout.jsonl``) ->
export with ``save_pretrained``.
"""

from __future__ import annotations

import copy
import json
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
from rlhf_lightning.data.tokenize import has_chat_template
from rlhf_lightning.hparams import log_final_hparams
from rlhf_lightning.models import load_reward_tokenizer
from rlhf_lightning.models.adapters import (
    AdaptersDisabled,
    compile_policy,
    enable_gradient_checkpointing,
    has_adapters,
    inject_lora,
    merged_copy,
    save_adapters,
)
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.rewards import build_reward
from rlhf_lightning.rollout.generation import resolve_stop_token_ids, save_sampling_settings
from rlhf_lightning.stats import gather_shards, stop_together
from rlhf_lightning.strategies import gather_full_state_dict, is_sharded
from rlhf_lightning.tasks.checkpoints import (
    ResumeCheckpoint,
    resume_checkpoint,
    resume_command,
    run_settings,
)
from rlhf_lightning.tasks.common import (
    FSDP2,
    build_trainer,
    check_strategy_available,
    checkpoint_dir,
    load_policy_lm,
    load_policy_tokenizer,
    run_dir,
    strategy_name,
    task_metric,
)

log = logging.getLogger(__name__)

SUPPORTED_STRATEGIES = (
    "auto",
    "ddp",
    "ddp_spawn",
    "ddp_find_unused_parameters_true",
    "single_device",
    FSDP2,
)


def run(cfg: DictConfig) -> float | None:
    return train_ppo(cfg)["metric"]


def validate_ppo_setup(cfg: DictConfig) -> RLConfig:
    """Every check that needs no model: returns the validated RLConfig."""
    ppo_cfg = rl_config_from(cfg)
    policy_options_from(cfg.policy)
    strategy = strategy_name(cfg)
    check_strategy_available(cfg)
    if strategy not in SUPPORTED_STRATEGIES:
        raise ConfigError(
            f"invalid config: trainer.strategy: {strategy!r} is not supported for PPO; use one "
            f"of {', '.join(SUPPORTED_STRATEGIES)} (trainer=ddp, trainer=fsdp2, ...)"
        )
    if strategy == FSDP2:
        check_fsdp2_options(cfg, ppo_cfg)
    if OmegaConf.select(cfg, "reward._target_") is None:
        raise ConfigError("invalid config: reward: needs a _target_ (e.g. reward=vader)")
    missing = OmegaConf.missing_keys(cfg.reward)
    if missing:
        raise ConfigError(
            f"invalid config: {sorted(missing)[0]}: required (e.g. reward.path=DIR for "
            "reward=learned)"
        )
    return ppo_cfg


def check_fsdp2_options(cfg: DictConfig, ppo_cfg: RLConfig) -> None:
    """What PPO under FSDP2 does not take: a sampling copy (the gathered weights sample directly;
    ``trainer.precision=bf16-mixed`` gathers them in bf16) and ``policy.compile`` (untested with
    sharding)."""
    if ppo_cfg.generation.sampling_dtype is not None:
        raise ConfigError(
            "invalid config: generation.sampling_dtype: not supported with trainer=fsdp2 (the "
            "rollout samples from the gathered weights; trainer.precision=bf16-mixed gathers "
            "them in bf16); set it to null"
        )
    if cfg.policy.get("compile") is not None:
        raise ConfigError(
            "invalid config: policy.compile: not supported with trainer=fsdp2; set it to null"
        )


def load_prompts(cfg: DictConfig, ppo_cfg: RLConfig):
    """The policy tokenizer and the prompt data, read and validated, with every setting that
    needs the tokenizer checked (the chat template, the stop token, a critic's tokenizer):
    ``(tokenizer, datamodule)``. Loads no model."""
    tokenizer = load_policy_tokenizer(cfg, padding_side="left")
    chat_template = cfg.policy.get("use_chat_template", False)
    if chat_template and not has_chat_template(tokenizer):
        raise ConfigError(
            f"invalid config: policy.use_chat_template: tokenizer {tokenizer.name_or_path!r} has "
            "no chat template; set it to false"
        )
    resolve_stop_token_ids(tokenizer, ppo_cfg.generation.stop_token)
    check_critic_tokenizer(ppo_cfg, tokenizer)
    datamodule = instantiate(
        cfg.data.prompts,
        tokenizer=tokenizer,
        batch_size=ppo_cfg.prompts_per_batch,
        chat_template=chat_template,
    )
    datamodule.setup("fit")  # reads and validates every prompt
    return tokenizer, datamodule


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


def export_policy(
    module: PPOModule, tokenizer, out_dir: Path, full_state: dict | None = None
) -> Path:
    """``save_pretrained`` of the policy LM (plain transformers loads it), its sampling settings
    (``generation_config.json``) and the value head.

    LoRA adapters are merged into the exported weights (the export needs no PEFT) and, from an
    unsharded policy, also saved alone in PEFT's format under ``adapter/``.
    ``full_state``: the full state dict of a sharded policy (``gather_full_state_dict``, which
    every rank must call); the LM is then rebuilt unsharded from its config with those weights.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if full_state is None:
        lm = merged_copy(module.policy.lm) if has_adapters(module.policy.lm) else module.policy.lm
        head = module.policy.value_head.state_dict() if module.policy.value_head else {}
    else:
        lm = unsharded_lm(module.policy.lm, full_state, module.policy_lora)
        head = {k[11:]: v for k, v in full_state.items() if k.startswith("value_head.")}
    lm.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    save_sampling_settings(out_dir, module.cfg.generation, module.stop_token_ids, tokenizer)
    if full_state is None and has_adapters(module.policy.lm):  # the adapters alone, for PEFT
        save_adapters(module.policy.lm, out_dir / "adapter", module.policy_source)
    if head:
        head = {k: v.detach().cpu().contiguous() for k, v in head.items()}
        save_file(head, out_dir / "value_head.safetensors")
    return out_dir


def unsharded_lm(lm, full_state: dict, lora: dict | None):
    """A plain copy of the (sharded) policy LM ``lm`` holding the ``lm.*`` weights of the
    policy's full state dict, its LoRA adapters (settings ``lora``) merged."""
    weights = {k[3:]: v for k, v in full_state.items() if k.startswith("lm.")}
    dtype = next(v.dtype for v in weights.values() if v.is_floating_point())
    plain = type(lm)(copy.deepcopy(lm.config)).to(dtype)
    plain.generation_config = copy.deepcopy(lm.generation_config)
    if lora is not None:
        inject_lora(plain, **lora)
    plain.load_state_dict(weights, strict=True)
    return merged_copy(plain) if lora is not None else plain.eval()


HELDOUT_FILE = "heldout.jsonl"  # the last evaluation's score of each held-out prompt


def write_heldout_scores(rows: list[dict], path: Path) -> None:
    """One JSON line per held-out prompt of the last evaluation: ``prompt``, ``reward`` (and
    ``gold_score``), in the prompts' order; what ``rlhf-compare --per-prompt
    heldout.jsonl:reward`` reads for its seeds x prompts unit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def train_ppo(cfg: DictConfig, stage_dir: str | None = None) -> dict:
    """Run PPO; returns the final metrics, the baseline eval metrics and the export path."""
    ppo_cfg = validate_ppo_setup(cfg)
    for site, bias in ppo_cfg.algorithm.kl.biased_gradients().items():  # allowed, so said
        log.warning("algorithm.kl.%s (algorithm.kl.allow_biased_gradient=true): %s", site, bias)
    ckpt_path = resume_checkpoint(cfg, "ppo", stage_dir)  # checked before any model loads
    L.seed_everything(cfg.seed, workers=True)

    tokenizer, datamodule = load_prompts(cfg, ppo_cfg)  # before any model loads

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
    if cadence.eval_every:
        datamodule.check_eval_shards(trainer.world_size)

    # In a process group (the pipeline's PPO stage) a reward source that fails to load on one
    # rank stops every rank.
    with stop_together():
        reward = build_reward(instantiate(cfg.reward))
        gold = build_reward(instantiate(cfg.gold_reward)) if cfg.get("gold_reward") else None
    options = policy_options_from(cfg.policy)
    policy, ref_lm = build_policy(cfg, ppo_cfg, options)
    module = PPOModule(
        policy,
        ref_lm,
        tokenizer,
        reward,
        ppo_cfg,
        gold,
        seed=cfg.seed,
        policy_source=cfg.policy.name_or_path,
        policy_lora=asdict(options.lora) if options.lora else None,
    )
    baseline, baseline_samples = {}, []
    if cadence.eval_every and cadence.eval_before and ckpt_path is None:
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
    heldout = gather_shards(module.val_scores)  # every rank: a collective
    if trainer.is_global_zero and heldout:
        write_heldout_scores(heldout, run_dir(cfg) / HELDOUT_FILE)
    full_state = gather_full_state_dict(module.policy) if is_sharded(module.policy) else None
    if trainer.is_global_zero:
        path = export_policy(module, tokenizer, run_dir(cfg) / "policy", full_state)
        result["path"] = str(path)
        log.info("exported policy to %s", result["path"])
    return result
