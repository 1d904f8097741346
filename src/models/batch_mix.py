"""MixUp / CutMix for image batches (torchvision.transforms.v2): soft targets for the loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from src.utils.errors import ConfigError

BatchMix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_batch_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> BatchMix | None:
    """MixUp (``mixup_alpha`` > 0), CutMix (``cutmix_alpha`` > 0), or one of the two chosen at random per batch
    when both are on (torchvision's recipe); None when both are 0. Draws from torch's global generator, which
    the run seeds and its checkpoints restore."""
    for key, alpha in (("model.mixup.alpha", mixup_alpha), ("model.cutmix.alpha", cutmix_alpha)):
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha < float("inf"):
            raise ConfigError(f"{key} must be a number >= 0 (0: off), got {alpha!r}.")
    from torchvision.transforms import v2

    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
