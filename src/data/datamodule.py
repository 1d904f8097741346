"""LightningDataModule over a folder of images: split folders, one folder of class folders, or a label CSV
(src.data.listing), with the recipe's transforms, preflight checks and seeded, resumable sampling."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from lightning.fabric.utilities.data import suggested_max_num_workers
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler
from torchvision import transforms as T

from src.data.duplicates import NearRule, Pair, cached_duplicates
from src.data.images import RGBLoader
from src.data.listing import ImageList, SplitOptions, class_counts, list_images, relative, split_rows
from src.data.preflight import drop_samples, scan
from src.data.resumable import ResumableLoader, ShardedSampler
from src.data.seeding import EpochSampler, SeededItems
from src.utils.errors import ConfigError, DatasetError
from src.utils.io import json_digest
from src.utils.lightning_compat import batches_done_this_epoch, sampler_epoch
from src.utils.processes import start_worker

log = logging.getLogger(__name__)


Served = tuple[Dataset, Sampler | None, int]  # a split's precomputed features: dataset, sampler, batch size


def default_num_workers() -> int:
    """Decoding workers when data.num_workers is null: Lightning's suggestion (the CPUs this process may use,
    less one for the main process, at least 1), at most 8."""
    return min(suggested_max_num_workers(1), 8)


class ImageFolderDataModule(LightningDataModule):
    """Train/val(/test) ImageFolder datasets with the recipe's transforms and matching class folders.

    ``train_transforms`` and ``eval_transforms`` are the PIL-level steps (crops, flips, rotations);
    ToTensor and Normalize(mean, std) are appended here, with mean/std handed in from the backbone.
    ``prepare``, when given, is called with ``root`` to create or download the data when it is absent.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        train_transforms: Sequence[Callable],
        eval_transforms: Sequence[Callable],
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        splits: dict[str, str] | None = None,
        prepare: Callable[[Path], None] | None = None,
        decode_min_side: int | None = None,
        seed: int | None = None,
        bad_files: str = "skip",
        max_bad_fraction: float = 0.05,
        duplicates: str = "warn",
        preflight_cache_dir: str | os.PathLike | None = None,
        labels: str | None = None,
        split: dict[str, Any] | None = None,
        sampler: str = "random",
        near_duplicates: dict[str, Any] | None = None,
        imbalance_warn_ratio: float = 3.0,
    ) -> None:
        super().__init__()
        if root is None or str(root) == "":
            raise DatasetError(
                "data.root is not set: pass data.root=/path/to/dataset: train/ and val/ folders (test/ optional) "
                "each holding one folder per class, or one folder of class folders, or images with data.labels=<csv>."
            )
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"data.{key} must be a whole number of at least 1, got {value!r}.")
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
            raise ConfigError(f"data.num_workers must be 0 or more (null: one per CPU), got {num_workers!r}.")
        self.root = Path(root).expanduser().resolve()  # absolute: cache keys and logs name the same files
        self.splits = {"train": "train", "val": "val", "test": "test", **(splits or {})}
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prepare = prepare
        self.seed = seed  # set: shuffling and augmentation follow (seed, epoch, index) — resumable exactly
        if bad_files not in ("skip", "error"):
            raise ConfigError(f"data.bad_files must be skip or error, got {bad_files!r}.")
        self.bad_files, self.max_bad_fraction = bad_files, float(max_bad_fraction)
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be within [0, 1], got {max_bad_fraction}.")
        if duplicates not in ("warn", "error"):
            raise ConfigError(f"data.duplicates must be warn or error, got {duplicates!r}.")
        self.duplicates_policy = duplicates
        self.duplicates: list[Pair] = []  # exact and near copies in different splits
        self.near_rule = near_rule(near_duplicates or {})
        self.labels = labels
        split = {"seed": seed, **(split or {})}
        split["seed"] = 0 if split["seed"] is None else split["seed"]  # a split stays put without a run seed
        unknown = sorted(set(split) - {"seed", "val", "test", "folds", "fold"})
        if unknown:
            raise ConfigError(f"data.split takes seed, val, test, folds and fold; not {', '.join(unknown)}.")
        self.split_options = SplitOptions(**split)
        if sampler not in ("random", "balanced"):
            raise ConfigError(f"data.sampler must be random or balanced, got {sampler!r}.")
        self.sampler = sampler
        self.imbalance_warn_ratio = float(imbalance_warn_ratio)
        self.layout, self.how = "", ""  # folders | flat | csv, and where the splits came from, once set up
        self.digests: dict[str, str] = {}  # path -> SHA-256 of its bytes (the preflight's): feature cache keys
        self.signatures: dict[str, str] = {}  # path -> pHash and colour thumbnail (near-duplicates)
        self.class_counts: dict[str, dict[str, int]] = {}  # split -> class -> usable images
        self.preflight_cache_dir = preflight_cache_dir
        self.skipped: list[tuple[str, str, str]] = []  # (split, path, reason) of files left out by preflight
        self.fingerprint: str | None = None  # of the images used: a resume checks it (data_fingerprint)
        self.loader = RGBLoader(decode_min_side)
        self.mean, self.std = list(mean), list(std)
        normalize = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        self.train_transform = T.Compose([*train_transforms, *normalize])
        self.eval_transform = T.Compose([*eval_transforms, *normalize])
        self.datasets: dict[str, ImageList] = {}
        self.classes: list[str] = []
        # split -> source(epoch): the precomputed features that replace its images that epoch, or None
        self.feature_sets: dict[str, Callable[[int], Served | None]] = {}
        self.image_loaders: dict[str, DataLoader] = {}

    # --------------------------------------------------------------------------------------- preparing

    def prepare_data(self) -> None:
        """Create or download the dataset when ``prepare`` is set and the root is absent.

        One process at a time, whatever launched them (DDP ranks, torchrun, SLURM tasks, sweep jobs): a file
        lock beside the root; the first prepares, the others wait on the lock and then find the data there.
        """
        if self.prepare is None:
            return
        with self._prepare_lock():
            self.prepare(self.root)

    @contextmanager
    def _prepare_lock(self) -> Iterator[None]:
        """Hold the lock beside an absent root; none beside an existing root (ready, or the prepare step's own
        business: no lock file in a user's folder) or where nothing can be written (nothing races there)."""
        if self.root.exists():
            yield
            return
        lock = FileLock(self.root.parent / f".{self.root.name}.prepare.lock")
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except OSError:
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def setup(self, stage: str | None = None) -> None:
        """List the images (any layout), split what is unsplit, preflight them, and build the datasets."""
        if self.datasets:
            return
        listing = list_images(self.root, self.splits, self.labels, self.split_options)
        self.layout, self.how = listing.layout, listing.how
        for split, samples in listing.samples.items():
            transform = self.train_transform if split == "train" else self.eval_transform
            self.datasets[split] = ImageList(str(self.root), samples, listing.classes, transform, self.loader)
        log.info("Data %s: %s", self.root, listing.how)
        self.preflight(listing.ignored)
        self.classes = list(listing.classes)
        self.class_counts = class_counts(self.datasets)
        log.info("Dataset %s: %d classes\n%s", self.root, len(self.classes), format_counts(self.class_counts))
        self.check_usable()
        self.warn_imbalance()
        warn_look_alike_classes(self.classes)
        missing = [c for c, n in self.class_counts["val"].items() if n == 0]
        if missing:
            log.warning("No validation image for classes %s: their scores are not measured.", missing)

    def check_usable(self) -> None:
        """Once unusable files are dropped: every class has training images and val has some."""
        untrained = [c for c, n in self.class_counts["train"].items() if n == 0]
        if untrained:
            folds = self.split_options.folds
            why = (
                f"fewer images than data.split.folds={folds} leaves a fold with none to train on"
                if folds
                else "every one of their files was unusable or held out"
            )
            raise DatasetError(
                f"Classes with no training image: {untrained} ({why}). Add images, fix the files listed above, "
                "or leave these classes out; nothing was trained."
            )
        if not any(self.class_counts["val"].values()):
            raise DatasetError("No usable validation image (every val file was unusable); nothing was trained.")

    def warn_imbalance(self) -> None:
        """Say so when the largest training class has more than ``imbalance_warn_ratio`` times the smallest."""
        counts = self.class_counts["train"]
        small, large = min(counts.values()), max(counts.values())
        if small and large / small <= self.imbalance_warn_ratio:
            return
        ratio = f"{large / small:.1f}x" if small else "some classes have none"
        log.warning(
            "Classes are imbalanced in train (largest/smallest: %s). Options: model.loss.class_weights=auto "
            "(weight the loss by inverse class frequency), data.sampler=balanced (draw classes equally), and "
            "callbacks.model_checkpoint.monitor=val/macro_f1 callbacks.model_checkpoint.mode=max (keep the "
            "best macro-F1). Accuracy flatters the large classes: macro-F1 and balanced accuracy are logged too.",
            ratio,
        )

    def split_rows(self) -> list[tuple[str, str, str]]:
        """(path under root, label, split) of every image used: split.csv."""
        return split_rows(self.root, self.datasets)

    def split_summary(self) -> dict[str, Any]:
        """Where the splits came from, for summary.json (sweeps group k-fold jobs by it)."""
        opts = self.split_options
        return {"layout": self.layout, "how": self.how, "folds": opts.folds, "fold": opts.fold if opts.folds else None}

    def sample_weights(self) -> torch.Tensor | None:
        """Per training image, the chance the balanced sampler draws it (1 / its class's count); None: random."""
        if self.sampler != "balanced":
            return None
        targets = torch.tensor(self.datasets["train"].targets)
        counts = torch.bincount(targets, minlength=len(self.classes)).clamp(min=1)
        return 1.0 / counts[targets].double()

    def state_dict(self) -> dict[str, Any]:
        """The held-out images (path under root, label, SHA-256) of this run, kept in its checkpoints: src.eval
        evaluates exactly these, and refuses files whose content changed since."""
        held = {
            split: sorted([relative(self.root, p), self.classes[c], self.digests.get(p, "")] for p, c in ds.samples)
            for split, ds in self.datasets.items()
            if split != "train"
        }
        return {"layout": self.layout, "held_out": held}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the split comes from the data and config (a resume checks the data itself)."""

    def preflight(self, ignored: list[tuple[str, str, str]]) -> None:
        """Decode every image once; skip the bad ones (listed in ``skipped``) or stop, per ``bad_files``;
        then look for copies across splits."""
        paths = [p for ds in self.datasets.values() for p, _ in ds.samples]
        bad, self.digests, self.signatures = scan(paths, max(1, self.num_workers), self.preflight_cache_dir)
        usable = {split: [p for p, _ in ds.samples if p not in bad] for split, ds in self.datasets.items()}
        self.check_duplicates(usable)
        self.fingerprint = data_fingerprint(self.root, self.datasets, self.digests, bad)
        self.skipped = list(ignored)  # a copy: the unusable files are added below
        if ignored:
            log.info(
                "Ignoring %d files that are not images by their extension (listed in skipped_files.csv)", len(ignored)
            )
        if not bad:
            return
        self.skipped += [(split, p, bad[p]) for split, ds in self.datasets.items() for p, _ in ds.samples if p in bad]
        unusable = self.skipped[len(ignored) :]
        listing = "\n".join(f"  {split}: {p}: {reason}" for split, p, reason in unusable[:50])
        more = f"\n  ... and {len(unusable) - 50} more" if len(unusable) > 50 else ""
        fraction = len(bad) / len(paths)
        if self.bad_files == "error" or fraction > self.max_bad_fraction:
            why = (
                "data.bad_files=error"
                if self.bad_files == "error"
                else f"{fraction:.1%} of the images, above data.max_bad_fraction={self.max_bad_fraction:.0%}"
            )
            raise DatasetError(f"{len(bad)} unusable image files ({why}); nothing was trained:\n{listing}{more}")
        for ds in self.datasets.values():
            drop_samples(ds, bad)
        log.warning("Skipping %d unusable image files (%.1f%%):\n%s%s", len(bad), 100 * fraction, listing, more)

    def check_duplicates(self, files: dict[str, list[str]]) -> None:
        """Warn about (or, with duplicates=error, stop on) copies in different splits: leakage. Exact by
        SHA-256; near (resized, re-encoded) by perceptual hash and colour."""
        self.duplicates = cached_duplicates(
            files, self.digests, self.signatures, self.near_rule, self.preflight_cache_dir
        )
        if not self.duplicates:
            return
        listing = "\n".join(
            f"  {q.kind} ({q.similarity:.2f}): {q.split_a}:{q.path_a} = {q.split_b}:{q.path_b}"
            for q in self.duplicates[:20]
        )
        more = f"\n  ... and {len(self.duplicates) - 20} more" if len(self.duplicates) > 20 else ""
        message = (
            f"{len(self.duplicates)} pairs of images in different splits are copies (exact: same bytes; near: "
            f"resized or re-encoded): validation scores on them are not honest:\n{listing}{more}"
        )
        if self.duplicates_policy == "error":
            raise DatasetError(f"{message}\nRemove the copies, or set data.duplicates=warn; nothing was trained.")
        log.warning("%s\nThey are listed in the run folder's duplicates.csv.", message)

    # ------------------------------------------------------------------------------------------ loaders

    def use_features(self, split: str, source: Callable[[int], Served | None]) -> None:
        """Serve ``split`` from precomputed features (no decoding workers) in the epochs where ``source(epoch)``
        gives (dataset, sampler or None, batch size); from images in the others. The image loader is then
        built once and kept (Lightning asks for loaders every epoch when what they serve may change)."""
        self.feature_sets[split] = source

    def features_for(self, split: str) -> Served | None:
        """What ``split`` is served from this epoch: (features, sampler, batch size), or None (images)."""
        source = self.feature_sets.get(split)
        return source(self._trainer_epoch()) if source is not None else None

    def image_loader(self, split: str, batch_size: int, dataset: Dataset | None = None) -> DataLoader:
        """A one-off, in-order loader over a split's images with its own transform (for embedding), or over
        ``dataset`` (some of them)."""
        options = self._worker_options(seed_workers=False)
        options.pop("persistent_workers")  # one pass only
        return DataLoader(self.datasets[split] if dataset is None else dataset, batch_size=batch_size, **options)

    def _worker_options(self, seed_workers: bool) -> dict[str, Any]:
        """Decoding workers that die with this process; ``seed_workers``: Lightning's per-worker seeding too."""
        rank = self._ranks()[0] if seed_workers else None
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory,
            "worker_init_fn": WorkerInit(rank) if self.num_workers > 0 else None,
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Training: the seeded epoch order, this rank's share of it, resumable mid-epoch. Evaluation: in
        order; with several processes each takes every W-th item (Lightning's own distributed sampler is off
        in conf/trainer/ddp.yaml: it would reshuffle the seeded order and pad evaluation sets)."""
        served = self.features_for(split)
        if served is not None:  # no generator: see src.callbacks.rng_state for their one draw an epoch
            return self._serve(*served, shuffle, {})
        if split not in self.feature_sets:
            return self._image_split_loader(split, shuffle)
        if split not in self.image_loaders:  # images in this epoch, features in others: one image loader, kept
            self.image_loaders[split] = self._image_split_loader(split, shuffle)
        return self.image_loaders[split]

    def _image_split_loader(self, split: str, shuffle: bool) -> DataLoader:
        """A split's images through its transform, decoded by workers; training: seeded order and augmentation."""
        dataset: Dataset = self.datasets[split]
        sampler: Sampler | None = None
        batch_size = self.batch_size if split == "train" else self.eval_batch_size
        options = self._worker_options(seed_workers=True)
        if self.seed is not None:
            # own generator: creating the loader draws nothing from the global RNG (dropout's)
            options["generator"] = torch.Generator().manual_seed(self.seed)
            if shuffle:
                sampler = EpochSampler(
                    len(dataset), self.seed, epoch_source=self._trainer_epoch, weights=self.sample_weights()
                )
                dataset = SeededItems(dataset, self.seed)
        return self._serve(dataset, sampler, batch_size, shuffle, options)

    def _serve(
        self, dataset: Dataset, sampler: Sampler | None, batch_size: int, shuffle: bool, options: dict[str, Any]
    ) -> DataLoader:
        """The loader over ``dataset``: resumable and sharded by rank when training, sharded when evaluating."""
        rank, world = self._ranks()
        if shuffle and sampler is None and self.sampler == "balanced":  # no seed: torch's own weighted draws
            sampler, shuffle = WeightedRandomSampler(self.sample_weights(), len(dataset), replacement=True), False
        if shuffle and sampler is None and world > 1:
            raise ConfigError("Training on several processes needs a seed (seed=42): every rank must shuffle alike.")
        if shuffle and sampler is not None:
            return self._resumable(dataset, sampler, batch_size, **options)
        if not shuffle and world > 1:
            sampler = ShardedSampler(range(len(dataset)), self._trainer_epoch, self._ranks, pad=False)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, **options)

    def _ranks(self) -> tuple[int, int]:
        """(global rank, world size) of this process in the trainer's run; (0, 1) without one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _resumable(self, dataset: Dataset, sampler: Sampler, batch_size: int, **options: Any) -> ResumableLoader:
        """The training loader: this rank's share of the epoch order; Lightning resumes it mid-epoch (after a
        SIGTERM checkpoint) by skipping the samples all ranks had already trained on."""
        shard = ShardedSampler(sampler, self._trainer_epoch, self._ranks, pad=True)

        def progress() -> tuple[int, int]:  # (epoch, samples trained on in it, over all ranks)
            if self.trainer is None:
                return 0, 0
            batches = batches_done_this_epoch(self.trainer)
            return sampler_epoch(self.trainer), batches * batch_size * self.trainer.world_size

        return ResumableLoader(
            dataset, sampler=shard, batch_size=batch_size, progress=progress, resume=shard.skip, **options
        )

    def _trainer_epoch(self) -> int:
        return sampler_epoch(self.trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)


def near_rule(settings: dict[str, Any]) -> NearRule:
    """data.near_duplicates checked: pHash bits 0..31 (null: exact copies only), colour difference >= 0."""
    unknown = sorted(set(settings) - {"max_hash_distance", "max_colour_difference"})
    if unknown:
        raise ConfigError(
            f"data.near_duplicates takes max_hash_distance and max_colour_difference; not {', '.join(unknown)}."
        )
    rule = NearRule(**settings)
    bits, colour = rule.max_hash_distance, rule.max_colour_difference
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits < 32):
        raise ConfigError(
            f"data.near_duplicates.max_hash_distance must be 0..31 bits (null: exact copies only), got {bits!r}."
        )
    if colour is not None and (isinstance(colour, bool) or not isinstance(colour, int | float) or not 0 <= colour):
        raise ConfigError(
            f"data.near_duplicates.max_colour_difference must be a number >= 0 (of 255; null: not compared), got "
            f"{colour!r}."
        )
    return rule


class WorkerInit:
    """A decoding worker's first act: die with its parent (a killed run leaves no worker behind); then, for
    the loaders Lightning manages, the per-worker seeding Lightning adds itself when no init function is set
    (``seed_everything(workers=True)``)."""

    def __init__(self, rank: int | None) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        start_worker()
        if self.rank is not None and os.environ.get("PL_SEED_WORKERS") == "1":
            pl_worker_init_function(worker_id, rank=self.rank)


def warn_look_alike_classes(classes: list[str]) -> None:
    """Say so when class names differ only in case, spaces or separators ("bees", "Bees", "bees "): they train as
    different classes, which is rarely what the labels meant."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        groups.setdefault("".join(ch for ch in name.casefold() if ch.isalnum()), []).append(name)
    alike = [names for names in groups.values() if len(names) > 1]
    if alike:
        log.warning(
            "Class names that differ only in case, spaces or punctuation train as separate classes: %s. Rename the "
            "folders (or fix the label file) if each group is one class.",
            "; ".join(" / ".join(repr(n) for n in names) for names in alike),
        )


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    """A table of images per class (rows) and split (columns)."""
    splits = list(counts)
    classes = list(next(iter(counts.values()))) if counts else []
    width = max([len(c) for c in classes] + [5])
    lines = [f"  {'class':<{width}} " + " ".join(f"{s:>7}" for s in splits)]
    lines += [f"  {c:<{width}} " + " ".join(f"{counts[s].get(c, 0):>7}" for s in splits) for c in classes]
    lines.append(f"  {'total':<{width}} " + " ".join(f"{sum(counts[s].values()):>7}" for s in splits))
    return "\n".join(lines)


def data_fingerprint(root: Path, datasets: dict[str, ImageList], digests: dict[str, str], bad: dict[str, str]) -> str:
    """SHA-256 over (split, path under root, class, content SHA-256) of every usable image: what a run
    trained and validated on, independent of where the dataset folder sits."""
    rows = sorted(
        (split, os.path.relpath(p, root), ds.classes[c], digests.get(p, ""))
        for split, ds in datasets.items()
        for p, c in ds.samples
        if p not in bad
    )
    return json_digest(rows)
