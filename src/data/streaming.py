"""``data=streaming``: train on LitData shards (src.data.shards, written by ``python -m src.optimize``) in a
local folder or object storage, without the images on a local disk.

- Training epochs on images stream through LitData's ``StreamingDataLoader``: its chunk-aware shuffle (the
  shards are read in large sequential pieces, never one random image at a time from the bucket), its own
  split between ranks and workers, and its own state in the checkpoint, so a run stopped mid-epoch resumes
  at the next batch. Augmentation is seeded from (seed, epoch, item) as for folders: a resumed epoch is the
  same epoch.
- Everything that reads a split in order (the feature cache's embedding passes, validation, test) reads the
  same shards item by item: the feature cache keys items by the SHA-256 stored with them, so a streamed set
  shares cached features with the folder it was written from and embeds only what is new.
- The listing, split and preflight (unusable files, copies across splits) happened when the shards were
  written; their findings travel in dataset.json and land in the run folder as for folders.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from litdata import StreamingDataLoader, StreamingDataset  # noqa: E402  (imported only by streaming runs)
from torch.utils.data import DataLoader, Dataset

from src.data.datamodule import ImageFolderDataModule, WorkerInit, format_counts
from src.data.duplicates import Pair
from src.data.listing import class_counts
from src.data.seeding import mix, torch_seeded
from src.data.shards import is_remote, join, normalise_location, read_metadata
from src.utils.errors import ConfigError, DatasetError
from src.utils.lightning_compat import start_stream_epoch, stream_items

log = logging.getLogger(__name__)
# LitData's datasets are iterable and know their length per rank and worker: Lightning's caution does not apply
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


class ImageStream(StreamingDataset):
    """A split's shard items decoded and transformed: (image tensor, class index).

    Each item's bytes are hashed and its class compared with what dataset.json lists for its position: a
    damaged shard, or one out of step with its table, fails loudly instead of training on other pixels or
    the wrong label (and instead of storing their features under this image's key). ``augment_seed``: the
    transform draws under mix(seed, epoch, index), as SeededItems does for folders."""

    def __init__(
        self,
        location: str,
        expected: list[str],
        labels: list[int],
        paths: list[str],
        transform: Callable,
        loader: Callable,
        augment_seed: int | None,
        options: dict[str, Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(
            location,
            cache_dir=options["cache_dir"] if is_remote(location) else None,
            max_cache_size=f"{options['max_cache_gb']}GB",
            storage_options=options.get("storage_options") or {},
            **kwargs,
        )
        self.location, self.expected, self.labels, self.paths = location, expected, labels, paths
        # not .transform: StreamingDataset applies its own ``transform`` attribute to raw items
        self.image_transform, self.decode, self.augment_seed = transform, loader, augment_seed

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, int]:
        i = index if isinstance(index, int) else index.index
        where = f"{self.location}: item {i} ({self.paths[i] if 0 <= i < len(self.paths) else 'beyond the table'})"
        try:
            item = super().__getitem__(index)
        except Exception as err:  # a truncated or damaged chunk, a download that failed
            raise DatasetError(f"{where} could not be read ({err}); write the shards again with src.optimize.") from err
        # the bytes themselves, not the digest stored beside them: a damaged chunk (or a writer of the bucket)
        # must not put other pixels under this image's key in the feature cache, which folder runs share
        if hashlib.sha256(item["image"]).hexdigest() != self.expected[i] or int(item["label"]) != self.labels[i]:
            raise DatasetError(
                f"{where} is not what dataset.json lists (its SHA-256 or class differs): the shards are damaged or "
                "out of step with their table; write them again with src.optimize."
            )
        try:
            image = self.decode(io.BytesIO(item["image"]))
        except Exception as err:
            raise DatasetError(f"{where} does not decode: {err}") from err
        if self.augment_seed is None:
            return self.image_transform(image), self.labels[i]
        with torch_seeded(mix(self.augment_seed, self.current_epoch, i)):
            return self.image_transform(image), self.labels[i]


class StreamedSplit(Dataset):
    """A split's shards as a map-style dataset with ImageList's attributes (``samples``, ``targets``,
    ``classes``, ``transform``, ``loader``): item i is read from its shard (from object storage, downloaded
    into the cache once). In-order reads walk the shards sequentially; ``stream`` gives the iterable the
    streaming loaders use."""

    def __init__(
        self,
        location: str,
        samples: list[tuple[str, int]],
        digests: list[str],
        classes: list[str],
        transform: Callable,
        loader: Callable,
        options: dict[str, Any],
    ) -> None:
        self.location, self.options = location, options
        self.samples, self.digests = list(samples), list(digests)
        self.imgs, self.targets = self.samples, [c for _, c in self.samples]
        self.classes, self.class_to_idx = list(classes), {c: i for i, c in enumerate(classes)}
        self.transform, self.loader = transform, loader
        self._reader: ImageStream | None = None  # made in the process that reads (each worker has its own)

    def stream(self, shuffle: bool, seed: int | None, drop_last: bool) -> ImageStream:
        """A fresh iterable over the shards; ``shuffle``: LitData's chunk-aware shuffle and seeded transforms."""
        return ImageStream(
            self.location,
            self.digests,
            self.targets,
            [p for p, _ in self.samples],
            self.transform,
            self.loader,
            seed if shuffle else None,
            self.options,
            shuffle=shuffle,
            seed=seed if seed is not None else 0,
            drop_last=drop_last,
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._reader is None:
            self._reader = self.stream(shuffle=False, seed=None, drop_last=False)
        return self._reader[int(index)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}


class EpochStreamingLoader(StreamingDataLoader):
    """LitData's loader with the run's epoch: each pass shuffles (and seeds its transforms) for the epoch the
    trainer is in, whether this loader is new, kept across epochs, or skipped in epochs served from cached
    features. A pass resumed from a checkpoint keeps the checkpoint's."""

    def __init__(self, dataset: ImageStream, epoch_source: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_source, self.resumed = epoch_source, False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self.resumed = True  # the next pass only: Lightning loads a checkpoint's loader state before it

    def __iter__(self) -> Any:
        start_stream_epoch(self, self.epoch_source(), self.resumed)
        self.resumed = False
        return super().__iter__()


class StreamingDataModule(ImageFolderDataModule):
    """The datamodule of ``data=streaming``: ImageFolderDataModule's transforms, loaders and bookkeeping over
    the splits of LitData shards at ``input_dir`` (a local folder, ``s3://...``, ``gs://...``, ...).

    The listing options of folders (``root``, ``labels``, ``split``, preflight policies) were applied when the
    shards were written: ``root``/``labels``/k-fold are refused here, the rest are ignored.
    """

    def __init__(
        self,
        input_dir: str | None,
        cache_dir: str | os.PathLike,
        max_cache_gb: float = 50.0,
        storage_options: dict[str, Any] | None = None,
        root: str | None = None,
        labels: str | None = None,
        split: dict[str, Any] | None = None,
        prepare: Any = None,
        sampler: str = "random",
        **kwargs: Any,
    ) -> None:
        if input_dir is None or str(input_dir) == "":
            raise DatasetError(
                "data.input_dir is not set: pass data.input_dir=/path/to/shards (or s3://bucket/prefix), a dataset "
                "written by `python -m src.optimize data.root=/path/to/images output_dir=...`."
            )
        if root is not None or labels is not None:
            raise ConfigError(
                "data=streaming reads data.input_dir (shards); data.root and data.labels describe image folders: "
                "give them to src.optimize when writing the shards, or use data=imagefolder."
            )
        if (split or {}).get("folds"):
            raise ConfigError(
                "data.split.folds: the split of streamed shards was made when they were written; k-fold needs the "
                "images listed per run: use data=imagefolder."
            )
        if sampler == "balanced":
            raise ConfigError(
                "data.sampler=balanced draws images at random, which streaming cannot do (it reads shards in "
                "large pieces); weight the loss instead: model.loss.class_weights=auto."
            )
        if not isinstance(max_cache_gb, int | float) or isinstance(max_cache_gb, bool) or max_cache_gb <= 0:
            raise ConfigError(f"data.max_cache_gb must be a number above 0, got {max_cache_gb!r}.")
        self.input_dir = normalise_location(str(input_dir))
        super().__init__(root=self.input_dir, sampler=sampler, **kwargs)
        self.stream_options = {
            "cache_dir": str(Path(cache_dir).expanduser().resolve()),
            "max_cache_gb": float(max_cache_gb),
            "storage_options": dict(storage_options or {}),
        }

    def prepare_data(self) -> None:
        """Nothing to create: the shards are written by src.optimize."""

    def setup(self, stage: str | None = None) -> None:
        """Read dataset.json (classes, items, the preflight's findings) and open each split's shards."""
        if self.datasets:
            return
        meta = read_metadata(self.input_dir, self.stream_options["cache_dir"], self.stream_options["storage_options"])
        self.classes = list(meta["classes"])
        self.layout, self.how = meta["layout"], f"{meta['how']}; streamed from {self.input_dir}"
        self.root = Path(meta["source"])  # paths stay those of the folder the shards were written from
        for split, rows in meta["items"].items():
            if not rows:
                continue
            samples = [(str(self.root / rel), int(label)) for rel, label, _ in rows]
            digests = [sha for _, _, sha in rows]
            self.digests.update({p: sha for (p, _), sha in zip(samples, digests, strict=True)})
            transform = self.train_transform if split == "train" else self.eval_transform
            location = join(self.input_dir, split)
            dataset = StreamedSplit(
                location, samples, digests, self.classes, transform, self.loader, self.stream_options
            )
            try:
                shards = stream_items(dataset.stream(shuffle=False, seed=None, drop_last=False))
            except Exception as err:  # no index.json, an unreadable one, a bucket out of reach
                raise DatasetError(
                    f"Could not open the shards at {location} ({err}); write them again with src.optimize."
                ) from err
            if shards != len(samples):
                raise DatasetError(
                    f"{location} holds {shards} items but dataset.json lists {len(samples)}: the shards are "
                    "incomplete or were rewritten since; write them again with src.optimize."
                )
            self.datasets[split] = dataset
        if "train" not in self.datasets or "val" not in self.datasets:
            raise DatasetError(
                f"{self.input_dir} has no train or no val split; write the shards again with src.optimize."
            )
        self.skipped = [tuple(row) for row in meta.get("skipped", [])]
        self.duplicates = [Pair(*row) for row in meta.get("duplicates", [])]
        self.fingerprint = meta["fingerprint"]
        self.class_counts = class_counts(self.datasets)
        log.info("Data %s: %s", self.input_dir, self.how)
        log.info("Dataset %s: %d classes\n%s", self.input_dir, len(self.classes), format_counts(self.class_counts))
        if self.duplicates:
            log.warning(
                "%d pairs of images in different splits are copies (found when the shards were written): listed in "
                "the run folder's duplicates.csv.",
                len(self.duplicates),
            )
        self.check_usable()
        self.warn_imbalance()

    def _image_split_loader(self, split: str, shuffle: bool) -> DataLoader:
        """LitData's loader over the split's shards: chunk-aware shuffle and seeded transforms when training,
        in order otherwise; it splits the items between ranks and workers itself."""
        dataset = self.datasets[split]
        assert isinstance(dataset, StreamedSplit)
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")  # null: random
        stream = dataset.stream(shuffle=shuffle, seed=seed, drop_last=shuffle and self._ranks()[1] > 1)
        rank = self._ranks()[0]
        return EpochStreamingLoader(
            stream,
            self._trainer_epoch,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=WorkerInit(rank) if self.num_workers > 0 else None,
            persistent_workers=False,  # a pass's workers hold that pass's epoch
            generator=torch.Generator().manual_seed(seed),  # starting a pass draws nothing from the global RNG
        )
