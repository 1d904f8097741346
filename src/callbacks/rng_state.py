"""Save the random number generators' state in checkpoints and restore it when a run resumes.

Lightning does not save RNG state. With data order and augmentation already tied to (seed, epoch, index)
(src.data.seeding), what is left is the main process's global RNG: dropout masks in the head, and the one
number each new loader iterator draws for its workers' base seed (the cached-feature loaders draw it
every epoch). A resumed run must draw the very numbers the uninterrupted run drew, so the state is put
back at the same point of the sequence:

- saved at an epoch's end: before the next epoch's train iterator exists. A resumed fit creates that
  iterator while it sets up its data, before any epoch hook, so the state goes back in ``on_fit_start``;
- saved mid-epoch (SIGTERM): the interrupted epoch's iterator had drawn its number already, and so has
  the resumed run's by its first batch, so the state goes back at that first batch.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class RNGState(Callback):
    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._epoch_ended = False  # between an epoch's end and the next epoch's start

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": [version, list(internal), gauss],
            "epoch_end": self._epoch_ended,
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict  # applied when the resumed run reaches the point it was saved at

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is not None and self._pending.get("epoch_end", False):
            self._restore()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_ended = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._restore()  # mid-epoch checkpoints: the resumed epoch's iterator has drawn its number by now

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_ended = True  # before ModelCheckpoint's save, which Lightning runs after other callbacks

    def _restore(self) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
