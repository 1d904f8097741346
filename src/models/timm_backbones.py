"""timm backbones: ``model.backbone.name=timm/<name>[.<tag>]`` (any ``timm.list_models()`` architecture).

Pretrained weights come from the local Hugging Face cache, or are downloaded when the hub answers; otherwise
the run stops before any data work with one message naming the model, the cache folder and the ways out
(a quick connection probe first: the hub client alone retries for ~25 s before it gives up). Loading goes
through timm's own ``create_model(pretrained=True)`` with the file named, so timm's checkpoint filters apply.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from src.models.weights_files import is_local_path, load_local_state_dict
from src.utils.errors import ConfigError, WeightsUnavailableError
from src.utils.io import sha256_file
from src.utils.network import unreachable

PREFIX = "timm/"
HUB_TIMEOUT_S = 5.0  # conf/model/classifier.yaml: model.backbone.hub_timeout_s; this only when absent
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold, preferred first


def is_timm_name(name: str) -> bool:
    return str(name).startswith(PREFIX)


def timm_name(name: str) -> str:
    """``timm/convnext_tiny.fb_in1k`` → ``convnext_tiny.fb_in1k``."""
    return str(name)[len(PREFIX) :]


def check_name(name: str) -> None:
    """ConfigError with close names for an unknown architecture or pretrained tag."""
    import difflib

    import timm

    arch, dot, tag = name.partition(".")
    if dot and not tag:
        raise ConfigError(f"Backbone timm/{name} ends in a dot: give a pretrained tag after it, or drop the dot.")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f" Did you mean: {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ConfigError(f"Unknown timm model {arch!r} (backbone timm/{name}).{hint} See timm.list_models().")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = ", ".join(PREFIX + n for n in timm.list_pretrained(f"{arch}.*")) or "none"
        raise ConfigError(f"timm has no pretrained tag {tag!r} for {arch}; its tags: {tags}.")


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config for ``name`` (the default tag when none is given)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def preprocessing(name: str) -> dict[str, Any]:
    """mean, std, eval resize and crop, interpolation from the weights' pretrained config, as timm resolves it
    (``resolve_data_config``: crop = input size, resize = floor(crop / crop_pct))."""
    from timm.data import resolve_data_config

    cfg = pretrained_cfg(name)
    data = resolve_data_config(pretrained_cfg=cfg)
    crop = int(data["input_size"][-1])
    return {
        "mean": tuple(float(v) for v in data["mean"]),
        "std": tuple(float(v) for v in data["std"]),
        "resize": math.floor(crop / data["crop_pct"]),
        "crop": crop,
        "interpolation": str(data["interpolation"]),
        "fixed_input": bool(cfg.get("fixed_input_size", False)),
    }


def create(name: str, weights: str | None, hub_timeout_s: float) -> tuple[nn.Module, str | None]:
    """timm's ``name`` with its pretrained classifier (weights loaded as asked) and the loaded file's SHA-256."""
    import timm

    if weights is None:
        return timm.create_model(name, pretrained=False), None
    if is_local_path(str(weights)):
        model = timm.create_model(name, pretrained=False)
        return model, load_local_state_dict(model, str(weights))
    if str(weights) != "DEFAULT":
        raise ConfigError(
            f"model.backbone.weights={weights!r} for timm/{name}: use DEFAULT (timm's pretrained weights; pick "
            "them with a tag, timm/<name>.<tag>), a path to a local weights file, or null for random init."
        )
    path = pretrained_file(name, hub_timeout_s)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    return model, sha256_file(path)


def pretrained_file(name: str, hub_timeout_s: float) -> Path:
    """The weights file of ``name``'s pretrained config: from the Hugging Face cache, else downloaded."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo = pretrained_cfg(name).get("hf_hub_id")
    if not repo:
        raise WeightsUnavailableError(
            f"timm has no downloadable pretrained weights for {name}: pass model.backbone.weights=/path/to/file "
            "or null for random initialisation, or pick a tagged model (timm.list_pretrained())."
        )
    for filename in HUB_FILES:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str) and os.path.isfile(cached):
            return Path(cached)
    reason = unreachable(constants.ENDPOINT, hub_timeout_s) or (
        "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
    )
    if not reason:
        try:
            return Path(hf_hub_download(repo, HUB_FILES[0]))
        except Exception as err:  # no such file, proxy, interrupted download: one message below
            reason = f"downloading {HUB_FILES[0]} from {repo} failed ({type(err).__name__})"
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    raise WeightsUnavailableError(
        f"Pretrained weights for timm model {name} ({repo} on the Hugging Face Hub) are not available: they are "
        f"not in the local Hugging Face cache ({folder}) and {reason}.\n"
        "Ways out:\n"
        f"  - fill the cache where there is network (python -c \"import timm; timm.create_model('{name}', "
        f'pretrained=True)") and copy {folder.name} into {constants.HF_HUB_CACHE} (or set HF_HOME);\n'
        "  - pass a local file: model.backbone.weights=/path/to/model.safetensors;\n"
        "  - use an offline backbone: experiment=lite0_fe or lite2_fe (ImageNet weights from pip packages)."
    )
