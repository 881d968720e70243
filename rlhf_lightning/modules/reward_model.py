"""RewardModelModule: Bradley-Terry reward-model training (automatic optimization).

Chosen and rejected responses go through the backbone in **one** forward pass (the collator
stacks them: rows ``0..B-1`` chosen, ``B..2B-1`` rejected); the loss is
``-log sigmoid(r_w - r_l - margin)`` (the reward-model slide of the seed talk; Ouyang et al. 2022).
After training, :func:`fit_normalization` finds the gain and bias that give the training
responses' rewards mean 0 and std 1 (N+ details: reward normalisation), stored with the export.
Validation also logs ``val/ece``, the expected calibration error of ``sigmoid(r_w - r_l)`` over
all held-out pairs (`rlhf_lightning.calibration`).
"""

from __future__ import annotations

import lightning as L
import torch

from rlhf_lightning.calibration import calibration_bins, expected_calibration_error
from rlhf_lightning.config import RMConfig
from rlhf_lightning.errors import NonFiniteError
from rlhf_lightning.losses import bradley_terry_loss
from rlhf_lightning.optim import adamw, trainer_precision
from rlhf_lightning.schedules import warmup_decay_lambda
from rlhf_lightning.stats import agreed_error
from rlhf_lightning.strategies import is_sharded, shard_reward_model


class RewardModelModule(L.LightningModule):
    """Trains a ``ScalarRewardModel`` on preference batches from ``PreferenceDataModule``."""

    def __init__(self, model, cfg: RMConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self._val_calibration: torch.Tensor | None = None  # (bins, 3) sums of this epoch

    def configure_model(self) -> None:
        """Under ``FSDP2Strategy`` (a device mesh is set): shard the reward model over the
        data-parallel ranks (``strategies.shard_reward_model``); a no-op once sharded."""
        if self._device_mesh is None or is_sharded(self.model):
            return
        shard_reward_model(self.model, self._device_mesh["data_parallel"], trainer_precision(self))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) -> (N,) raw rewards."""
        return self.model(input_ids, attention_mask)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        scores = self(batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = scores.float().chunk(2)
        loss, stats = bradley_terry_loss(chosen, rejected, batch.get("margin"))
        # Every rank takes this step (the same number of batches each): all stop together.
        finite = bool(torch.isfinite(loss))
        agreed = agreed_error(None if finite else f"non-finite {split} loss ({loss.item()})")
        if agreed is not None:
            raise NonFiniteError(f"{agreed} at step {self.global_step}")
        B = chosen.shape[0]
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=B, sync_dist=split != "train")
        self.log_dict(
            {
                f"{split}/accuracy": stats["accuracy"],
                f"{split}/chosen_reward": stats["chosen_mean"],
                f"{split}/rejected_reward": stats["rejected_mean"],
                f"{split}/margin": stats["margin_mean"],
            },
            prog_bar=False,
            batch_size=B,
            sync_dist=split != "train",
        )
        if split == "val":
            self._add_calibration(chosen.detach() - rejected.detach())
        every = self.cfg.histogram_every_n_steps
        if split == "train" and every and self.global_step % every == 0:
            self._histograms(chosen.detach(), rejected.detach())
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._val_calibration = None

    def _add_calibration(self, margins: torch.Tensor) -> None:
        """Add a validation batch's (B,) reward margins to the epoch's calibration-bin sums."""
        bins = calibration_bins(margins)
        self._val_calibration = (
            bins if self._val_calibration is None else self._val_calibration + bins
        )

    def on_validation_epoch_end(self) -> None:
        """Log ``val/ece`` of all held-out pairs (bin sums added over batches and ranks)."""
        if self._val_calibration is None:
            return
        bins = self.trainer.strategy.reduce(self._val_calibration, reduce_op="sum")
        self.log("val/ece", expected_calibration_error(bins), sync_dist=True)
        self._val_calibration = None

    def _histograms(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger.experiment, "add_histogram"):
            return
        step = self.global_step
        logger.experiment.add_histogram("train/chosen_reward_hist", chosen.cpu(), step)
        logger.experiment.add_histogram("train/rejected_reward_hist", rejected.cpu(), step)
        logger.experiment.add_histogram("train/margin_hist", (chosen - rejected).cpu(), step)

    def _fused_allowed(self) -> bool:
        """Lightning's mixed-precision plugins refuse to clip gradients of a fused optimizer."""
        return not (trainer_precision(self).endswith("-mixed") and self.cfg.gradient_clip_val)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        optimizer = adamw(
            [
                {"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            fused=self.cfg.fused_adam and self._fused_allowed(),
            lr=self.cfg.lr,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(int(self.cfg.warmup_ratio * total), total - 1)
        schedule = warmup_decay_lambda(total, warmup, "linear")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def fit_normalization(raw_scores: torch.Tensor) -> tuple[float, float]:
    """Gain and bias so that ``gain * raw + bias`` has mean 0 and std 1 on ``raw_scores`` (N,)."""
    if raw_scores.numel() < 2:
        raise ValueError("reward normalisation needs at least 2 scores")
    mean = raw_scores.double().mean()
    std = raw_scores.double().std()
    if not torch.isfinite(std) or std <= 0:
        raise ValueError(f"cannot normalise rewards with std {float(std)}")
    gain = float(1.0 / std)
    return gain, float(-mean * gain)
