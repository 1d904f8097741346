"""Freezing and scheduled unfreezing of the backbone, with Lightning's BaseFinetuning mechanics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning, WeightAveraging
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from src.models.layer_groups import layer_groups
from src.utils.errors import ConfigError

log = logging.getLogger(__name__)

BN_POLICIES = ("frozen", "train")


class BackboneFinetuning(BaseFinetuning):
    """Freeze the whole backbone before training, then unfreeze its last layer groups on a schedule.

    ``schedule``: entries ``{epoch: E, groups: N | "all"}``: from epoch E (0-based) on, the last N layer
    groups (src.models.layer_groups) train. Empty: feature extraction, nothing ever unfreezes.
    Each unfrozen group joins the optimizer as its own param group, named ``backbone.<group>``, at
    ``backbone_lr_factor`` × the head's initial LR. ``bn``: ``frozen`` keeps BatchNorm layers of unfrozen
    groups in eval mode with fixed affine parameters; ``train`` lets them normalise with batch statistics
    and learn. A frozen group's BatchNorm is frozen in every case.

    On resume, BaseFinetuning restores the param groups by parameter name and Lightning then loads their
    optimizer state; ``finetune_function`` re-applies every schedule entry up to the current epoch.
    """

    def __init__(
        self, schedule: Sequence[dict[str, Any]] = (), backbone_lr_factor: float = 0.1, bn: str = "frozen"
    ) -> None:
        super().__init__()
        if bn not in BN_POLICIES:
            raise ConfigError(f"model.finetune.bn must be one of {BN_POLICIES}, got {bn!r}.")
        if backbone_lr_factor <= 0:
            raise ConfigError(f"model.finetune.backbone_lr_factor must be positive, got {backbone_lr_factor}.")
        self.schedule = sorted(
            ({"epoch": int(e["epoch"]), "groups": e["groups"]} for e in schedule), key=lambda e: e["epoch"]
        )
        for entry in self.schedule:
            g = entry["groups"]
            if not (g == "all" or (isinstance(g, int) and g >= 1)):
                raise ConfigError(f"model.finetune.schedule: groups must be a positive integer or 'all', got {g!r}.")
        self.backbone_lr_factor = float(backbone_lr_factor)
        self.bn = bn

    @property
    def keeps_backbone_frozen(self) -> bool:
        """True when nothing ever unfreezes: the one answer the feature cache and slim checkpoints rely on."""
        return not self.schedule

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        averaging = any(isinstance(c, WeightAveraging) for c in trainer.callbacks)
        if stage == "fit" and averaging and self.keeps_backbone_frozen and pl_module.hparams.get("slim_checkpoint"):
            raise ConfigError(
                "Weight averaging (callbacks=ema) keeps the model's full weights in every checkpoint, which slim "
                "checkpoints of a frozen backbone leave out: set model.slim_checkpoint=false, or use it for "
                "fine-tuning (model.finetune.schedule)."
            )
        super().setup(trainer, pl_module, stage)  # freeze_before_training
        self.apply_bn_policy(pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # finetune_function: this epoch's unfreezing
        # Lightning does not call train() at fit start and restores each module's mode after validation:
        # a freshly built (all-train) module is corrected here, every epoch
        self.apply_bn_policy(pl_module)

    @staticmethod
    def apply_bn_policy(pl_module: LightningModule) -> None:
        """Eval mode for a fully frozen backbone, and for every BatchNorm whose parameters are frozen, so their
        running statistics never move; trainable parts follow the module's mode."""
        backbone = pl_module.backbone
        if not any(p.requires_grad for p in backbone.parameters()):
            backbone.eval()
            return
        backbone.train(pl_module.training)
        for module in backbone.modules():
            if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A backbone frozen for the whole run is rebuilt from its weights file: the module may leave it out."""
        if self.keeps_backbone_frozen:
            pl_module.drop_frozen_backbone(checkpoint)

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)
        if self.schedule:  # fail before training, not at the unfreeze epoch
            groups = layer_groups(pl_module.hparams.backbone["name"], pl_module.backbone)
            for entry in self.schedule:
                if entry["groups"] != "all" and entry["groups"] > len(groups):
                    raise ConfigError(
                        f"model.finetune.schedule asks for {entry['groups']} groups; "
                        f"{pl_module.hparams.backbone['name']} has {len(groups)}: {[n for n, _ in groups]}."
                    )

    def groups_training_at(self, epoch: int, total: int) -> int:
        """How many of the last groups train at ``epoch``."""
        count = 0
        for entry in self.schedule:
            if entry["epoch"] <= epoch:
                count = total if entry["groups"] == "all" else max(count, int(entry["groups"]))
        return count

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if not self.schedule:
            return
        groups = layer_groups(pl_module.hparams.backbone["name"], pl_module.backbone)
        count = self.groups_training_at(epoch, len(groups))
        self.unfreeze(pl_module, groups[len(groups) - count :], optimizer, epoch)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A resumed run gets its param groups back by name (BaseFinetuning); the groups in them train again
        here: a run resumed mid-epoch gets no ``on_train_epoch_start`` to unfreeze them."""
        super().on_fit_start(trainer, pl_module)
        if not self.schedule or not trainer.optimizers:
            return
        names = {group.get("name") for group in trainer.optimizers[0].param_groups}
        groups = layer_groups(pl_module.hparams.backbone["name"], pl_module.backbone)
        self.unfreeze(pl_module, [(n, m) for n, m in groups if f"backbone.{n}" in names], trainer.optimizers[0])

    def unfreeze(
        self, pl_module: LightningModule, groups: list[tuple[str, Any]], optimizer: Optimizer, epoch: int | None = None
    ) -> None:
        """Make ``groups`` trainable under the BatchNorm policy; a group not yet in the optimizer joins it (when
        ``epoch`` says this is a scheduled unfreeze) at backbone_lr_factor x the head's initial LR."""
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        head_lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        for name, modules in groups:
            self.make_trainable(modules)
            if self.bn == "frozen":
                for bn in (m for mod in modules for m in mod.modules() if isinstance(m, _BatchNorm)):
                    for p in bn.parameters():
                        p.requires_grad = False
            params = [p for mod in modules for p in mod.parameters() if p.requires_grad and id(p) not in in_optimizer]
            if params and epoch is not None:  # a fresh unfreeze (on resume the group is already back in the optimizer)
                lr = head_lr * self.backbone_lr_factor
                optimizer.add_param_group({"params": params, "lr": lr, "initial_lr": lr, "name": f"backbone.{name}"})
                log.info("Epoch %d: unfroze backbone group %s (%d tensors) at lr %.3g", epoch, name, len(params), lr)
        self.apply_bn_policy(pl_module)
