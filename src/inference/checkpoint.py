"""Load checkpoints safely and rebuild the trained model from the checkpoint alone.

Before anything in a checkpoint is used: every zip member's CRC is checked (corrupt files are called
corrupt), it is loaded with ``torch.load(weights_only=True)`` (tensors and plain values only), its
hyperparameters may name no callable, its eval transforms only allowed torchvision classes, and its
weights must be finite and fit the model its class list describes.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torchvision import transforms as T

from src.data.preprocessing import UnsafeTransformError, transform_from_record
from src.models.classifier import TransferClassifier
from src.utils.checkpoint_io import CorruptCheckpointError, verify_checkpoint_file
from src.utils.errors import UserError


class UnsafeCheckpointError(UserError):
    """The checkpoint holds something other than tensors and plain values."""


class HeldOut(NamedTuple):
    """An image a run held out: its path under the data root, its label, the SHA-256 of the file."""

    path: str
    label: str
    sha256: str


@dataclass
class TrainedModel:
    """A checkpoint's model (eval mode, on its device) and what using it needs."""

    model: TransferClassifier
    hparams: dict[str, Any]
    transform: T.Compose  # the checkpoint's deterministic preprocessing
    held_out: dict[str, list[HeldOut]] | None = None  # split -> the images its run held out

    @property
    def classes(self) -> list[str]:
        return list(self.hparams["class_names"])


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's contents, verified whole and plain; nothing in it is run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist.")
    verify_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch names the offending global ("Unsupported global: GLOBAL posix.system ..."): say that
        first = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)
        first = first.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
        if "GLOBAL" not in first:  # the archive is whole but its contents don't unpickle: damaged, not hostile
            raise CorruptCheckpointError(f"{path} is corrupt: its contents can't be read ({first[:200]}).") from None
        raise UnsafeCheckpointError(
            f"Refusing {path}: it is not a plain checkpoint (tensors and plain values only): it names "
            f"{first[:200]}. Nothing in it was run."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project (no state_dict / hyper_parameters).")
    check_plain_hparams(ckpt["hyper_parameters"], path)
    return ckpt


def check_plain_hparams(hparams: Any, path: Path) -> None:
    """Refuse hyperparameters that name code: Hydra ``_target_`` or ``_instantiator`` entries anywhere, and a
    class list that is not a list of distinct names."""
    stack = [hparams]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            hooks = {"_target_", "_instantiator", "_partial_", "_args_"} & set(item)
            if hooks:
                raise UnsafeCheckpointError(
                    f"Refusing {path}: its hyperparameters carry {sorted(hooks)}, which would name code to run."
                )
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    classes = hparams.get("class_names") if isinstance(hparams, dict) else None
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{path} records no usable class list (class_names: {classes!r}).")
    if len(set(classes)) != len(classes):
        raise UserError(f"{path} lists a class twice: {classes}.")
    if any(not c or any(ch in c for ch in "\r\n\0") for c in classes):
        raise UserError(f"{path} has a class name that is empty or holds a line break: {[ascii(c) for c in classes]}.")


def eval_transform(hparams: dict[str, Any]) -> T.Compose:
    """The checkpoint's deterministic preprocessing (src.data.preprocessing decodes what training recorded)."""
    try:
        return transform_from_record(hparams.get("preprocessing"))
    except UnsafeTransformError as err:
        raise UnsafeCheckpointError(f"Refusing the checkpoint: {err} Nothing in it was run.") from None


def check_weights(state: dict[str, Any], model: torch.nn.Module, path: Path) -> None:
    """Name every tensor that is not finite, missing, unexpected or of the wrong shape for ``model``."""
    expected = model.state_dict()
    problems = []
    for key, value in state.items():
        if key not in expected:
            problems.append(f"{key}: not a tensor of this model")
        elif not torch.is_tensor(value) or tuple(value.shape) != tuple(expected[key].shape):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            problems.append(f"{key}: shape {shape} in the checkpoint, the model needs {tuple(expected[key].shape)}")
        elif value.dtype != expected[key].dtype or value.device.type == "meta":
            problems.append(f"{key}: {value.dtype} on {value.device.type}, the model needs {expected[key].dtype}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            problems.append(f"{key}: holds NaN or infinite values")
    problems += [f"{key}: missing" for key in expected if key not in state]
    if problems:
        classes = len(model.hparams.class_names)
        listing = "\n".join(f"  {p}" for p in problems[:20])
        raise UserError(f"{path} does not hold usable weights for its {classes} classes:\n{listing}")


def load_trained(path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainedModel:
    """The trained model in eval mode, its hyperparameters and preprocessing, from the checkpoint alone.

    A full checkpoint carries the backbone's weights: it is rebuilt with random init and overwritten. A slim
    one (feature extraction) carries the head only and the backbone's weights id and SHA-256: the backbone
    is rebuilt from those weights and the hash must match.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    transform = eval_transform(hp)  # checked before the model (and its weights files) is touched
    try:
        model, state = rebuild(ckpt, hp)
    except UserError:
        raise
    except Exception as err:  # a hand-edited or foreign file: any shape of wrongness ends here, named
        raise UserError(
            f"{path} is not a checkpoint this project can rebuild a model from ({type(err).__name__}: {err})."
        ) from None
    check_weights(state, model, path)
    model.load_state_dict(state, strict=True)
    return TrainedModel(model.to(device).eval(), hp, transform, held_out_images(ckpt, list(hp["class_names"]), path))


DATAMODULE_STATE = "ImageFolderDataModule"  # Lightning stores a datamodule's state_dict under its class name


def held_out_images(ckpt: dict[str, Any], classes: list[str], path: Path) -> dict[str, list[HeldOut]] | None:
    """The val/test images (path under the data root, label, SHA-256 of the file) its run held out, checked
    to be plain and inside the root; None for checkpoints written before runs recorded them."""
    state = ckpt.get(DATAMODULE_STATE)
    if state is None:
        return None
    held = state.get("held_out") if isinstance(state, dict) else None
    if not isinstance(held, dict):
        raise UserError(f"{path}: its record of held-out images is malformed.")
    out: dict[str, list[HeldOut]] = {}
    for split, rows in held.items():
        ok = split in ("val", "test") and isinstance(rows, list) and all(held_out_row(r, classes) for r in rows)
        if not ok:
            raise UserError(f"{path}: its record of held-out {split} images is malformed.")
        out[split] = [HeldOut(*r) for r in rows]
    return out


def held_out_row(row: Any, classes: list[str]) -> bool:
    """[relative path, label, SHA-256 hex or ""]: a path that stays under the root, a known label."""
    if not (isinstance(row, list | tuple) and len(row) == 3 and all(isinstance(x, str) for x in row)):
        return False
    rel, label, digest = row
    parts = os.path.normpath(rel).split(os.sep) if rel else []
    return (
        bool(parts)
        and "\0" not in rel
        and not os.path.isabs(rel)
        and parts[0] not in ("..", ".")
        and label in classes
        and (digest == "" or (len(digest) == 64 and all(ch in "0123456789abcdef" for ch in digest)))
    )


def rebuild(ckpt: dict[str, Any], hp: dict[str, Any]) -> tuple[TransferClassifier, dict[str, Any]]:
    """The model its hyperparameters describe, and the full state dict to load into it."""
    known = set(inspect.signature(TransferClassifier.__init__).parameters) - {"self"}
    unknown = sorted(set(hp) - known)
    if unknown:
        raise UserError(f"The checkpoint's hyperparameters hold keys this project does not know: {unknown}.")
    ref = ckpt.get("backbone_ref")
    if ref is not None and not isinstance(ref, dict):
        raise UserError("The checkpoint's backbone_ref is not a mapping.")
    model = TransferClassifier(**{**hp, "backbone": dict(hp["backbone"], weights=ref["weights"] if ref else None)})
    completed = {"state_dict": dict(ckpt["state_dict"]), "backbone_ref": ref}
    model.restore_frozen_backbone(completed)
    return model, completed["state_dict"]
