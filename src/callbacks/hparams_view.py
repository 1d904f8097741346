"""TensorBoard's HParams tab: each run's settings beside its best metrics, so sweep jobs compare on one screen."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from src.callbacks.epoch_summary import EpochSummary, best_epoch


class HParamsView(Callback):
    """At the end of training, log ``params`` with hp/best_val_loss and hp/best_val_acc (at the best-loss
    epoch) to every TensorBoard logger, while its event file is still open."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        history = next((c.history for c in trainer.callbacks if isinstance(c, EpochSummary)), [])
        best = best_epoch(history)
        if not best:
            return
        metrics = {"hp/best_val_loss": best["val/loss"], "hp/best_val_acc": best.get("val/acc", float("nan"))}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # rank zero only: Lightning's loggers write nothing elsewhere
                logger.log_hyperparams(self.params, metrics)
