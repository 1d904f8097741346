"""Preemption: on SIGTERM, write last.ckpt where the run stands, so ``ckpt_path=last`` continues from there.

Lightning's signal handler only raises a flag on SIGTERM; the training loop then stops at the next batch
end with SIGTERMException, calls ``on_exception`` on every callback and finalizes the loggers (TensorBoard
flushed). This callback writes the checkpoint in that hook. The train loader's state inside it
(src.data.resumable) lets the resumed run skip the batches this epoch already trained on, and the
half-accumulated torchmetrics states saved with it keep that epoch's train/loss and train/acc whole.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics import Metric

from src.callbacks.epoch_summary import latest_checkpoint, model_checkpoint
from src.utils.lightning_compat import (
    batches_done_this_epoch,
    dump_checkpoint,
    last_saved_step,
    restore_metric_updates,
    set_sigterm_flag,
)

log = logging.getLogger(__name__)


class SaveOnSigterm(Callback):
    """On SIGTERM, write ``<dirpath>/last.ckpt`` (atomically, through the trainer's CheckpointIO) unless
    ModelCheckpoint's last.ckpt is already current.

    Not Lightning's OnExceptionCheckpoint, although it does the same job for one exception: the trainer treats a
    run holding one as resumable from its file whenever ``ckpt_path`` is None, so a fresh run in an old run
    folder would silently continue from it, past the project's resume checks (other classes, other data).
    """

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        self.ckpt_path = str(Path(dirpath) / f"{filename}.ckpt")
        self._saving = False
        self._deferred = False

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        # Lightning would stop here, mid-validation, and a resumed run would lose that epoch's metrics:
        # hold the signal until validation ends (validation is short), then stop at the epoch's end,
        # right after ModelCheckpoint has written last.ckpt
        if trainer.training is False and trainer.state.fn == "fit" and trainer.received_sigterm:
            set_sigterm_flag(trainer, False)
            self._deferred = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._deferred:
            self._deferred = False
            set_sigterm_flag(trainer, True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        if trainer.global_step == 0:
            log.warning("SIGTERM before the first training step: nothing to save; a rerun starts from scratch.")
            return
        every_epoch = latest_checkpoint(trainer) or model_checkpoint(trainer)
        if every_epoch is not None and last_saved_step(every_epoch) == trainer.global_step:
            # the signal came after this epoch's checkpoint: that last.ckpt is already the place to resume from
            log.warning("SIGTERM: %s is current. Resume in this run folder with ckpt_path=last.", self.ckpt_path)
            return
        if trainer.world_size > 1:
            self._save_from_rank_zero(trainer, Path(self.ckpt_path))
            if not trainer.is_global_zero:
                return
        else:
            self._saving = True
            try:
                trainer.save_checkpoint(self.ckpt_path)
            finally:
                self._saving = False
        log.warning(
            "SIGTERM: saved %s (epoch %d, %d batches into it). Resume in this run folder with ckpt_path=last.",
            self.ckpt_path,
            trainer.current_epoch + 1,
            batches_done_this_epoch(trainer),
        )

    @staticmethod
    def _save_from_rank_zero(trainer: Trainer, path: Path) -> None:
        """DDP: the ranks may stop a step apart, so nothing here may wait on the others (Trainer.save_checkpoint
        has a barrier). Rank zero writes what it holds (DDP keeps the weights equal on every rank), then ends
        the processes it launched, which have nothing to save and could wait forever on a collective."""
        if not trainer.is_global_zero:
            return
        trainer.strategy.checkpoint_io.save_checkpoint(dump_checkpoint(trainer), path)
        launcher = trainer.strategy.launcher
        if launcher is not None and getattr(launcher, "procs", None):
            launcher.kill(signal.SIGKILL)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # mid-epoch, one process: the epoch's running metrics go with it (with DDP each rank holds only its
        # own share of them, so a resumed epoch's train metrics cover the batches after the resume)
        if self._saving:
            checkpoint["metric_states"] = metric_states(pl_module)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        load_metric_states(pl_module, checkpoint.get("metric_states", {}))


def metric_states(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """{submodule name: {"update_count", "state"}} of every torchmetrics Metric that has seen updates."""
    states = {}
    for name, metric in module.named_modules():
        if isinstance(metric, Metric) and metric.update_called:
            state = {k: v.detach().cpu().clone() for k, v in metric.metric_state.items() if torch.is_tensor(v)}
            states[name] = {"update_count": int(metric.update_count), "state": state}
    return states


def load_metric_states(module: torch.nn.Module, states: dict[str, dict[str, Any]]) -> None:
    """Put back what ``metric_states`` saved, so the resumed epoch's metrics cover the whole epoch."""
    for name, saved in states.items():
        metric = module.get_submodule(name)
        for key, value in saved["state"].items():
            setattr(metric, key, value.to(metric.device))
        restore_metric_updates(metric, saved["update_count"])
