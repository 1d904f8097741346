"""Learning-rate schedules that scale every param group from its own initial LR, groups added later included.

torch's OneCycleLR and chained warmup/cosine schedulers fix their per-group lists when built, so a backbone
group unfrozen mid-run would not follow them. These compute each step's LR as
``group["initial_lr"] * multiplier(step)`` for whatever groups the optimizer has at that step.
"""

from __future__ import annotations

import inspect
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from src.utils.errors import ConfigError


class GroupScaledSchedule(LRScheduler):
    """Base: subclasses define ``multiplier(step)``; one step per optimizer step."""

    def __init__(self, optimizer: Optimizer, total_steps: int) -> None:
        self.total_steps = max(1, int(total_steps))
        super().__init__(optimizer)

    def multiplier(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        m = self.multiplier(self.last_epoch)
        return [group.setdefault("initial_lr", group["lr"]) * m for group in self.optimizer.param_groups]


class WarmupCosine(GroupScaledSchedule):
    """Linear warm-up from 0 over ``warmup_fraction`` of the steps, then cosine down to ``min_factor``."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_fraction: float, min_factor: float) -> None:
        self.warmup_fraction, self.min_factor = float(warmup_fraction), float(min_factor)
        super().__init__(optimizer, total_steps)

    def multiplier(self, step: int) -> float:
        warmup = max(1, round(self.warmup_fraction * self.total_steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class OneCycle(GroupScaledSchedule):
    """One cycle (Smith): cosine up from 1/div_factor to 1 over ``pct_start``, then down to 1/(div × final_div)."""

    def __init__(
        self, optimizer: Optimizer, total_steps: int, pct_start: float, div_factor: float, final_div_factor: float
    ) -> None:
        self.pct_start, self.div_factor, self.final_div_factor = (
            float(pct_start),
            float(div_factor),
            float(final_div_factor),
        )
        super().__init__(optimizer, total_steps)

    def multiplier(self, step: int) -> float:
        peak = max(1, round(self.pct_start * self.total_steps))
        start, end = 1 / self.div_factor, 1 / (self.div_factor * self.final_div_factor)
        if step < peak:
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / peak))
        progress = min(1.0, (step - peak) / max(1, self.total_steps - peak))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES = {"warmup_cosine": WarmupCosine, "one_cycle": OneCycle}


def build_schedule(optimizer: Optimizer, total_steps: int, name: str | None, **options: float) -> LRScheduler | None:
    """The named schedule over ``total_steps`` optimizer steps; None for ``name`` none/null (constant LR)."""
    check_schedule_name(name)
    if name in (None, "none"):
        return None
    return SCHEDULES[name](optimizer, total_steps, **options)


def check_schedule_name(name: str | None) -> None:
    """Raise ConfigError unless ``name`` is none/null or a known schedule."""
    if name not in (None, "none", *SCHEDULES):
        raise ConfigError(f"model.scheduler.name={name!r}: choose none, {', '.join(SCHEDULES)}.")


# each schedule's options: (low, high) bounds, inclusive
OPTION_RANGES = {
    "warmup_fraction": (0.0, 1.0),
    "min_factor": (0.0, 1.0),
    "pct_start": (0.0, 1.0),
    "div_factor": (1.0, math.inf),
    "final_div_factor": (1.0, math.inf),
}


def check_schedule(name: str | None, options: dict[str, object] | None) -> None:
    """Raise ConfigError on an unknown schedule, an option it does not take, or a value out of range."""
    check_schedule_name(name)
    if name in (None, "none"):
        return
    accepted = [p for p in inspect.signature(SCHEDULES[name].__init__).parameters if p in OPTION_RANGES]
    options = dict(options or {})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"model.scheduler.{name} takes no {unknown}; its options: {accepted}.")
    for key in accepted:
        value, (low, high) = options.get(key), OPTION_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ConfigError(f"model.scheduler.{name}.{key} must be a number in [{low}, {high}], got {value!r}.")
