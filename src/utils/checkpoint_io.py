"""Checkpoint files: atomic writes (a kill never leaves a torn file) and an integrity check before any use."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.utils.errors import UserError
from src.utils.io import atomic_write


class CorruptCheckpointError(UserError):
    """The file is not a whole checkpoint: truncated, damaged on disk, or not a checkpoint at all."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, with saves that can't be torn."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f), mode="wb")


def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise CorruptCheckpointError unless ``path`` is a whole torch zip archive with every CRC intact.

    torch.load reads members without checking their CRC-32, so a flipped block in a tensor would load as
    wrong weights; ``ZipFile.testzip`` reads every member and checks it.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CorruptCheckpointError(
            f"{path} is corrupt or truncated: it is not a whole checkpoint archive (or not one this project "
            "writes: torch's legacy non-zip format is not read)."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # any damage a reader trips over: bad headers, unknown compression, short reads
        raise CorruptCheckpointError(f"{path} is corrupt: {type(err).__name__}: {err}.") from None
    if bad is not None:
        raise CorruptCheckpointError(f"{path} is corrupt: its member {bad} fails its CRC check (damaged on disk?).")


def is_readable_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` passes the integrity check and loads with ``weights_only=True``."""
    try:
        verify_checkpoint_file(path)
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


def newest_readable_checkpoint(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> Path | None:
    """The most recently written whole checkpoint in ``folder`` (not ``exclude``), or None."""
    candidates = [p for p in Path(folder).glob("*.ckpt") if exclude is None or p != Path(exclude)]
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in candidates if is_readable_checkpoint(p)), None)
