"""Backbone features per image on disk: every run, split, fold and re-split reuses what any run embedded.

Rows are keyed by the SHA-256 of the image file's bytes (the preflight computes it anyway), under a folder
named by everything else that shapes a feature: backbone weights, precision, memory format, transform,
decoder, and for augmented views the view number and seed. New rows go into new shard files as they are
computed (atomic, verified on read; one per chunk of a large embedding pass); many small shards are merged
now and then. A moved or renamed image is found again; an edited one is embedded anew. Shards are read
memory-mapped (torch.load(mmap=True)): training reads features from the file as it touches them; they are
never gathered into memory.
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
MERGE_AT = 8  # small shards in a folder before they are merged into one


class EmbeddingStore:
    """Features by image content for one ``spec`` (a plain dict: what shapes the features)."""

    def __init__(self, root: str | os.PathLike, spec: dict[str, Any]) -> None:
        self.spec = spec
        key = json_digest(spec)[:32]
        self.folder = Path(root) / key

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.pt")) if self.folder.is_dir() else []

    def read(self, path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys K×32 bytes, features) of a shard, memory-mapped and verified; None when vanished (merged away),
        partial or corrupt (its images are embedded again)."""
        tensors = load_tensors(path, self.spec, mmap=True)
        return None if tensors is None else (tensors["keys"], tensors["features"])

    def locate(self, keys: list[str]) -> tuple[list[torch.Tensor], list[tuple[int, int] | None]]:
        """(the shards' feature tensors, memory-mapped; for each key its (shard, row) or None when absent)."""
        sources: list[torch.Tensor] = []
        index: dict[bytes, tuple[int, int]] = {}
        for path in self.shards():
            shard = self.read(path)
            if shard is None:
                continue
            stored, features = shard
            for row, key in enumerate(stored.numpy()):
                index[key.tobytes()] = (len(sources), row)
            sources.append(features)
        return sources, [index.get(bytes.fromhex(k)) for k in keys]

    def add(self, keys: list[str], features: torch.Tensor, small_bytes: float = 0) -> Path:
        """Store new rows as one shard; merge the shard files under ``small_bytes`` when there are many."""
        unique = {k: i for i, k in enumerate(keys)}  # identical files: one row
        index = torch.tensor(list(unique.values()), dtype=torch.long)
        path = self.write(list(unique), features[index])
        if len(self.small_shards(small_bytes)) >= MERGE_AT:
            self.merge(small_bytes)
        return path

    def write(self, keys: list[str], features: torch.Tensor) -> Path:
        key_bytes = torch.tensor([list(bytes.fromhex(k)) for k in keys], dtype=torch.uint8).reshape(len(keys), -1)
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:24]
        path = self.folder / f"shard-{name}.pt"
        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"keys": key_bytes, "features": features.contiguous()}, self.spec)
        return path

    def small_shards(self, small_bytes: float) -> list[Path]:
        """The shard files under ``small_bytes`` on disk (0: every shard); sizes only, nothing read."""
        return [p for p in self.shards() if not small_bytes or p.stat().st_size < small_bytes]

    def merge(self, small_bytes: float = 0) -> None:
        """The small shards (every shard when ``small_bytes`` is 0) into one, the old ones removed: the many
        small shards that adding a few images at a time leaves. Full-size shards are left alone, so a merge
        never holds more than a few shards' rows in memory. (A reader that misses a removed shard embeds
        those images again.)"""
        small = [(path, shard) for path in self.small_shards(small_bytes) if (shard := self.read(path)) is not None]
        if not small:
            return
        rows: dict[bytes, torch.Tensor] = {}
        for _, (keys, features) in small:
            for key, row in zip(keys.numpy(), features, strict=True):
                rows[key.tobytes()] = row
        order = sorted(rows)
        merged = self.write([k.hex() for k in order], torch.stack([rows[k] for k in order]))
        for path, _ in small:
            if path != merged:
                path.unlink(missing_ok=True)
        log.info("Merged %d feature shards into %s", len(small), merged)
