"""One status line for training, in place of Lightning's progress bar.

PPO (a module with a ``phase`` attribute)::

    iteration 3/20 | update | ETA 4:10 | objective/score 0.412 | kl/sequence 1.21

other modules (the reward model)::

    epoch 1/2 batch 40/120 | ETA 1:02 | train/loss 0.613 | val/accuracy 0.74

On a terminal the line is rewritten in place (``\\r``) as the phase and the metrics change; in a
log file or CI (stdout not a terminal) one plain line is written per epoch (= PPO iteration) and
one after an evaluation run by ``trainer.validate``. The ETA is the mean time per training batch
so far (evaluations included) times the batches left. Only rank 0 writes.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from typing import TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)

# The metrics shown when the trainer has them (its callback_metrics), in this order.
SHOWN_METRICS = (
    "objective/score",
    "kl/sequence",
    "val/reward",
    "train/loss",
    "val/loss",
    "val/accuracy",
)


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_s(elapsed_s: float, done: int, total: float) -> float | None:
    """Seconds left at the mean time per batch so far; None before the first batch or when the
    total is unknown (``inf``)."""
    if done <= 0 or total == float("inf"):
        return None
    return elapsed_s / done * max(total - done, 0)


def status_line(
    position: str, phase: str | None, eta_s: float | None, metrics: dict[str, float]
) -> str:
    """``position | phase | ETA m:ss | name value | ...``; a None phase or ETA is left out."""
    parts = [position]
    if phase:
        parts.append(phase)
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    parts += [f"{name} {value:.4g}" for name, value in metrics.items()]
    return " | ".join(parts)


class ProgressLine(ProgressBar):
    """The status line described in the module doc.

    ``stream``: where to write (default: ``sys.stdout`` at the time of writing); ``tty``: rewrite
    in place (default: whether ``stream`` is a terminal); ``refresh_s``: how often a terminal
    line is redrawn between Lightning hooks (the phase changes inside a training step).
    """

    def __init__(
        self, stream: TextIO | None = None, tty: bool | None = None, refresh_s: float = 0.5
    ) -> None:
        super().__init__()
        self._stream = stream
        self._tty = tty
        self.refresh_s = refresh_s
        self._enabled = True
        self._metrics: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._module: L.LightningModule | None = None
        self._fit_start: float | None = None
        self._eval_start: float | None = None
        self._batches_done = 0
        self._batches_total: float = 0
        self._batch_in_epoch = 0

    # Lightning's ProgressBar interface ---------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def tty(self) -> bool:
        return self._tty if self._tty is not None else self.stream.isatty()

    # what the line says --------------------------------------------------------------------------
    def position(self) -> str:
        trainer = self.trainer
        total = trainer.max_epochs
        epoch = min(trainer.current_epoch + 1, total) if total and total > 0 else None
        epochs = f"{epoch}/{total}" if epoch else str(trainer.current_epoch + 1)
        if hasattr(self._module, "phase"):
            return f"iteration {epochs}"
        return f"epoch {epochs} batch {self._batch_in_epoch}/{self.total_train_batches}"

    def phase(self) -> str | None:
        phase = getattr(self._module, "phase", None)
        if phase is None and self.trainer.validating:
            return "eval"
        return phase

    def eta_s(self) -> float | None:
        if self._fit_start is None:
            return None
        return eta_s(time.perf_counter() - self._fit_start, self._batches_done, self._batches_total)

    def line(self) -> str:
        """The status now; the phase only on a terminal (a plain line reports a whole epoch)."""
        if self._eval_start is not None:  # trainer.validate() outside fit: eval and its time
            elapsed = format_duration(time.perf_counter() - self._eval_start)
            return status_line(f"eval {elapsed}", None, None, self._metrics)
        phase = self.phase() if self.tty else None
        return status_line(self.position(), phase, self.eta_s(), self._metrics)

    def snapshot_metrics(self) -> None:
        """The shown metrics as floats (read here, on the training thread, not while drawing)."""
        values = self.trainer.callback_metrics
        self._metrics = {name: float(values[name]) for name in SHOWN_METRICS if name in values}

    # writing -------------------------------------------------------------------------------------
    def _draw(self, end: str = "") -> None:
        if not self._enabled or self._module is None:
            return
        with self._lock:
            text = self.line()
            if self.tty:
                width = shutil.get_terminal_size(fallback=(120, 20)).columns - 1
                self.stream.write(f"\r{text[:width]}\x1b[K{end}")
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self._draw()

    def _start(self, pl_module: L.LightningModule) -> None:
        self._module = pl_module
        if self._enabled and self.tty and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._refresh_loop, daemon=True)
            self._thread.start()

    def _finish(self) -> None:
        """Stop redrawing; end the terminal line."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._draw(end="\n")
        self._module = None

    # Lightning hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One log line in place of Lightning's model summary table."""
        if not trainer.is_global_zero:
            return
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        log.info(
            "%s: %s of %s parameters trainable",
            type(pl_module).__name__,
            f"{trainable:,}",
            f"{total:,}",
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._batches_done = 0
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        epochs_left = max_epochs - trainer.current_epoch if max_epochs else float("inf")
        self._batches_total = max(epochs_left, 0) * self.total_train_batches
        self._start(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_in_epoch = 0
        if self.tty:
            self._draw()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._batches_done += 1
        self._batch_in_epoch = batch_idx + 1
        self.snapshot_metrics()
        if self.tty:
            self._draw()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.snapshot_metrics()  # validation at the end of the epoch has run by now
        self._draw()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish()
        self._fit_start = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # trainer.validate(), not inside fit
            self._eval_start = time.perf_counter()
            self._start(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.snapshot_metrics()
        if self._eval_start is not None:  # trainer.validate(): one line with its results
            if not self.tty:
                self._draw()
            self._finish()
            self._eval_start = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._finish()
