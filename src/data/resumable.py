"""Training loaders that Lightning can resume mid-epoch (after a SIGTERM checkpoint) without replaying batches.

Lightning saves a loader's ``state_dict()`` in every checkpoint when the loader has one, and hands it back
through ``load_state_dict()`` when a run restarts inside an epoch. Here that state is (epoch, batches
done); the sampler underneath is seeded by epoch, so skipping the batches already trained on yields
exactly the rest of the interrupted epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from torch.utils.data import DataLoader, Sampler


class SkippingSampler(Sampler[Any]):
    """Wraps an epoch-seeded sampler; after ``skip(epoch, n)`` the next pass over ``epoch`` starts at item n."""

    def __init__(self, sampler: Sampler[Any], epoch_source: Callable[[], int]) -> None:
        self.sampler, self.epoch_source = sampler, epoch_source
        self._skip: tuple[int, int] | None = None

    def skip(self, epoch: int, items: int) -> None:
        self._skip = (epoch, items)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        items: Iterator[Any] = iter(self.sampler)
        if self._skip is not None:
            epoch, count = self._skip
            self._skip = None  # once: the epochs after it run in full
            if epoch == self.epoch_source() and count > 0:
                items = islice(items, count, None)
        return items


class ResumableLoader(DataLoader):
    """A DataLoader over a SkippingSampler whose state is (epoch, batches completed this epoch).

    ``progress`` returns that pair from the trainer when a checkpoint is written.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, SkippingSampler):
            raise TypeError("ResumableLoader needs a SkippingSampler")
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches_done": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        assert isinstance(self.sampler, SkippingSampler)
        self.sampler.skip(state_dict["epoch"], state_dict["batches_done"] * int(self.batch_size or 1))
