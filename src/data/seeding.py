"""Reproducible training data: shuffling and augmentation depend only on (seed, epoch, index).

A run killed mid-epoch and resumed from its last checkpoint then replays that epoch exactly: worker
processes, their start order and how many epochs they have served play no part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby (seed, epoch, index) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (index, epoch): a permutation seeded by (seed, epoch); with ``weights``, ``size`` draws with
    replacement, each index with chance proportional to its weight (the balanced sampler).

    ``epoch_source`` (the trainer's current epoch) wins over ``set_epoch``: Lightning creates the first
    iterator of a fit before it calls ``set_epoch``, which would replay epoch 0 in a resumed run.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        epoch_source: Callable[[], int] | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.epoch_source = epoch_source
        self.weights = weights

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def current_epoch(self) -> int:
        return self.epoch_source() if self.epoch_source is not None else self.epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.current_epoch()
        order = epoch_order(self.size, torch.Generator().manual_seed(mix(self.seed, epoch)), self.weights).tolist()
        return ((i, epoch) for i in order)


def epoch_order(size: int, generator: torch.Generator, weights: torch.Tensor | None = None) -> torch.Tensor:
    """One epoch's indices: a permutation, or with ``weights`` ``size`` weighted draws with replacement."""
    if weights is None:
        return torch.randperm(size, generator=generator)
    return torch.multinomial(weights, size, replacement=True, generator=generator)


class SeededItems(Dataset):
    """Wraps a dataset so item (index, epoch) is transformed under the torch seed mix(seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        return seeded_item(self.dataset, index, mix(self.seed, epoch, index))


class KeySeededItems(Dataset):
    """Wraps a dataset so item i is transformed under the torch seed ``seeds[i]``: an augmented view that
    depends on the image alone (a seed from its content), not on its position in this run's list."""

    def __init__(self, dataset: Dataset, seeds: list[int]) -> None:
        self.dataset, self.seeds = dataset, seeds

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> Any:
        return seeded_item(self.dataset, index, self.seeds[index])


@contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """The CPU generator the transforms draw from seeded by ``seed`` inside the block, then restored."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def seeded_item(dataset: Dataset, index: int, seed: int) -> Any:
    """``dataset[index]`` transformed under ``seed`` (``torch_seeded``)."""
    with torch_seeded(seed):
        return dataset[index]
