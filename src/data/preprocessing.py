"""Eval preprocessing as plain values: recorded in every checkpoint, rebuilt from it with nothing else run.

A checkpoint names its eval transforms as ``{"transform": "torchvision.transforms.Resize", "size": 256}``.
Rebuilding resolves each name to an object inside torchvision (attribute by attribute, importing nothing)
and accepts it only if it *is* one of the classes in ``EVAL_TRANSFORMS``: a name that merely starts like a
transform (``torchvision.transforms.transforms.torch.save``) resolves to something else and is refused
before anything is called. Options must be plain values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torchvision
from torchvision import transforms as T

from src.utils.errors import ConfigError, UserError

# deterministic, PIL-level steps a checkpoint may ask for; ToTensor and Normalize(mean, std) are added here
EVAL_TRANSFORMS: tuple[type, ...] = (T.Resize, T.CenterCrop, T.Pad, T.Grayscale)
DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class UnsafeTransformError(UserError):
    """A recorded transform names something other than an allowed torchvision transform class."""


def resolve_transform(name: str) -> type:
    """The allowed transform class ``name`` refers to; UnsafeTransformError for anything else."""
    allowed = ", ".join(f"torchvision.transforms.{cls.__name__}" for cls in EVAL_TRANSFORMS)
    parts = str(name).split(".")
    if not DOTTED_NAME.fullmatch(str(name)) or parts[0] != "torchvision" or any(p.startswith("_") for p in parts):
        raise UnsafeTransformError(f"Eval transform {name!r} is not one of the allowed transforms ({allowed}).")
    obj: Any = torchvision
    for part in parts[1:]:
        obj = getattr(obj, part, None)  # attributes of modules torchvision already imported; no import
        if obj is None:
            break
    if not any(obj is cls for cls in EVAL_TRANSFORMS):
        raise UnsafeTransformError(f"Eval transform {name!r} is not one of the allowed transforms ({allowed}).")
    return obj


def is_plain(value: Any) -> bool:
    """Numbers, strings, booleans, None, and lists of them: what a transform option may be."""
    if isinstance(value, list | tuple):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def encode_eval_transforms(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """data.eval_transforms (Hydra ``_target_`` entries) as recorded plain values; checked before training,
    so every checkpoint the run writes can be loaded again."""
    recorded = []
    for step in steps:
        options = dict(step)
        name = str(options.pop("_target_", ""))
        try:
            resolve_transform(name)
        except UnsafeTransformError as err:
            raise ConfigError(f"data.eval_transforms: {err}") from None
        if not all(is_plain(v) for v in options.values()):
            raise ConfigError(f"data.eval_transforms: the options of {name} must be plain values, got {options}.")
        recorded.append({"transform": name, **options})
    return recorded


def decode_eval_transforms(recorded: Sequence[Any], mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The recorded steps, then ToTensor and Normalize(mean, std); every name and option checked first."""
    steps = []
    for step in recorded:
        if not isinstance(step, dict):
            raise UnsafeTransformError(f"A recorded eval transform must be a mapping, got {type(step).__name__}.")
        options = dict(step)
        cls = resolve_transform(str(options.pop("transform", "")))
        if not all(isinstance(k, str) and is_plain(v) for k, v in options.items()):
            raise UnsafeTransformError(f"The options of recorded eval transform {cls.__name__} are not plain values.")
        steps.append((cls, options))
    if not (is_plain(list(mean)) and is_plain(list(std)) and len(mean) == len(std) == 3):
        raise UnsafeTransformError("The recorded normalization is not three means and three standard deviations.")
    built = []
    for cls, options in steps:  # only now, with every step checked, is anything called
        try:
            built.append(cls(**options))
        except (TypeError, ValueError) as err:
            raise UserError(f"Recorded eval transform {cls.__name__}{options} cannot be built: {err}") from None
    return T.Compose([*built, T.ToTensor(), T.Normalize(list(mean), list(std))])
