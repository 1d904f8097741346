"""The LightningModule: a pretrained backbone, a new head, NLL loss and epoch metrics."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from src.models.backbones import build_backbone, check_backbone_name
from src.models.batch_mix import build_batch_mix
from src.models.head import build_head, check_head
from src.models.layer_groups import Stage, group_stages, stages_match
from src.models.schedules import build_schedule, check_schedule
from src.models.timm_backbones import HUB_TIMEOUT_S
from src.utils.errors import ConfigError, UserError
from src.utils.lightning_compat import attached_trainer

log = logging.getLogger(__name__)
OPTIMIZER_PRESETS = "sgd|adam|adamw|rmsprop"  # conf/model/optimizer/


class TransferClassifier(LightningModule):
    """Backbone features → head → log-probabilities.

    The model never decides what trains: a BaseFinetuning callback (src.callbacks.finetuning) freezes and
    unfreezes the backbone, sets its BatchNorm modes and says when a checkpoint may drop the frozen backbone
    (``drop_frozen_backbone``). A backbone with no trainable parameter runs under ``torch.inference_mode``.
    A batch of N×D features (from the feature cache) goes through the head only; a batch (outputs of the
    first S layer groups, labels, S) through the rest of the backbone and the head.

    All constructor arguments are plain values (str, float, list, dict), so checkpoints load with
    ``torch.load(weights_only=True)``. ``preprocessing`` (mean, std, eval transforms) makes a checkpoint
    usable on its own; ``data_fingerprint`` (src.data.datamodule.data_fingerprint) lets a resume refuse other
    data. ``slim_checkpoint``: while the backbone stays frozen and its weights come from a
    hashed file, checkpoints hold the head only plus the backbone's weights id and SHA-256.
    """

    def __init__(
        self,
        class_names: list[str],
        backbone: dict[str, Any],
        head: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        preprocessing: dict[str, Any] | None = None,
        slim_checkpoint: bool = False,
        data_root: str | None = None,
        data_fingerprint: str | None = None,
        loss: dict[str, Any] | None = None,
        mixup: dict[str, Any] | None = None,
        cutmix: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_model_config(backbone, head, optimizer, scheduler, loss)
        weights = check_class_weights((loss or {}).get("class_weights"), len(class_names))
        smoothing = float((loss or {}).get("label_smoothing") or 0.0)
        self.save_hyperparameters()
        built = build_backbone(backbone["name"], backbone.get("weights"), backbone.get("hub_timeout_s", HUB_TIMEOUT_S))
        self.channels_last = bool(backbone.get("channels_last", False))
        self.backbone = built.module.to(memory_format=torch.channels_last) if self.channels_last else built.module
        self.head = build_head(built.feature_dim, len(class_names), **head)
        # images mixed in pairs (MixUp/CutMix; training batches of images only) and their soft targets
        self.batch_mix = build_batch_mix(
            (mixup or {}).get("alpha", 0.0), (cutmix or {}).get("alpha", 0.0), len(class_names)
        )
        # the seed's NLLLoss. Label smoothing or soft targets: cross-entropy on the head's log-probabilities,
        # which is the smoothed NLL (log_softmax leaves log-probabilities as they are); the same as NLLLoss at 0.
        # With class weights each sample counts by its class's weight (a weighted mean). The weights come from
        # the config, not the checkpoint (a non-persistent buffer): a resume may change them
        soft = smoothing > 0 or self.batch_mix is not None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing) if soft else nn.NLLLoss()
        if weights is not None:
            self.criterion.register_buffer("weight", torch.tensor(weights), persistent=False)
        self.weights_sha256 = built.weights_sha256
        n = len(class_names)
        # sample-weighted epoch means (torchmetrics accumulates detached numbers, never graphs)
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        # val adds imbalance-aware scores: macro-F1, and balanced accuracy (the mean of per-class recalls).
        # compute_groups off: each metric keeps its own state (a SIGTERM checkpoint saves them one by one)
        self.train_scores = MetricCollection(
            {"acc": MulticlassAccuracy(num_classes=n, average="micro")}, prefix="train/", compute_groups=False
        )
        self.val_scores = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=n, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes=n, average="macro"),
                "balanced_acc": MulticlassAccuracy(num_classes=n, average="macro"),
            },
            prefix="val/",
            compute_groups=False,
        )

    # ------------------------------------------------------------------------------------------ forward

    def backbone_is_frozen(self) -> bool:
        """True when no backbone parameter trains (feature extraction)."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features; without autograd when the backbone is frozen."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.backbone_is_frozen():
            with torch.inference_mode():
                feats = self.backbone(x)
            return feats.clone()  # a normal tensor the head's autograd may use
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities, N × num_classes."""
        return self.head(self.features(x))

    def backbone_stages(self) -> list[Stage] | None:
        """The backbone's forward as one stage per layer group then pooling (src.models.layer_groups), checked
        once against the backbone itself; None when its layout is not known (or the check fails)."""
        stages = group_stages(self.backbone)  # closures over this backbone: built anew, never copied with the model
        if stages is not None and not hasattr(self, "_stages_match"):
            self._stages_match = stages_match(self.backbone, stages)
        return stages if stages is not None and self._stages_match else None

    def _run_stages(self, x: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
        stages = self.backbone_stages()
        if stages is None:
            raise RuntimeError(f"{self.hparams.backbone['name']}'s forward is not known as layer-group stages")
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for stage in stages[start:stop]:
            x = stage(x)
        return x

    def frozen_prefix(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """The output of the backbone's first ``groups`` layer groups (what a fine-tuning stage keeps frozen)."""
        return self._run_stages(x, 0, groups)

    def features_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Pooled features from the output of the first ``start`` layer groups: the rest of the backbone."""
        return self._run_stages(x, start, None)

    # ------------------------------------------------------------------------------------------- steps

    @property
    def mixes_images(self) -> bool:
        """True when training batches of images are mixed in pairs (MixUp/CutMix): cached features can't be."""
        return self.batch_mix is not None

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        target = y
        if stage == "train" and self.batch_mix is not None and x.ndim == 4 and len(batch) == 2:
            x, target = self.batch_mix(x, y)  # soft targets; accuracy counts each image's larger share
            y = target.argmax(dim=1)
        if len(batch) == 3:  # cached outputs of the frozen groups, and the first group still to run
            log_probs = self.head(self.features_from(x, int(batch[2][0])))
        else:
            log_probs = self.head(x) if x.ndim == 2 else self(x)  # N×D: cached pooled backbone features
        loss = self.criterion(log_probs, target)
        if stage == "train" and not torch.isfinite(loss):
            trainer = attached_trainer(self)
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer is not None else None
            raise UserError(
                f"The training loss became {loss.item()} at epoch {self.current_epoch + 1}, step {self.global_step}: "
                f"training diverged. Lower model.optimizer.lr (the head's is {lr}) or check the data."
            )
        loss_metric, scores = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_scores")
        loss_metric.update(loss.detach(), weight=y.numel())
        scores.update(log_probs.detach(), y)
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", scores["acc"], on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(
            {k: m for k, m in scores.items(keep_base=False) if k != f"{stage}/acc"}, on_step=False, on_epoch=True
        )
        return loss

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val")

    # --------------------------------------------------------------------------------------- optimizer

    def configure_optimizers(self) -> Any:
        """The configured torch.optim optimizer over the trainable parameters only, and its LR schedule.

        The trainable parameters form one group named ``head`` (with the backbone too when nothing froze it);
        BackboneFinetuning adds ``backbone.<group>`` groups as it unfreezes them.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        options = dict(self.hparams.optimizer)
        cls = getattr(torch.optim, options.pop("name"))
        optimizer = cls([{"params": params, "name": "head"}], **options)
        sched_cfg = dict(self.hparams.scheduler or {})
        name = sched_cfg.get("name")
        scheduler = (
            build_schedule(optimizer, self.total_training_steps(), name, **sched_cfg.get(name) or {})
            if name not in (None, "none")
            else None
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_training_steps(self) -> int:
        """The optimizer steps of the whole fit, as ``Trainer.estimated_stepping_batches`` counts them, but on
        a fresh train loader from the datamodule.

        That property sets up the trainer's own train loader and iterator when first read, here in
        configure_optimizers, which a resumed run calls before it restores its loops (Lightning 2.6): the
        first resumed epoch then replayed epoch 0's order and missed the batches a mid-epoch resume skips.
        """
        trainer = self.trainer
        if trainer.datamodule is None:
            return int(trainer.estimated_stepping_batches)
        batches = len(trainer.datamodule.train_dataloader())  # a loader object only: no worker, no iteration
        limit = trainer.limit_train_batches
        batches = int(batches * limit) if isinstance(limit, float) else min(batches, int(limit))
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs or 1, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # ------------------------------------------------------------------------------------- checkpoints

    def drop_frozen_backbone(self, checkpoint: dict[str, Any]) -> None:
        """Slim checkpoints (``slim_checkpoint``, weights from a hashed file): drop the backbone's tensors, keep
        the reference that rebuilds it. Called by the finetuning callback, which knows the backbone stays frozen."""
        if self.hparams.slim_checkpoint and self.weights_sha256:
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")
            }
            checkpoint["backbone_ref"] = {
                "name": self.hparams.backbone["name"],
                "weights": self.hparams.backbone.get("weights"),
                "sha256": self.weights_sha256,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restore_frozen_backbone(checkpoint)

    def restore_frozen_backbone(self, checkpoint: dict[str, Any]) -> None:
        """A slim checkpoint's state_dict completed with this model's backbone, which must be the one its
        ``backbone_ref`` names (built from the same weights file); a full checkpoint is left as it is.
        The one rebuild of slim checkpoints: resuming (Lightning calls on_load_checkpoint) and inference."""
        ref = checkpoint.get("backbone_ref")
        if ref:
            self.check_backbone_ref(ref)
            state = checkpoint["state_dict"]
            state.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})

    def check_backbone_ref(self, ref: dict[str, Any]) -> None:
        """Raise UserError unless this backbone was built from the weights file the checkpoint names."""
        if ref.get("sha256") != self.weights_sha256:
            raise UserError(
                f"The checkpoint's backbone is {ref.get('name')} with weights {ref.get('weights')} of SHA-256 "
                f"{str(ref.get('sha256'))[:16]}…, but the weights found now hash to {str(self.weights_sha256)[:16]}…: "
                "not the same file. Restore that weights file (or pass its path as model.backbone.weights)."
            )

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and frozen parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable_params": trainable, "frozen_params": frozen}


def check_model_config(
    backbone: dict[str, Any],
    head: dict[str, Any],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    mixup: dict[str, Any] | None = None,
    cutmix: dict[str, Any] | None = None,
) -> None:
    """Raise ConfigError on the first bad model setting (backbone name, head, optimizer, schedule, loss,
    MixUp/CutMix).

    Cheap: train calls it before any data is scanned, so a typo costs seconds, not a preflight.
    """
    check_backbone_name(backbone.get("name"))
    check_head(head.get("hidden_dim", 256), head.get("dropout", 0.0))
    if loss is not None:
        check_class_weights(loss.get("class_weights"), None)
        smoothing = loss.get("label_smoothing") or 0.0
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not 0 <= smoothing < 1:
            raise ConfigError(f"model.loss.label_smoothing must be a number in [0, 1), got {smoothing!r}.")
    check_optimizer(optimizer)
    build_batch_mix((mixup or {}).get("alpha", 0.0), (cutmix or {}).get("alpha", 0.0), 2)  # its checks only
    name = (scheduler or {}).get("name")
    check_schedule(name, (scheduler or {}).get(name) if name not in (None, "none") else None)


def check_class_weights(weights: Any, num_classes: int | None) -> list[float] | None:
    """model.loss.class_weights as a list of positive finite floats, one per class (None: unweighted).

    ``num_classes`` None (before the data is listed): ``auto`` passes and a list's length is not checked.
    """
    if weights is None or (weights == "auto" and num_classes is None):
        return None
    expected = (
        "a list of positive numbers, one per class in class order"
        if num_classes is None
        else (f"{num_classes} positive numbers (one per class, in class order)")
    )
    if weights == "auto":
        raise ConfigError(
            "model.loss.class_weights=auto must be turned into numbers before the model is built (src.train does)."
        )
    values = list(weights) if isinstance(weights, list | tuple) else None
    ok = values is not None and all(
        not isinstance(w, bool) and isinstance(w, int | float) and 0 < w < math.inf for w in values
    )
    if not ok or (num_classes is not None and len(values) != num_classes):
        raise ConfigError(f"model.loss.class_weights must be null, auto, or {expected}; got {weights!r}.")
    return [float(w) for w in values]


def inverse_frequency_weights(counts: list[int]) -> list[float]:
    """class_weights=auto: 1 / class count, scaled so the weights average 1 over the training images."""
    if not counts or min(counts) < 1:
        raise ConfigError(
            f"model.loss.class_weights=auto needs every class in the training split, got counts {counts}."
        )
    total, k = sum(counts), len(counts)
    return [round(total / (k * c), 6) for c in counts]


def check_optimizer(optimizer: dict[str, Any]) -> None:
    """Fail early, with the fix, on an unknown optimizer, a setting it does not take, or a value it refuses.

    The optimizer is built once over a dummy parameter: torch itself checks its arguments (momentum >= 0,
    betas in [0, 1), ...), so every optimizer is checked by its own rules.
    """
    options = dict(optimizer)
    name = options.pop("name", None)
    cls = getattr(torch.optim, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"model.optimizer.name={name!r} is not a torch.optim optimizer (SGD, Adam, AdamW, ...).")
    lr = options.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise ConfigError(f"model.optimizer.lr must be a positive, finite number, got {lr!r}.")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"torch.optim.{name} takes no {', '.join(f'model.optimizer.{k}' for k in unknown)} (its settings: "
            f"{', '.join(accepted)}). Switch optimizers with their own settings: model/optimizer={OPTIMIZER_PRESETS}."
        )
    param = torch.zeros(1, requires_grad=True)
    try:  # built and stepped once: torch checks values (momentum >= 0, ...) and what gradients it takes
        dummy = cls([param], **options)
        param.grad = torch.ones(1)
        dummy.step()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"model.optimizer ({name}): {err}") from None
