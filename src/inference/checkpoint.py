"""Load checkpoints safely and rebuild the trained model from the checkpoint alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torchvision import transforms as T

from src.models.classifier import TransferClassifier
from src.utils.errors import UserError

# the only callables a checkpoint may name: torchvision's transforms (for its eval preprocessing)
ALLOWED_TARGET_PREFIX = "torchvision.transforms."


class UnsafeCheckpointError(UserError):
    """The checkpoint holds something other than tensors and plain values."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain values only; anything else is refused unrun."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch names the offending global ("Unsupported global: GLOBAL posix.system ..."): say that
        first = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)
        first = first.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
        raise UnsafeCheckpointError(
            f"Refusing {path}: it is not a plain checkpoint (tensors and plain values only). torch.load with "
            f"weights_only=True rejected it ({first}). Nothing in it was run."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project (no state_dict / hyper_parameters).")
    check_plain_hparams(ckpt["hyper_parameters"], path)
    return ckpt


def check_plain_hparams(hparams: Any, path: Path) -> None:
    """Refuse instantiation hooks (``_instantiator``) and ``_target_`` entries outside torchvision.transforms."""
    stack = [hparams]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "_instantiator" in item:
                raise UnsafeCheckpointError(
                    f"Refusing {path}: its hyperparameters carry an _instantiator entry, "
                    "which would run code named by the file."
                )
            target = item.get("_target_")
            if target is not None and not str(target).startswith(ALLOWED_TARGET_PREFIX):
                raise UnsafeCheckpointError(
                    f"Refusing {path}: its hyperparameters name {target!r}; only {ALLOWED_TARGET_PREFIX}* may be named."
                )
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def eval_transform(hparams: dict[str, Any]) -> T.Compose:
    """The checkpoint's deterministic preprocessing: its eval transforms, ToTensor, Normalize."""
    from hydra.utils import instantiate

    pre = hparams.get("preprocessing") or {}
    if not pre:
        raise UserError("The checkpoint records no preprocessing (trained by an older version?).")
    steps = []
    for step in pre["eval_transforms"]:
        options = dict(step)
        target = str(options.pop("transform", ""))
        if not target.startswith(ALLOWED_TARGET_PREFIX):
            raise UnsafeCheckpointError(f"The checkpoint's eval transform {target!r} is not a torchvision transform.")
        steps.append(instantiate({"_target_": target, **options}))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])


def model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> TransferClassifier:
    """The trained model in eval mode, from the checkpoint alone.

    A full checkpoint carries the backbone's weights: it is rebuilt with random init and overwritten. A slim
    one (feature extraction) carries the head only and the backbone's weights id and SHA-256: the backbone
    is rebuilt from those weights and the hash must match.
    """
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    ref = ckpt.get("backbone_ref")
    backbone = dict(hp["backbone"], weights=ref["weights"] if ref else None)
    hp["backbone"] = backbone
    model = TransferClassifier(**hp)
    state = dict(ckpt["state_dict"])
    if ref:
        model.check_backbone_ref(ref)
        state.update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
