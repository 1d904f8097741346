"""Backbone features per image on disk: every run, split, fold and re-split reuses what any run embedded.

Rows are keyed by the SHA-256 of the image file's bytes (the preflight computes it anyway), under a folder
named by everything else that shapes a feature: backbone weights, precision, memory format, transform,
decoder, and for augmented views the view number and seed. New rows go into a new shard file (atomic,
verified on read); many shards are merged into one now and then. A moved or renamed image is found again;
an edited one is embedded anew.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from src.utils.io import json_digest
from src.utils.tensor_store import load_tensors, save_tensors

log = logging.getLogger(__name__)
MERGE_AT = 8  # shards in a folder before they are merged into one


class EmbeddingStore:
    """Features by image content for one ``spec`` (a plain dict: what shapes the features)."""

    def __init__(self, root: str | os.PathLike, spec: dict[str, Any]) -> None:
        self.spec = spec
        key = json_digest(spec)[:32]
        self.folder = Path(root) / key

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.pt")) if self.folder.is_dir() else []

    def rows(self) -> dict[bytes, torch.Tensor]:
        """Every stored (key, feature) of this spec; damaged shards are skipped (their images re-embedded)."""
        found: dict[bytes, torch.Tensor] = {}
        for path in self.shards():
            tensors = load_tensors(path, self.spec)  # None when vanished (merged away), partial or corrupt
            if tensors is None:
                continue
            for key, row in zip(tensors["keys"], tensors["features"], strict=True):
                found[bytes(key.tolist())] = row
        return found

    def lookup(self, keys: list[str]) -> tuple[torch.Tensor | None, list[int]]:
        """(features N x D with the found rows filled, or None when none was found; indices not found)."""
        stored = self.rows()
        hits = [stored.get(bytes.fromhex(k)) for k in keys]
        missing = [i for i, row in enumerate(hits) if row is None]
        present = [row for row in hits if row is not None]
        if not present:
            return None, missing
        out = torch.zeros(len(keys), *present[0].shape, dtype=present[0].dtype)
        for i, row in enumerate(hits):
            if row is not None:
                out[i] = row
        return out, missing

    def add(self, keys: list[str], features: torch.Tensor) -> Path:
        """Store new rows as one shard; merge the folder's shards when there are many."""
        unique = {k: i for i, k in enumerate(keys)}  # identical files: one row
        index = torch.tensor(list(unique.values()), dtype=torch.long)
        path = self.write(list(unique), features[index])
        if len(self.shards()) >= MERGE_AT:
            self.merge()
        return path

    def write(self, keys: list[str], features: torch.Tensor) -> Path:
        key_bytes = torch.tensor([list(bytes.fromhex(k)) for k in keys], dtype=torch.uint8).reshape(len(keys), -1)
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:24]
        path = self.folder / f"shard-{name}.pt"
        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"keys": key_bytes, "features": features.contiguous()}, self.spec)
        return path

    def merge(self) -> None:
        """All shards into one; the old ones removed (a reader that misses one embeds those images again)."""
        old = self.shards()
        stored = self.rows()
        if not stored:
            return
        keys = sorted(stored)
        merged = self.write([k.hex() for k in keys], torch.stack([stored[k] for k in keys]))
        for path in old:
            if path != merged:
                path.unlink(missing_ok=True)
        log.info("Merged %d feature shards into %s", len(old), merged)
