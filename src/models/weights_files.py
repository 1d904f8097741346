"""Local weights files: recognised by their name, checked against the hash prefix the name carries, loaded
strictly (torch files with plain values only, or safetensors)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from src.utils.errors import WeightsUnavailableError
from src.utils.io import sha256_file


def is_local_path(weights: str) -> bool:
    """True when ``weights`` names a file rather than a library's weights enum."""
    s = str(weights)
    return os.sep in s or s.endswith((".pth", ".pt", ".bin", ".ckpt", ".safetensors")) or s.startswith(("~", "."))


def verify_hash_in_name(path: Path) -> str:
    """SHA-256 of ``path``, checked against the hash prefix its name may carry (``name-<hex>.pth``)."""
    sha = sha256_file(path)
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", path.name)
    if match and not sha.startswith(match.group(1)):
        raise WeightsUnavailableError(
            f"{path} is corrupt or not the file its name says: SHA-256 {sha[:16]}… does not start with "
            f"{match.group(1)}. Delete it and reinstall or re-download it."
        )
    return sha


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: safetensors, or a torch file (plain values only; a Lightning-style
    ``{"state_dict": ...}`` wrapper unwrapped). WeightsUnavailableError for anything else."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, text, pickled code, another format: all unreadable as weights
        raise WeightsUnavailableError(
            f"{path} is not a readable weights file ({type(err).__name__}: {str(err)[:200]})."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path} holds no state dict of tensors: not a weights file.")
    return state


def check_weights_file(path: Path) -> None:
    """WeightsUnavailableError unless ``path`` is an existing regular file (a directory is named as one)."""
    if path.is_dir():
        raise WeightsUnavailableError(f"Weights path {path} is a directory: pass the weights file inside it.")
    if not path.is_file():
        raise WeightsUnavailableError(
            f"Weights file {path} does not exist. Pass an existing .pth or .safetensors file, DEFAULT for the "
            "library's pretrained weights, or null for random initialisation."
        )


def load_local_state_dict(model: nn.Module, weights: str) -> str:
    """Load a local weights file into ``model`` (strict) and return the file's SHA-256."""
    path = Path(weights).expanduser()
    check_weights_file(path)
    sha = verify_hash_in_name(path)
    try:
        model.load_state_dict(read_state_dict(path), strict=True)
    except (RuntimeError, ValueError) as err:
        detail = str(err) if len(str(err)) <= 600 else str(err)[:600] + " …"
        raise WeightsUnavailableError(f"{path} does not fit {type(model).__name__}: {detail}") from None
    return sha
