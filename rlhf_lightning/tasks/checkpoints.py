"""What resuming a run needs: a record in each checkpoint of the task and the settings that wrote
it, the check of a checkpoint before any model loads, the removal of stale temporary files, and
`ResumeCheckpoint`, which saves ``last.ckpt`` at safe points of the training loop and on
SIGTERM / SIGINT.
"""

from __future__ import annotations

import logging
import pickle
import shlex
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Checkpoint
from omegaconf import DictConfig, OmegaConf

from rlhf_lightning.errors import CheckpointError, TrainingStopped
from rlhf_lightning.tasks.common import checkpoint_dir, resolve_ckpt_path, run_dir

log = logging.getLogger(__name__)

RECORD_KEY = "rlhf_lightning_run"
KINDS = {
    "ppo": "a PPO checkpoint (task=ppo, or checkpoints/ppo/ of a pipeline run)",
    "reward_model": "a reward-model checkpoint (task=reward_model, or checkpoints/reward_model/ "
    "of a pipeline run)",
}
# The settings that change what a checkpoint means, as the user writes them: resuming with other
# values is refused unless ckpt_force=true. (Training longer, budget.num_iterations or
# rm.max_epochs, is allowed.) A section (``data.prompts``) stands for each of its values but
# those named in ``RESUME_FREE`` (how data is read, not which; the batch size is the budget's);
# every key must be in the config.
RESUME_SETTINGS = {
    "ppo": (
        "policy.name_or_path",
        "policy.lora",
        "algorithm.name",
        "algorithm.value_model._target_",
        "algorithm.samples_per_prompt",
        "budget.rollout_batch_size",
        "budget.minibatch_size",
        "data.prompts",
        "seed",
    ),
    "reward_model": (
        "reward_backbone.name_or_path",
        "data.preferences",
        "data.preferences.batch_size",
        "rm.accumulate_grad_batches",
        "seed",
    ),
}
RESUME_FREE = frozenset({"eval_batch_size", "num_workers", "batch_size", "seed"})
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
_ABSENT = object()


def run_settings(cfg: DictConfig, kind: str) -> dict[str, Any]:
    """``{key: value}`` of the ``RESUME_SETTINGS`` of ``kind`` in ``cfg`` (plain values); a
    section's values under their own keys (``data.prompts.generator``), one level deep.
    Raises `KeyError` for a setting the config lacks (a renamed key must not drop out)."""
    settings = {}
    for key in RESUME_SETTINGS[kind]:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            raise KeyError(f"RESUME_SETTINGS[{kind!r}] names {key}, which the config lacks")
        if isinstance(value, DictConfig):
            for name, item in value.items():
                if name not in RESUME_FREE:
                    settings[f"{key}.{name}"] = _plain(item)
        else:
            settings[key] = _plain(value)
    return settings


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def settings_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: <saved> in the checkpoint, <now> now`` for each setting of ``now`` that ``saved``
    records with another value."""
    return [
        f"{key}: {saved[key]} in the checkpoint, {value} now"
        for key, value in now.items()
        if key in saved and saved[key] != value
    ]


def read_record(path: Path) -> dict:
    """The run record (``{"kind", "settings"}``) of the checkpoint at ``path``, read with
    ``torch.load(weights_only=True, mmap=True)`` (its tensors stay on disk). Raises
    `CheckpointError` naming the file when it is not a readable checkpoint of ``rlhf-train``.

    A sharded checkpoint (``trainer=fsdp2``: a directory of shards) is read from its ``meta.pt``,
    which holds everything but the weights and optimizer states."""
    sharded = path.is_dir()
    if sharded:
        path = path / "meta.pt"
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:
        raise CheckpointError(f"checkpoint {path}: the file is empty")
    if head != ZIP_MAGIC:
        raise CheckpointError(
            f"checkpoint {path}: not a PyTorch checkpoint (not the zip archive torch.save writes)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path}: holds pickled Python objects, which are not loaded "
            "(checkpoints load with weights_only=True)"
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for damaged archives
        reason = str(error).split(". ")[0].strip()
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt ({reason})") from None
    required = {"loops"} if sharded else {"state_dict", "loops"}
    if not isinstance(checkpoint, dict) or not required <= set(checkpoint):
        raise CheckpointError(
            f"checkpoint {path}: not a Lightning training checkpoint (no state_dict and loops)"
        )
    record = checkpoint.get(RECORD_KEY)
    if not isinstance(record, dict) or record.get("kind") not in KINDS:
        raise CheckpointError(
            f"checkpoint {path}: not written by rlhf-train (no {RECORD_KEY} record): another "
            "program's or model's checkpoint, or one from a version before the record"
        )
    return record


def check_checkpoint(path: Path, kind: str, settings: dict[str, Any], force: bool) -> None:
    """Raise `CheckpointError` unless the checkpoint at ``path`` resumes a ``kind`` run with
    ``settings``; with ``force``, changed settings are only logged."""
    record = read_record(path)
    if record["kind"] != kind:
        raise CheckpointError(
            f"checkpoint {path} is {KINDS[record['kind']]}; this run resumes only from "
            f"{KINDS[kind]}"
        )
    refuse_changed_settings(f"checkpoint {path}", record.get("settings") or {}, settings, force)


def refuse_changed_settings(what: str, saved: dict, now: dict, force: bool) -> None:
    """Raise `CheckpointError` if ``what`` (a checkpoint, a finished stage) was written with
    other ``RESUME_SETTINGS`` than ``now``; with ``force``, log them instead."""
    changed = settings_diff(saved, now)
    if changed and not force:
        raise CheckpointError(
            f"{what} was written with settings that change what it means: {'; '.join(changed)}. "
            "Resume with its values, or pass ckpt_force=true to resume with the new ones"
        )
    if changed:
        log.warning("ckpt_force=true: resuming %s with changed settings: %s", what, changed)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the ``.<name>.ckpt.<random>.tmp`` files a crash during a checkpoint write left in
    ``directory`` (`AtomicCheckpointIO` writes through them); returns what was removed. Only
    global rank 0 removes (it is the one that writes checkpoints)."""
    if rank_zero_only.rank != 0 or not directory.is_dir():
        return []
    stale = sorted(p for p in directory.glob(".*.ckpt.*.tmp") if p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by a crash while a checkpoint was written", path)
    return stale


def resume_checkpoint(cfg: DictConfig, kind: str, stage: str | None = None) -> str | None:
    """The checkpoint a ``kind`` run resumes from, checked before any model loads (None: a fresh
    start), after removing stale temporary files from its checkpoint directory.

    ``ckpt_path`` resolves as in `resolve_ckpt_path`; in a pipeline ``stage``, ``last`` without a
    checkpoint yet starts the stage from the beginning. ``ckpt_force=true`` resumes despite
    changed ``RESUME_SETTINGS``.
    """
    remove_stale_temporaries(checkpoint_dir(cfg, stage))
    path = resolve_ckpt_path(cfg, stage, missing_ok=stage is not None)
    if path is not None:
        force = bool(cfg.get("ckpt_force", False))
        check_checkpoint(Path(path), kind, run_settings(cfg, kind), force)
    return path


def resume_command(cfg: DictConfig) -> str:
    """The command line that resumes this run: its overrides, the run dir and ``ckpt_path=last``."""
    overrides = []
    if HydraConfig.initialized():
        skip = ("ckpt_path=", "hydra.run.dir=", "+ckpt_path=")
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(skip)]
    words = ["rlhf-train", *overrides, f"hydra.run.dir={run_dir(cfg)}", "ckpt_path=last"]
    return " ".join(shlex.quote(word) for word in words)


def _validation_follows(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether a validation may run right after training batch ``batch_idx`` (over-estimated:
    after the last batch of every epoch whenever validation is on)."""
    if not trainer.enable_validation:
        return False
    done, every = batch_idx + 1, trainer.val_check_batch
    return done >= trainer.num_training_batches or (isinstance(every, int) and done % every == 0)


class ResumeCheckpoint(Checkpoint):
    """Everything a resume needs from the training loop.

    - every checkpoint the trainer saves records ``kind`` and ``settings`` (`check_checkpoint`
      reads them back before a resume);
    - a resumed fit hands the train loader its saved position (``ResumableDataLoader``);
    - ``<dirpath>/last.ckpt`` is saved at the first safe point at or after every
      ``every_n_steps``-th optimizer step, and at the end of every epoch with ``every_epoch``;
    - on SIGTERM or SIGINT it is saved at the next safe point and training stops with
      `TrainingStopped`, whose message is ``resume`` (the command that resumes); a second SIGINT
      stops at once (KeyboardInterrupt, no checkpoint).

    A safe point is the end of a training batch that ended with an optimizer step (under manual
    optimization every batch: one PPO iteration), the end of a validation during fit, and the end
    of an epoch. A batch that a validation may follow is not one: a checkpoint saved between them
    would resume after that validation (Lightning skips it on restart), so it is saved at the end
    of the validation instead, after the other checkpoint callbacks (listed before this one) have
    used its metrics.
    """

    def __init__(
        self,
        dirpath: str | Path,
        kind: str,
        settings: dict[str, Any],
        resume: str,
        every_n_steps: int | None = None,
        every_epoch: bool = False,
    ) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.record = {"kind": kind, "settings": settings}
        self.resume = resume
        self.every_n_steps = every_n_steps
        self.every_epoch = every_epoch
        self.signal: int | None = None
        self._handlers: dict[int, Any] = {}
        self._saved_step = 0
        self._step_before = 0
        self._after_step = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RECORD_KEY] = self.record

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning 2.6 gives a resumable train loader its saved position only if it sets the
        # loader up after restoring the loops; a module whose configure_optimizers reads
        # trainer.estimated_stepping_batches (the reward model's) sets it up before. Load the
        # position now, before the first batch is drawn (a no-op when Lightning loaded it).
        trainer.fit_loop._load_combined_loader_states()
        self._saved_step = trainer.global_step  # where this fit started: already on disk
        self._handle_signals()

    # ------------------------------------------------------------------------------ signals
    def _handle_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:
            log.warning(
                "%s: saving a checkpoint at the next safe point, then stopping (Ctrl-C again "
                "stops at once, without it)",
                signal.Signals(signum).name,
            )
        self.signal = self.signal or signum

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()

    # -------------------------------------------------------------------------- safe points
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._after_step = (
            not pl_module.automatic_optimization or trainer.global_step != self._step_before
        )
        if self._after_step and not _validation_follows(trainer, batch_idx):
            self._safe_point(trainer, self._steps_due(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._after_step:
            self._safe_point(trainer, self._steps_due(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._safe_point(trainer, self.every_epoch or self._steps_due(trainer))

    def _steps_due(self, trainer) -> bool:
        every = self.every_n_steps
        return every is not None and trainer.global_step // every > self._saved_step // every

    def _safe_point(self, trainer, periodic: bool) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.signal is not None, all=False)
        if periodic or stop:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = trainer.global_step
        if stop:
            self._restore_handlers()
            name = signal.Signals(self.signal or signal.SIGTERM).name
            raise TrainingStopped(
                f"stopped by {name}: saved {self.path} after {trainer.global_step} optimizer "
                f"steps (epoch {trainer.current_epoch}); resume with: {self.resume}"
            )
