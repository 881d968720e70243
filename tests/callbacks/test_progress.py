"""The training status line (rlhf_lightning/callbacks/progress.py) on a real Trainer."""

from __future__ import annotations

import io
import re
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from rlhf_lightning.callbacks import ProgressLine
from rlhf_lightning.callbacks.progress import eta_s, format_duration, status_line
from rlhf_lightning.tasks.common import build_trainer
from tests.conftest import compose_config

PHASES = ("sampling", "scoring", "experience", "update")


class PhasedModule(L.LightningModule):
    """One batch per epoch (a PPO iteration) that goes through the PPO phases, logs the two
    metrics the line shows, plus the progress-bar metrics Lightning's bar would show."""

    def __init__(self, phase_s: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.phase: str | None = None
        self.phase_s = phase_s

    def training_step(self, batch, batch_idx):
        for phase in PHASES:
            self.phase = phase
            time.sleep(self.phase_s)
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("objective/score", 1.5 + self.current_epoch)
        self.log("kl/sequence", 0.25)
        self.log("objective/score_pb", 1.0, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch, batch_idx):
        self.phase = "eval"
        self.log("val/reward", 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=4)


def _fit(progress: ProgressLine, module: L.LightningModule, epochs: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[progress],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, _loader(), _loader())
    return trainer


def test_format_duration_and_status_line():
    assert format_duration(5) == "0:05"
    assert format_duration(75) == "1:15"
    assert format_duration(3725) == "1:02:05"
    line = status_line("iteration 3/20", "update", 250.0, {"objective/score": 0.41234, "kl": 2})
    assert line == "iteration 3/20 | update | ETA 4:10 | objective/score 0.4123 | kl 2"
    assert status_line("epoch 1/2 batch 3/6", None, None, {}) == "epoch 1/2 batch 3/6"


def test_eta_is_the_mean_batch_time_times_the_batches_left():
    assert eta_s(elapsed_s=10.0, done=2, total=5) == pytest.approx(15.0)
    assert eta_s(elapsed_s=10.0, done=5, total=5) == 0.0
    assert eta_s(elapsed_s=0.0, done=0, total=5) is None  # nothing measured yet
    assert eta_s(elapsed_s=10.0, done=2, total=float("inf")) is None


def test_not_a_tty_one_plain_line_per_iteration():
    out = io.StringIO()
    trainer = _fit(ProgressLine(stream=out, tty=False), PhasedModule(), epochs=3)
    assert trainer.progress_bar_callback.__class__ is ProgressLine  # Lightning's bar is not used
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    for i, line in enumerate(lines, start=1):
        metrics = f"objective/score {0.5 + i} | kl/sequence 0.25 | val/reward 0.5"
        assert re.fullmatch(rf"iteration {i}/3 \| ETA \d+:\d\d \| {re.escape(metrics)}", line)
    assert "| ETA 0:00 |" in lines[-1]  # nothing left after the last iteration


def test_tty_one_line_rewritten_in_place_with_the_phase():
    out = io.StringIO()
    progress = ProgressLine(stream=out, tty=True, refresh_s=0.01)
    _fit(progress, PhasedModule(phase_s=0.1), epochs=2)
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1  # one line, ended once at the end
    frames = [frame.removesuffix("\x1b[K") for frame in text.rstrip("\n").split("\r")[1:]]
    for phase in PHASES:
        assert any(f"iteration 1/2 | {phase} |" in f for f in frames), (phase, frames)
    assert any(f.startswith("iteration 2/2 | ") for f in frames)
    assert progress._thread is None  # the redraw thread stopped with the fit


def test_other_modules_show_epoch_and_batch():
    class Plain(PhasedModule):
        def __init__(self) -> None:
            super().__init__()
            del self.phase  # no phase: not PPO

        def training_step(self, batch, batch_idx):
            self.log("train/loss", 0.75)
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/accuracy", 0.5)

    out = io.StringIO()
    _fit(ProgressLine(stream=out, tty=False), Plain(), epochs=2)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epoch 1/2 batch 1/1 | ETA ")
    assert lines[1].endswith("| train/loss 0.75 | val/accuracy 0.5")


def test_validate_outside_fit_writes_one_eval_line():
    out = io.StringIO()
    trainer = L.Trainer(callbacks=[ProgressLine(stream=out, tty=False)], logger=False)
    trainer.validate(PhasedModule(), _loader(), verbose=False)
    assert out.getvalue().startswith("eval 0:0") and out.getvalue().endswith("| val/reward 0.5\n")


@pytest.mark.parametrize("enabled", [True, False])
def test_build_trainer_installs_the_line_when_the_progress_bar_is_enabled(tmp_path, enabled):
    cfg = compose_config(
        [
            f"paths.output_dir={tmp_path}",
            f"trainer.enable_progress_bar={str(enabled).lower()}",
            "~logger",
        ]
    )
    trainer = build_trainer(cfg, callbacks=[])
    if enabled:
        assert isinstance(trainer.progress_bar_callback, ProgressLine)
    else:
        assert trainer.progress_bar_callback is None
