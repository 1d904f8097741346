"""Freezing the backbone with Lightning's BaseFinetuning mechanics."""

from __future__ import annotations

from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim import Optimizer


class FreezeBackbone(BaseFinetuning):
    """Feature extraction: every backbone parameter frozen for the whole run, BatchNorm included.

    BaseFinetuning freezes before the optimizer is built, so the optimizer sees the head only; the
    module keeps frozen BatchNorm layers in eval mode (src.models.classifier.TransferClassifier.train).
    """

    keeps_backbone_frozen = True  # the feature cache relies on it

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Nothing ever unfreezes in feature extraction."""
