"""``rlhf-train task=reward_model``: Bradley-Terry training, normalisation, HF-style export.

Reads top to bottom: validate config -> checkpoint to resume from (checked before any model
loads) -> data (validated before any model loads) -> callbacks -> trainer (its validation
interval checked against the data) -> model -> module -> fit -> best checkpoint ->
normalisation -> export.

Checkpoints: the best one by ``rm.monitor`` (``rm-epoch=E-step=S.ckpt``) and ``last.ckpt``, saved
every ``rm.checkpoint_every_n_steps`` optimizer steps and at the end of each epoch; a resume
continues mid-epoch with exactly the batches an uninterrupted run would see
(`rlhf_lightning.tasks.checkpoints.ResumeCheckpoint`, ``ResumableDataLoader``).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from rlhf_lightning.config import ConfigError, rm_config_from
from rlhf_lightning.hparams import log_final_hparams
from rlhf_lightning.models import ScalarRewardModel, load_tokenizer
from rlhf_lightning.models._util import honour_umask
from rlhf_lightning.models.loading import check_cache_writable
from rlhf_lightning.models.reward_model import score_pairs
from rlhf_lightning.modules.reward_model import RewardModelModule, fit_normalization
from rlhf_lightning.strategies import gather_full_state_dict, is_sharded
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
    lr_monitor,
    run_dir,
    task_metric,
)

log = logging.getLogger(__name__)

STAGE = "reward_model"


def export_dir(cfg: DictConfig) -> Path:
    return run_dir(cfg) / "reward_model"


def unsharded_reward_model(model: ScalarRewardModel, full_state: dict) -> ScalarRewardModel:
    """A plain copy of the (sharded) reward model ``model`` holding ``full_state``, its full
    state dict (``strategies.gather_full_state_dict``)."""
    dtype = next(v.dtype for k, v in full_state.items() if k.startswith("backbone."))
    backbone = type(model.backbone)(copy.deepcopy(model.backbone.config))
    plain = ScalarRewardModel(backbone.to(dtype), model.text_format)
    plain.load_state_dict(full_state, strict=True)
    return plain


def check_val_check_interval(
    interval: float | int, num_pairs: int, batch_size: int, world_size: int
) -> None:
    """``rm.val_check_interval`` as a number of batches (an int) fits in one epoch of one rank:
    each rank takes ``ceil(num_pairs / world_size)`` training pairs, in batches of
    ``batch_size``. A fraction of an epoch (a float) always does."""
    if not isinstance(interval, int):
        return
    batches = math.ceil(math.ceil(num_pairs / world_size) / batch_size)
    if interval > batches:
        raise ConfigError(
            f"invalid config: rm.val_check_interval: {interval} batches is more than one epoch "
            f"({batches} batches of {batch_size} pairs per rank); use at most {batches}, or a "
            "fraction of an epoch such as 0.5"
        )


def run(cfg: DictConfig) -> float | None:
    return train_reward_model(cfg)["metric"]


def train_reward_model(cfg: DictConfig, stage_dir: str | None = None) -> dict:
    """Train, normalise and export the reward model. Returns metrics and the export path.

    ``stage_dir``: checkpoint sub-directory (the pipeline keeps each stage's checkpoints apart).
    """
    rm_cfg = rm_config_from(cfg.rm)
    check_strategy_available(cfg)
    backbone = cfg.reward_backbone
    check_cache_writable([backbone.name_or_path])
    ckpt_path = resume_checkpoint(cfg, STAGE, stage_dir)
    L.seed_everything(cfg.seed, workers=True)

    load_kw = {
        "trust_remote_code": backbone.get("trust_remote_code", False),
        "revision": backbone.get("revision"),
    }
    tokenizer = load_tokenizer(backbone.name_or_path, padding_side="right", **load_kw)
    datamodule = instantiate(cfg.data.preferences, tokenizer=tokenizer)
    datamodule.setup("fit")  # reads and validates every row before the model loads

    directory = checkpoint_dir(cfg, stage_dir)
    # The best by rm.monitor, judged at the end of each validation (not at the epoch's end: a
    # last.ckpt saved after the validation must already hold that judgement).
    checkpoint = ModelCheckpoint(
        dirpath=directory,
        filename="rm-{epoch}-{step}",
        monitor=rm_cfg.monitor,
        mode="min" if rm_cfg.monitor.endswith("loss") else "max",
        save_top_k=1,
        save_on_train_epoch_end=False,
    )
    # last.ckpt; listed after `checkpoint`, so it runs after it at the end of a validation.
    resume = ResumeCheckpoint(
        directory,
        STAGE,
        run_settings(cfg, STAGE),
        resume_command(cfg),
        every_n_steps=rm_cfg.checkpoint_every_n_steps,
        every_epoch=True,
    )
    trainer = build_trainer(
        cfg,
        callbacks=[checkpoint, resume, *lr_monitor(cfg)],
        stage=STAGE,
        max_epochs=rm_cfg.max_epochs,
        val_check_interval=rm_cfg.val_check_interval,
        gradient_clip_val=rm_cfg.gradient_clip_val,
        accumulate_grad_batches=rm_cfg.accumulate_grad_batches,
    )
    check_val_check_interval(
        rm_cfg.val_check_interval,
        len(datamodule.train_items),
        datamodule.batch_size,
        trainer.world_size,
    )

    model = ScalarRewardModel.from_backbone(
        backbone.name_or_path,
        dtype=backbone.get("dtype", "float32"),
        text_format=datamodule.text_format,  # exported with the model: scoring reads the same
        **load_kw,
    )
    module = RewardModelModule(model, rm_cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metric = task_metric(trainer, cfg.task.metric) if cfg.task.metric.startswith("val/") else None

    result = {"metric": metric, "best_checkpoint": checkpoint.best_model_path, "path": None}
    sharded = is_sharded(module.model)
    if checkpoint.best_model_path:
        if sharded:  # a directory of shards: every rank loads its own
            trainer.strategy.load_checkpoint(checkpoint.best_model_path)
        else:
            best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
            module.load_state_dict(best["state_dict"])
        result["best_score"] = float(checkpoint.best_model_score)
        if rm_cfg.monitor == cfg.task.metric:
            result["metric"] = result["best_score"]
    if stage_dir is None:  # the pipeline logs its run's hparams once, after its PPO stage
        log_final_hparams(trainer, cfg, {cfg.task.metric: result["metric"]})
    full_state = gather_full_state_dict(module.model) if sharded else None
    if not trainer.is_global_zero:
        trainer.strategy.barrier()  # the next stage (pipeline: PPO) reads rank 0's export
        return result

    if full_state is not None:
        module.model = unsharded_reward_model(module.model, full_state)
    module.model.to("cpu")
    if rm_cfg.normalize:
        prompts, responses = zip(*datamodule.train_texts())
        raw = score_pairs(module.model, tokenizer, prompts, responses)
        gain, bias = fit_normalization(raw)
        module.model.set_normalization(gain, bias)
        result.update(
            norm_gain=gain, norm_bias=bias, raw_mean=float(raw.mean()), raw_std=float(raw.std())
        )
        log.info(
            "reward normalisation: gain %.4f bias %.4f (raw mean %.4f std %.4f)",
            gain,
            bias,
            raw.mean(),
            raw.std(),
        )
    out = module.model.save_pretrained(export_dir(cfg), tokenizer)
    honour_umask(out)
    result["path"] = str(out)
    log.info("exported reward model to %s", out)
    trainer.strategy.barrier()
    return result
