"""Test-time augmentation: a batch's class probabilities averaged over deterministic views of each image."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from src.utils.errors import ConfigError

# each view maps a batch N×3×H×W to another view of the same images
VIEWS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "flip": (lambda x: x, lambda x: x.flip(-1)),  # the image and its mirror image
}


def check_tta(name: str | None) -> None:
    """ConfigError unless ``name`` is null or a known TTA mode."""
    if name is not None and name not in VIEWS:
        raise ConfigError(f"tta must be null (off) or one of {', '.join(VIEWS)}, got {name!r}.")


def predict_log_probs(model: torch.nn.Module, x: torch.Tensor, tta: str | None = None) -> torch.Tensor:
    """Log-probabilities of ``model`` (which outputs log-probabilities) on batch ``x``; with ``tta``, the log of
    the probabilities averaged over its views."""
    if tta is None:
        return model(x).float()
    check_tta(tta)
    views = torch.stack([model(view(x)).float() for view in VIEWS[tta]])
    # log of the mean probability, computed in log space: a confident wrong class stays finite
    return torch.logsumexp(views, dim=0) - math.log(len(views))
