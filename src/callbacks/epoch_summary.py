"""Per-epoch history: a one-line summary per epoch in the log, kept in checkpoints for resumed runs."""

from __future__ import annotations

import logging
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/macro_f1", "val/balanced_acc")


class EpochSummary(Callback):
    """Record every epoch's train/val loss and accuracy and print them as one line."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self._epoch_start = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = time.perf_counter()  # a run resumed mid-epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning runs validation before this hook, so the epoch's val metrics are in callback_metrics
        metrics = trainer.callback_metrics
        row: dict[str, float] = {"epoch": trainer.current_epoch + 1}
        row.update({name: float(metrics[name]) for name in METRICS if name in metrics})
        row["seconds"] = round(time.perf_counter() - self._epoch_start, 3)
        self.history.append(row)
        if trainer.is_global_zero:
            log.info(format_epoch(row, trainer.max_epochs))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]


def format_epoch(row: dict[str, float], max_epochs: int | None) -> str:
    """'epoch 3/10 | train loss 0.4121 acc 0.8245 | val loss 0.2310 acc 0.9346 | 4.1 s'."""
    parts = [f"epoch {int(row['epoch'])}/{max_epochs if max_epochs and max_epochs > 0 else '?'}"]
    for stage in ("train", "val"):
        if f"{stage}/loss" in row:
            parts.append(f"{stage} loss {row[f'{stage}/loss']:.4f} acc {row.get(f'{stage}/acc', float('nan')):.4f}")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)


def best_epoch(history: list[dict[str, float]], monitor: str = "val/loss", mode: str = "min") -> dict[str, float]:
    """The history row with the best ``monitor`` (lowest for mode min, highest for max); the first of ties;
    {} when no epoch has it."""
    scored = [h for h in history if monitor in h]
    if not scored:
        return {}
    return min(scored, key=lambda h: h[monitor]) if mode == "min" else max(scored, key=lambda h: h[monitor])


def monitored_best(trainer: Trainer, history: list[dict[str, float]]) -> tuple[str, dict[str, float]]:
    """(monitor, best row) by the checkpoint callback's monitor and mode: the epoch whose weights the best
    checkpoint keeps (val/loss, lowest, without one)."""
    ckpt = model_checkpoint(trainer)
    monitor = getattr(ckpt, "monitor", None) or "val/loss"
    return monitor, best_epoch(history, monitor, getattr(ckpt, "mode", "min"))


def model_checkpoint(trainer: Trainer) -> ModelCheckpoint | None:
    """The run's first ModelCheckpoint watching a metric: the best checkpoint's (``trainer.checkpoint_callback``
    is any first Checkpoint callback)."""
    found = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    return next((c for c in found if c.monitor is not None), found[0] if found else None)


def latest_checkpoint(trainer: Trainer) -> ModelCheckpoint | None:
    """The ModelCheckpoint that writes every epoch (no monitor: conf/callbacks/default.yaml's last_checkpoint)."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor is None), None)


def latest_checkpoint_path(trainer: Trainer) -> str | None:
    """The newest every-epoch checkpoint written (last.ckpt), else the best callback's own last.ckpt."""
    latest = latest_checkpoint(trainer)
    if latest is not None:
        return latest.best_model_path or None
    best = model_checkpoint(trainer)
    return getattr(best, "last_model_path", "") or None
