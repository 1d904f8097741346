"""Save the random number generators' state in checkpoints and restore it when a run resumes.

Lightning does not save RNG state. With data order and augmentation already tied to (seed, epoch, index)
(src.data.seeding), what is left is the main process's global RNG — dropout masks in the head. Its state
at the end of an epoch is saved with the checkpoint and put back when the next epoch starts after a
resume (or before the first batch of a run resumed mid-epoch), so the resumed epochs draw the very
numbers the uninterrupted run drew.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class RNGState(Callback):
    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict  # applied at the first epoch start: set-up draws random numbers too

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._restore()  # a run resumed mid-epoch (SIGTERM checkpoint) gets no on_train_epoch_start

    def _restore(self) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
