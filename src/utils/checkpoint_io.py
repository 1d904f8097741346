"""Atomic checkpoint writes: a temp file in the same folder, fsync, rename; a kill leaves the old file whole."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.utils.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, with saves that can't be torn."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f), mode="wb")
