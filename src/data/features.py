"""Datasets and samplers over precomputed backbone features."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from src.data.seeding import epoch_order, mix


class Rows:
    """N feature rows read in place from several tensors (memory-mapped cache shards, or chunks embedded in
    this run): row ``i`` is ``sources[s][r]`` for ``where[i] = (s, r)``. Nothing is gathered into one tensor,
    so features larger than memory train from the page cache."""

    def __init__(self, sources: list[torch.Tensor], where: torch.Tensor) -> None:
        self.sources, self.where = sources, where

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        """The rows of ``parts``, one after the other."""
        sources: list[torch.Tensor] = []
        where = []
        for part in parts:
            shifted = part.where.clone()
            shifted[:, 0] += len(sources)
            sources += part.sources
            where.append(shifted)
        return Rows(sources, torch.cat(where) if where else torch.zeros(0, 2, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, i: int) -> torch.Tensor:
        s, r = self.where[i].tolist()
        return self.sources[s][r]

    def tensor(self) -> torch.Tensor:
        """Every row in one tensor (in memory: for small sets and checks)."""
        if not len(self):
            return torch.zeros(0)
        return torch.stack([self[i] for i in range(len(self))])


class FeatureSet(Dataset):
    """(feature, label) pairs whose size is known before they are computed.

    Dataloaders (and Lightning's step estimates) can be built over it at set-up; the tensors are
    filled in just before the first epoch that serves them, once the model sits on its device.
    ``start``: the features are the outputs of the backbone's first ``start`` layer groups (fine-tuning);
    items are then (output, label, start), so a batch says which group the model goes on from.
    """

    def __init__(self, size: int, start: int | None = None) -> None:
        self.size = size
        self.start = start
        self.filler: Callable[[], None] | None = None  # fills it when read before anyone did
        self.features: Rows | None = None
        self.labels: torch.Tensor | None = None

    def fill(self, features: Rows, labels: torch.Tensor) -> None:
        if len(labels) != self.size or len(features) != self.size:
            raise ValueError(f"expected {self.size} features and labels, got {len(features)} and {len(labels)}")
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.features is None and self.filler is not None:
            self.filler()
        if self.features is None:
            raise RuntimeError("FeatureSet read before its features were computed")
        if self.start is None:
            return self.features[i], self.labels[i]
        return self.features[i], self.labels[i], torch.tensor(self.start)


class ViewSampler(Sampler[int]):
    """Each epoch: every image once, in a fresh order, through one of its K cached augmented views.

    The features dataset holds views stacked view-major (index ``view * N + image``). Order and view
    choice depend only on (seed, epoch), so a resumed epoch replays exactly. Lightning calls
    ``set_epoch`` before every training epoch. With ``weights`` (the balanced sampler) images are drawn with
    replacement by weight.
    """

    def __init__(
        self,
        num_images: int,
        num_views: int,
        seed: int,
        epoch_source: Callable[[], int] | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.num_images, self.num_views, self.seed = num_images, num_views, seed
        self.weights = weights  # per image: the balanced sampler's draw chances (see seeding.epoch_order)
        self.epoch = 0
        self.epoch_source = epoch_source  # the trainer's epoch: right even before Lightning calls set_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_images

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_source() if self.epoch_source is not None else self.epoch
        g = torch.Generator().manual_seed(mix(self.seed, epoch))  # the one seed derivation (src.data.seeding)
        order = epoch_order(self.num_images, g, self.weights)
        views = torch.randint(self.num_views, (self.num_images,), generator=g)
        return iter((views[order] * self.num_images + order).tolist())
