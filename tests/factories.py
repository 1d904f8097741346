"""The one place tests build a tiny model, datamodule and trainer: random-init resnet18, 32-px images, CPU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchvision import transforms as T

from src.data.datamodule import ImageFolderDataModule
from src.models.classifier import TransferClassifier

SMALL = [T.Resize(32), T.CenterCrop(32)]


def tiny_model(
    classes: Sequence[str] = ("ants", "bees"),
    hidden_dim: int = 16,
    dropout: float = 0.4,
    lr: float = 0.01,
    backbone: str = "resnet18",
    **kwargs: Any,
) -> TransferClassifier:
    """A random-init backbone and a small head; seeded, so every call builds the same weights."""
    torch.manual_seed(0)
    return TransferClassifier(
        list(classes),
        {"name": backbone, "weights": None},
        {"hidden_dim": hidden_dim, "dropout": dropout},
        {"name": "SGD", "lr": lr, "momentum": 0.9},
        **kwargs,
    )


def tiny_datamodule(
    root: Path, train: Sequence[Any] = SMALL, evaluation: Sequence[Any] | None = None, **kwargs: Any
) -> ImageFolderDataModule:
    """An ImageFolderDataModule over ``root`` with small transforms, decoding in the main process."""
    options = {"mean": [0.5] * 3, "std": [0.5] * 3, "num_workers": 0, **kwargs}
    return ImageFolderDataModule(root, list(train), list(train if evaluation is None else evaluation), **options)


def tiny_trainer(callbacks: Sequence[Any] = (), max_epochs: int = 2, **kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer: no logger, progress bar, model summary or sanity pass; no checkpoints unless asked."""
    options = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return L.Trainer(max_epochs=max_epochs, callbacks=list(callbacks), **options)
