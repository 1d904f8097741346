"""Eval preprocessing as plain values: recorded in every checkpoint, rebuilt from it with nothing else run.

A checkpoint names its eval transforms as ``{"transform": "torchvision.transforms.Resize", "size": 256}``.
Rebuilding resolves each name to an object inside torchvision (attribute by attribute, importing nothing)
and accepts it only if it *is* one of the classes in ``EVAL_TRANSFORMS``: a name that merely starts like a
transform (``torchvision.transforms.transforms.torch.save``) resolves to something else and is refused
before anything is called. Options must be plain values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torchvision
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from src.utils.errors import ConfigError, UserError

# deterministic, PIL-level steps a checkpoint may ask for; ToTensor and Normalize(mean, std) are added here
EVAL_TRANSFORMS: tuple[type, ...] = (T.Resize, T.CenterCrop, T.Pad, T.Grayscale)
# a safety bound, not a setting: no sizes or paddings beyond it (a file asking for 40000 px would exhaust memory)
MAX_PIXELS_PER_SIDE = 4096
DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# resampling filters by name, as PIL numbers them: torchvision transforms take the number, and a checkpoint
# records plain values
PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


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


def pil_filter(name: Any) -> int:
    """PIL's number for resampling filter ``name`` (the ``${pil_filter:...}`` config resolver)."""
    if name not in PIL_FILTERS:
        raise ConfigError(
            f"data.interpolation must be one of {', '.join(PIL_FILTERS)}, got {name!r} (null is filled from the "
            "backbone weights by src.train before the transforms are built)."
        )
    return PIL_FILTERS[name]


# data.*_transforms: interpolation: ${pil_filter:${data.interpolation}}
OmegaConf.register_new_resolver("pil_filter", pil_filter, replace=True)


def numbers_within(value: Any, limit: int) -> bool:
    """Every number in ``value`` (nested lists included) is at most ``limit`` in size."""
    if isinstance(value, list | tuple):
        return all(numbers_within(v, limit) for v in value)
    return not isinstance(value, int | float) or isinstance(value, bool) or abs(value) <= limit


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
        if not numbers_within(list(options.values()), MAX_PIXELS_PER_SIDE):
            raise UnsafeTransformError(
                f"Recorded eval transform {cls.__name__}{options} asks for more than {MAX_PIXELS_PER_SIDE} pixels."
            )
        steps.append((cls, options))
    check_normalization(mean, std)
    built = []
    for cls, options in steps:  # only now, with every step checked, is anything called
        try:
            built.append(cls(**options))
        except Exception as err:
            raise UserError(f"Recorded eval transform {cls.__name__}{options} cannot be built: {err}") from None
    transform = T.Compose([*built, T.ToTensor(), T.Normalize(list(mean), list(std))])
    try:  # one small image through it: a step that builds but can't run (Grayscale to 1 channel) fails here
        out = transform(Image.new("RGB", (64, 48)))
    except Exception as err:
        raise UserError(f"The recorded eval transforms fail on an image: {type(err).__name__}: {err}") from None
    if out.ndim != 3 or out.shape[0] != 3 or min(out.shape[1:]) < 1:
        raise UserError(f"The recorded eval transforms make a {tuple(out.shape)} tensor, not a 3-channel image.")
    return transform


def check_normalization(mean: Any, std: Any) -> None:
    """Three finite means and three finite, positive standard deviations."""
    values = [*mean, *std] if isinstance(mean, list | tuple) and isinstance(std, list | tuple) else []
    ok = len(values) == 6 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not ok or not all(math.isfinite(v) for v in values) or not all(s > 0 for s in std):
        raise UnsafeTransformError(
            "The recorded normalization is not three finite means and three finite, positive standard deviations."
        )


def preprocessing_record(mean: Sequence[float], std: Sequence[float], eval_transforms: Sequence[Any]) -> dict[str, Any]:
    """What inference needs, recorded in every checkpoint: mean, std and the eval transforms as plain values
    (checked now, from data.eval_transforms, so every checkpoint the run writes loads again)."""
    return {"mean": list(mean), "std": list(std), "eval_transforms": encode_eval_transforms(eval_transforms)}


def transform_from_record(record: Any) -> T.Compose:
    """The deterministic preprocessing a checkpoint recorded (``preprocessing_record``): its eval transforms,
    ToTensor, Normalize; UnsafeTransformError for anything but allowed classes and plain values."""
    if not record:
        raise UserError("The checkpoint records no preprocessing (trained by an older version?).")
    steps = record.get("eval_transforms") if isinstance(record, dict) else None
    if not isinstance(steps, list):
        raise UserError("The checkpoint's preprocessing is not a mapping with a list of eval_transforms.")
    return decode_eval_transforms(steps, record.get("mean") or [], record.get("std") or [])


def check_same_preprocessing(saved: Any, record: dict[str, Any], checkpoint: str) -> None:
    """Refuse to resume ``checkpoint`` when its images were prepared otherwise (resize, crop, filter, mean,
    std): the head would meet inputs it never saw. Compared as built transforms, so equal settings spelled
    differently (an old record without its default filter) pass."""
    if not saved:
        return
    before, now = repr(transform_from_record(saved)), repr(transform_from_record(record))
    if before != now:
        raise UserError(
            f"Cannot resume {checkpoint}: it was trained with the preprocessing\n{before}\nbut this run's is\n{now}\n"
            "Set data.resize, data.crop, data.interpolation, data.mean and data.std to the checkpoint's values to "
            "continue it (null values follow the backbone weights' own), or start a new run."
        )
