"""A callback that sends this process a real signal at a chosen training batch (deterministic preemption)."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class SignalAt(Callback):
    """``os.kill(self, signum)`` after batch ``batch`` (0-based) of epoch ``epoch`` (0-based), once, from
    global rank zero only (as a scheduler signals the launching process; Lightning forwards it)."""

    def __init__(self, epoch: int, batch: int, signum: int = int(signal.SIGTERM)) -> None:
        self.epoch, self.batch, self.signum, self.sent = epoch, batch, signum, False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero and not self.sent and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            self.sent = True
            os.kill(os.getpid(), self.signum)


class StopAfter(Callback):
    """End the fit after epoch ``epoch`` (1-based) as if the run had been killed right after its checkpoint:
    ModelCheckpoint (run last by Lightning) still writes that epoch's last.ckpt."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epoch:
            trainer.should_stop = True
