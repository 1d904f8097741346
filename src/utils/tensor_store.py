"""Verified tensor files: atomic writes, a content hash inside, anything partial or corrupt reads as absent."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from src.utils.io import atomic_write

log = logging.getLogger(__name__)
FORMAT = 1


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (read in place: a memory-mapped tensor is
    hashed without being copied into memory)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and plain ``meta`` atomically, with their digest for verification on load."""
    payload = {
        "format": FORMAT,
        "meta": meta,
        "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        "sha256": tensors_digest(tensors),
    }
    atomic_write(path, lambda f: torch.save(payload, f), mode="wb")


def load_tensors(path: str | os.PathLike, meta: dict[str, Any], mmap: bool = False) -> dict[str, torch.Tensor] | None:
    """The tensors stored at ``path`` if the file is whole, verified and was written for ``meta``; else None.

    ``mmap``: the tensors stay in the file (memory-mapped, read-only use): pages are read when touched and
    the OS may drop them again, so a cache larger than memory still loads."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        ok = (
            isinstance(payload, dict)
            and payload.get("format") == FORMAT
            and payload.get("meta") == meta
            and payload.get("sha256") == tensors_digest(payload["tensors"])
        )
    except Exception as err:  # truncated zip, bad pickle, wrong types: all mean "rebuild"
        log.warning("Cache file %s is unreadable (%s: %s); rebuilding it", path, type(err).__name__, err)
        return None
    if not ok:
        log.warning("Cache file %s failed verification; rebuilding it", path)
        return None
    return payload["tensors"]
