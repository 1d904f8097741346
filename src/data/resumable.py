"""Training loaders that Lightning can resume mid-epoch (after a SIGTERM checkpoint) without replaying batches.

Lightning saves a loader's ``state_dict()`` in every checkpoint when the loader has one, and hands it back
through ``load_state_dict()`` when a run restarts inside an epoch. Here that state is (epoch, batches
done); the sampler underneath is seeded by epoch, so skipping the batches already trained on yields
exactly the rest of the interrupted epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Sampler


class ShardedSampler(Sampler[Any]):
    """This process's share of an epoch-seeded sampler's items, resumable mid-epoch.

    With W processes (DDP), rank r takes items r, r+W, r+2W, ... of the inner order, so W processes with
    batch b train on exactly the samples one process with batch b*W would (the order stays seeded by
    epoch alone). ``pad``: the order is first extended by repeating its head to a multiple of W, so every
    rank runs as many steps (DDP training needs that); without it ranks may differ by one item
    (evaluation, where torchmetrics adds up the ranks' sums). After ``skip(epoch, n)`` the next pass over
    ``epoch`` drops the first n items of the full order once: what the interrupted epoch had done.
    ``ranks`` returns (rank, world size).
    """

    def __init__(
        self,
        sampler: Sampler[Any] | range,
        epoch_source: Callable[[], int],
        ranks: Callable[[], tuple[int, int]],
        pad: bool,
    ) -> None:
        self.sampler, self.epoch_source, self.ranks, self.pad = sampler, epoch_source, ranks, pad
        self._skip: tuple[int, int] | None = None

    def skip(self, epoch: int, items: int) -> None:
        self._skip = (epoch, items)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        rank, world = self.ranks()
        n = len(self.sampler)  # type: ignore[arg-type]
        return math.ceil(n / world) if self.pad else len(range(rank, n, world))

    def __iter__(self) -> Iterator[Any]:
        rank, world = self.ranks()
        if world == 1 and self._skip is None:
            return iter(self.sampler)
        items = list(self.sampler)
        if self.pad and len(items) % world:
            items += (items * world)[: world - len(items) % world]
        if self._skip is not None:
            epoch, count = self._skip
            self._skip = None  # once: the epochs after it run in full
            if epoch == self.epoch_source():
                items = items[count:]
        return iter(items[rank::world])


class ResumableLoader(DataLoader):
    """A DataLoader whose checkpointed state is (epoch, samples of it already trained on, over all ranks).

    ``progress`` returns that pair from the trainer when a checkpoint is written; ``resume`` receives it
    back (the datamodule hands it to its ShardedSampler, which skips them before taking its rank's share).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        progress: Callable[[], tuple[int, int]],
        resume: Callable[[int, int], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.progress, self.resume = progress, resume

    def state_dict(self) -> dict[str, int]:
        epoch, samples = self.progress()
        return {"epoch": int(epoch), "samples_done": int(samples)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume(int(state_dict["epoch"]), int(state_dict["samples_done"]))
