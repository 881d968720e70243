"""Pieces every task shares: the Trainer from config, checkpoint paths, atomic checkpoint files."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from rlhf_lightning.callbacks import ProgressLine
from rlhf_lightning.config import ConfigError
from rlhf_lightning.hardware import resolve_precision
from rlhf_lightning.models._util import umask
from rlhf_lightning.strategies import ROLLOUT_GATHER
from rlhf_lightning.tracking import build_logger

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it (``.<name>.<random>.tmp``), then
    renames it into place with the permissions of a plain ``open()`` (the umask's).

    A crash while saving leaves the previous checkpoint intact instead of a truncated file; the
    temporary file it may leave is removed when the next run starts
    (`rlhf_lightning.tasks.checkpoints.remove_stale_temporaries`).
    Checkpoints load with ``torch.load(weights_only=True)``: they hold only tensors and plain
    containers (optimizer, scheduler and KL-controller states included), never pickled code.
    """

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, **kwargs) -> dict:
        kwargs["weights_only"] = True
        return super().load_checkpoint(path, map_location=map_location, **kwargs)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        write_atomically(Path(path), "wb", lambda f: torch.save(checkpoint, f))


def write_atomically(path: Path, mode: str, write) -> None:
    """``write(f)`` into a temporary file beside ``path`` (permissions of the umask), synced and
    renamed into place: ``path`` holds all of it, or (after a crash) its previous content. A
    crash can leave the temporary ``.<name>.<random>.tmp``; any other error removes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_dir(cfg: DictConfig) -> Path:
    """The Hydra run dir of this job (everything the run writes goes under it)."""
    return Path(cfg.paths.output_dir)


def checkpoint_dir(cfg: DictConfig, stage: str | None = None) -> Path:
    base = run_dir(cfg) / "checkpoints"
    return base / stage if stage else base


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint (``trainer=fsdp2``): a directory of one shard
    per rank plus ``meta.pt``, which rank 0 writes after every shard is complete."""
    return path.is_file() or (path / "meta.pt").is_file()


def resolve_ckpt_path(
    cfg: DictConfig, stage: str | None = None, missing_ok: bool = False
) -> str | None:
    """``ckpt_path``: None, ``"last"`` or a path.

    ``"last"`` is ``<run dir>/checkpoints[/stage]/last.ckpt``; if a crash hit between replacing
    that link and writing it again, the newest ``*.ckpt`` in the directory is used instead.
    Sharded checkpoints (directories) count as checkpoints (:func:`is_checkpoint`). With
    ``missing_ok`` (a pipeline stage that had not saved a checkpoint yet) ``"last"`` without any
    checkpoint is None: the stage starts from the beginning.
    """
    value = cfg.get("ckpt_path")
    if value is None:
        return None
    if value != "last":
        if not is_checkpoint(Path(value)):
            raise FileNotFoundError(f"ckpt_path: no checkpoint at {value}")
        return str(value)
    directory = checkpoint_dir(cfg, stage)
    last = directory / "last.ckpt"
    if is_checkpoint(last):
        return str(last)
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    candidates = [p for p in candidates if is_checkpoint(p)]
    if candidates:
        log.warning("%s is missing: resuming from the newest checkpoint %s", last, candidates[-1])
        return str(candidates[-1])
    if missing_ok:
        log.info("no checkpoint in %s yet: stage %s starts from the beginning", directory, stage)
        return None
    raise FileNotFoundError(
        f"ckpt_path: no checkpoint at {last} (ckpt_path=last looks in the run dir: pass the old "
        "run's dir with hydra.run.dir=...)"
    )


# Trainer arguments the tasks set themselves (here and in each task's call): set in
# ``cfg.trainer`` they would be overridden, so the preflight refuses them there.
TASK_TRAINER_ARGS = (
    "logger",
    "callbacks",
    "plugins",
    "default_root_dir",
    "max_epochs",
    "val_check_interval",
    "gradient_clip_val",
    "accumulate_grad_batches",
    "check_val_every_n_epoch",
    "limit_val_batches",
    "use_distributed_sampler",
    "reload_dataloaders_every_n_epochs",
)


def build_trainer(
    cfg: DictConfig, callbacks: list, stage: str | None = None, **overrides
) -> L.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` + the task's overrides, logging to ``cfg.logger``.

    ``stage`` (``reward_model``, ``ppo``) names the stage's own logger run, e.g.
    ``<run dir>/tb/ppo`` or, in a sweep, ``<sweep dir>/tb/algorithm.kl.reward.coef=0.1/ppo``
    (``rlhf_lightning.tracking.build_logger``).
    With ``trainer.enable_progress_bar`` the progress display is `ProgressLine` (one status
    line) instead of Lightning's bar.
    """
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["precision"] = trainer_precision_from(cfg)
    if isinstance(trainer_kwargs.get("strategy"), dict):  # a configured strategy (_target_)
        trainer_kwargs["strategy"] = instantiate(cfg.trainer.strategy)
    trainer_kwargs.update(overrides)
    logger = build_logger(cfg.logger, run_dir(cfg), stage) if cfg.get("logger") else False
    if trainer_kwargs.get("enable_progress_bar", True):
        callbacks = [*callbacks, ProgressLine()]
    return L.Trainer(
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir(cfg)),
        **trainer_kwargs,
    )


def strategy_name(cfg: DictConfig) -> str:
    """``trainer.strategy`` as a name: the string itself, or the ``_target_`` of a mapping."""
    strategy = cfg.trainer.get("strategy", "auto")
    return strategy if isinstance(strategy, str) else str(strategy.get("_target_"))


def trainer_precision_from(cfg: DictConfig) -> str:
    """``trainer.precision`` with ``auto`` resolved for the accelerator (``hardware.py``)."""
    return resolve_precision(
        str(cfg.trainer.get("precision", "auto")), cfg.trainer.get("accelerator")
    )


FSDP2 = "rlhf_lightning.strategies.FSDP2Strategy"
FSDP2_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def check_strategy_available(cfg: DictConfig) -> None:
    """The strategy runs here with this precision: say so before any model loads. Also
    resolves (and reports) ``trainer.precision``.

    Lightning's other sharded strategies (FSDP1, DeepSpeed, a bare ModelParallelStrategy) are
    refused: they have no tested path here (``trainer=fsdp2`` shards on GPUs and CPUs). FSDP2
    takes 32-true and the bf16 precisions (fp16 would need a sharded gradient scaler).
    """
    precision = trainer_precision_from(cfg)
    name = strategy_name(cfg)
    lowered = name.lower()
    if name != FSDP2 and (
        lowered.startswith("deepspeed")
        or "fsdp" in lowered
        or "model_parallel" in lowered
        or "modelparallel" in lowered
    ):
        raise ConfigError(
            f"invalid config: trainer.strategy: {name!r} is not supported; for sharded "
            "training use trainer=fsdp2 (GPUs) or trainer=fsdp2_cpu (2 CPU processes)"
        )
    if name == FSDP2:
        if precision not in FSDP2_PRECISIONS:
            raise ConfigError(
                f"invalid config: trainer.precision: {precision!r} is not supported with "
                f"trainer=fsdp2; use one of {', '.join(FSDP2_PRECISIONS)}"
            )
        gather = cfg.trainer.strategy.get("rollout_gather", "full")
        if gather not in ROLLOUT_GATHER:
            raise ConfigError(
                "invalid config: trainer.strategy.rollout_gather: must be one of "
                f"{', '.join(ROLLOUT_GATHER)}, got {gather!r}"
            )


def lr_monitor(cfg: DictConfig) -> list:
    """A per-step learning-rate monitor when a logger is configured (``~logger`` disables it)."""
    return [LearningRateMonitor(logging_interval="step")] if cfg.get("logger") else []


def task_metric(trainer: L.Trainer, name: str) -> float | None:
    """The metric ``name`` from the trainer's last logged values, as a float (None if absent)."""
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def load_policy_tokenizer(cfg: DictConfig, padding_side: str = "left"):
    from rlhf_lightning.models import load_tokenizer

    pol = cfg.policy
    return load_tokenizer(
        pol.name_or_path,
        gguf_file=pol.get("gguf_file"),
        padding_side=padding_side,
        trust_remote_code=pol.get("trust_remote_code", False),
        revision=pol.get("revision"),
    )


def load_policy_lm(cfg: DictConfig):
    from rlhf_lightning.models import load_causal_lm

    pol = cfg.policy
    return load_causal_lm(
        pol.name_or_path,
        gguf_file=pol.get("gguf_file"),
        dtype=pol.get("dtype", "float32"),
        trust_remote_code=pol.get("trust_remote_code", False),
        revision=pol.get("revision"),
    )
