"""Weight EMA for fine-tuning (``callbacks=ema``): Lightning's EMAWeightAveraging with a decay that warms up.

A fixed decay of 0.999 averages over ~1,000 optimizer steps; a 15-step fine-tuning run then validates and
checkpoints weights that are still 98.5% the untrained start (val accuracy 0.5 seen). As timm's ModelEmaV3 does,
the decay used at the n-th update is min(decay, (1 + n) / (warmup + n)): early updates follow the raw weights,
long runs average over the full window.
"""

from __future__ import annotations

import functools

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging

from src.utils.errors import ConfigError


def warmup_ema_update(
    averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor, decay: float, warmup: int
) -> torch.Tensor:
    """One EMA step (torch.optim.swa_utils' avg_fn signature) at decay min(decay, (1 + n) / (warmup + n))."""
    n = num_averaged.to(averaged.dtype) if torch.is_tensor(num_averaged) else torch.tensor(float(num_averaged))
    d = torch.clamp((1 + n) / (warmup + n), max=decay) if warmup > 0 else torch.tensor(decay)
    return averaged * d.to(averaged.device, averaged.dtype) + current * (1 - d).to(averaged.device, averaged.dtype)


class WarmupEMA(EMAWeightAveraging):
    """EMAWeightAveraging (its update schedule, checkpointing and resume) with ``warmup_ema_update`` as the
    average; ``warmup=0`` is Lightning's fixed decay."""

    def __init__(
        self,
        decay: float = 0.999,
        warmup: int = 10,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        device: str | None = None,
        use_buffers: bool = True,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
            raise ConfigError(f"callbacks.ema.decay must be a number in [0, 1), got {decay!r}.")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"callbacks.ema.warmup must be a whole number >= 0 (0: a fixed decay), got {warmup!r}.")
        WeightAveraging.__init__(  # EMAWeightAveraging's own __init__ would pass its fixed-decay avg_fn
            self,
            device=device,
            use_buffers=use_buffers,
            avg_fn=functools.partial(warmup_ema_update, decay=float(decay), warmup=warmup),
        )
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch
