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
    ``{"state_dict": ...}`` wrapper unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_local_state_dict(model: nn.Module, weights: str) -> str:
    """Load a local weights file into ``model`` (strict) and return the file's SHA-256."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"Weights file {path} does not exist. Pass an existing .pth or .safetensors file, DEFAULT for the "
            "library's pretrained weights, or null for random initialisation."
        )
    sha = verify_hash_in_name(path)
    try:
        model.load_state_dict(read_state_dict(path), strict=True)
    except (RuntimeError, ValueError) as err:
        raise WeightsUnavailableError(f"{path} does not fit {type(model).__name__}: {err}") from None
    return sha
