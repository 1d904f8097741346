"""LightningDataModule over an ImageFolder root with train/, val/ and optional test/ splits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from src.data.images import RGBLoader
from src.data.preflight import (
    cross_split_duplicates,
    drop_samples,
    hidden_class_folders,
    ignored_files,
    scan,
    symlink_loops,
)
from src.data.resumable import ResumableLoader, ShardedSampler
from src.data.seeding import EpochSampler, SeededItems
from src.utils.errors import ConfigError, DatasetError
from src.utils.processes import die_with_parent

log = logging.getLogger(__name__)


def default_num_workers() -> int:
    """Worker processes for decoding: one per CPU this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(0, min(cpus, 8))


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
    ) -> None:
        super().__init__()
        if root is None or str(root) == "":
            raise DatasetError(
                "data.root is not set: pass data.root=/path/to/dataset, an ImageFolder root with train/ and "
                "val/ folders (test/ optional), each holding one folder per class."
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
        self.duplicates: list[list[tuple[str, str]]] = []  # groups of identical (split, path) in different splits
        self.class_counts: dict[str, dict[str, int]] = {}  # split -> class -> usable images
        self.preflight_cache_dir = preflight_cache_dir
        self.skipped: list[tuple[str, str, str]] = []  # (split, path, reason) of files left out by preflight
        self.fingerprint: str | None = None  # of the images used: a resume checks it (data_fingerprint)
        self.loader = RGBLoader(decode_min_side)
        self.mean, self.std = list(mean), list(std)
        normalize = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        self.train_transform = T.Compose([*train_transforms, *normalize])
        self.eval_transform = T.Compose([*eval_transforms, *normalize])
        self.datasets: dict[str, ImageFolder] = {}
        self.classes: list[str] = []
        # split -> (dataset, sampler, batch size) of precomputed features that replace the images
        self.feature_sets: dict[str, tuple[Dataset, Sampler | None, int]] = {}

    # --------------------------------------------------------------------------------------- preparing

    def prepare_data(self) -> None:
        """Create or download the dataset when ``prepare`` is set and the root is absent."""
        if self.prepare is not None:
            self.prepare(self.root)

    def split_dir(self, split: str) -> Path:
        """Folder of a split (``train``, ``val``, ``test``)."""
        return self.root / self.splits[split]

    def has_split(self, split: str) -> bool:
        return self.split_dir(split).is_dir()

    def setup(self, stage: str | None = None) -> None:
        """Scan the splits once, check their classes agree, and build the datasets."""
        if self.datasets:
            return
        if not self.root.is_dir():
            raise DatasetError(f"data.root {self.root} does not exist or is not a folder.")
        for required in ("train", "val"):
            if not self.has_split(required):
                raise DatasetError(
                    f"{self.split_dir(required)} is missing: data.root must hold train/ and val/ folders "
                    "(test/ optional), each with one sub-folder per class."
                )
        present = [s for s in ("train", "val", "test") if self.has_split(s)]
        self.check_folders([self.split_dir(s) for s in present])
        try:
            classes = {s: find_classes(str(self.split_dir(s)))[0] for s in present}
        except FileNotFoundError as err:  # a split with no class folders at all
            raise DatasetError(f"{err}. Each split needs one sub-folder per class.") from None
        check_same_classes(classes)
        for split in present:
            transform = self.train_transform if split == "train" else self.eval_transform
            try:
                self.datasets[split] = ImageFolder(str(self.split_dir(split)), transform, loader=self.loader)
            except FileNotFoundError as err:
                raise DatasetError(f"{self.split_dir(split)}: {err}") from None
        self.preflight()
        self.classes = list(self.datasets["train"].classes)
        for split, ds in self.datasets.items():
            per_class = Counter(ds.targets)
            self.class_counts[split] = {name: per_class[i] for i, name in enumerate(ds.classes)}
        log.info("Dataset %s: %d classes\n%s", self.root, len(self.classes), format_counts(self.class_counts))

    def check_folders(self, split_dirs: list[Path]) -> None:
        """Stop on folder layouts ImageFolder would misread: symlink loops (an endless walk), hidden folders
        (extra classes)."""
        loops = symlink_loops(self.root)
        if loops:
            listing = "\n".join(f"  {link} -> {target}" for link, target in loops)
            raise DatasetError(
                f"Symlinked folders under {self.root} lead back to a folder above them (an endless walk):\n"
                f"{listing}\nRemove or replace these links."
            )
        hidden = hidden_class_folders(split_dirs)
        if hidden:
            listing = "\n".join(f"  {h}" for h in hidden)
            raise DatasetError(
                f"Hidden folders would become classes:\n{listing}\nDelete them or move them out of the dataset "
                "(e.g. .ipynb_checkpoints left by Jupyter)."
            )

    def preflight(self) -> None:
        """Decode every image once; skip the bad ones (listed in ``skipped``) or stop, per ``bad_files``."""
        paths = [p for ds in self.datasets.values() for p, _ in ds.samples]
        bad, digests = scan(paths, max(1, self.num_workers), self.preflight_cache_dir)
        usable = {split: [p for p, _ in ds.samples if p not in bad] for split, ds in self.datasets.items()}
        self.check_duplicates(usable, digests)
        self.fingerprint = data_fingerprint(self.root, self.datasets, digests, bad)
        ignored = [(split, p, why) for split, ds in self.datasets.items() for p, why in ignored_files(ds.root)]
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

    def check_duplicates(self, files: dict[str, list[str]], digests: dict[str, str]) -> None:
        """Warn about (or, with duplicates=error, stop on) identical files in different splits: leakage."""
        self.duplicates = cross_split_duplicates(files, digests)
        if not self.duplicates:
            return
        listing = "\n".join("  " + " = ".join(f"{s}:{p}" for s, p in group) for group in self.duplicates[:20])
        more = f"\n  ... and {len(self.duplicates) - 20} more" if len(self.duplicates) > 20 else ""
        message = (
            f"{len(self.duplicates)} images appear in more than one split (same bytes): validation scores "
            f"on them are not honest:\n{listing}{more}"
        )
        if self.duplicates_policy == "error":
            raise DatasetError(f"{message}\nRemove the copies, or set data.duplicates=warn; nothing was trained.")
        log.warning("%s\nThey are listed in the run folder's duplicates.csv.", message)

    # ------------------------------------------------------------------------------------------ loaders

    def use_features(self, split: str, dataset: Dataset, batch_size: int, sampler: Sampler | None = None) -> None:
        """Serve ``split`` from precomputed features (in memory, no workers) instead of decoding images."""
        self.feature_sets[split] = (dataset, sampler, batch_size)

    def image_loader(self, split: str, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
        """A one-off, in-order loader over a split's images with its own transform (for embedding).

        ``generator`` seeds the workers' random transforms, so an augmented pass is reproducible.
        """
        options = self._worker_options(seed_workers=False)
        options.pop("persistent_workers")  # one pass only
        return DataLoader(self.datasets[split], batch_size=batch_size, shuffle=False, generator=generator, **options)

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
        options: dict[str, Any] = {}
        if split in self.feature_sets:  # no generator: see src.callbacks.rng_state for their one draw an epoch
            dataset, sampler, batch_size = self.feature_sets[split]
        else:
            dataset, sampler = self.datasets[split], None
            batch_size = self.batch_size if split == "train" else self.eval_batch_size
            options = self._worker_options(seed_workers=True)
            if self.seed is not None:
                # own generator: creating the loader draws nothing from the global RNG (dropout's)
                options["generator"] = torch.Generator().manual_seed(self.seed)
                if shuffle:
                    sampler = EpochSampler(len(dataset), self.seed, epoch_source=self._trainer_epoch)
                    dataset = SeededItems(dataset, self.seed)
        rank, world = self._ranks()
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
            batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
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

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise DatasetError(f"{self.split_dir('test')} does not exist: this dataset has no test split.")
        return self._loader("test", shuffle=False)


class WorkerInit:
    """A decoding worker's first act: die with its parent (a killed run leaves no worker behind); then, for
    the loaders Lightning manages, the per-worker seeding Lightning adds itself when no init function is set
    (``seed_everything(workers=True)``)."""

    def __init__(self, rank: int | None) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        die_with_parent()
        if self.rank is not None and os.environ.get("PL_SEED_WORKERS") == "1":
            pl_worker_init_function(worker_id, rank=self.rank)


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    """A table of images per class (rows) and split (columns)."""
    splits = list(counts)
    classes = list(next(iter(counts.values()))) if counts else []
    width = max([len(c) for c in classes] + [5])
    lines = [f"  {'class':<{width}} " + " ".join(f"{s:>7}" for s in splits)]
    lines += [f"  {c:<{width}} " + " ".join(f"{counts[s].get(c, 0):>7}" for s in splits) for c in classes]
    lines.append(f"  {'total':<{width}} " + " ".join(f"{sum(counts[s].values()):>7}" for s in splits))
    return "\n".join(lines)


def check_same_classes(classes: dict[str, list[str]]) -> None:
    """Raise DatasetError naming the differing class folders when splits disagree, or when a class name
    can't be used as one.

    Plain ImageFolder numbers classes per split, so a missing folder silently shifts every label. A name
    with a line break or another control character would break labels.txt and every CSV a line per class;
    two names that differ only in Unicode normalization (NFC vs NFD, as macOS and Linux write "café") look
    identical but are different folders.
    """
    for split, names in classes.items():
        odd = [n for n in names if any(unicodedata.category(ch) == "Cc" for ch in n)]
        if odd:
            raise DatasetError(
                f"Class folder names in {split} hold line breaks or other control characters: "
                f"{[ascii(n) for n in odd]}. Rename these folders (the name becomes the class label)."
            )
        by_form: dict[str, list[str]] = {}
        for n in names:
            by_form.setdefault(unicodedata.normalize("NFC", n), []).append(n)
        twins = [forms for forms in by_form.values() if len(forms) > 1]
        if twins:
            listing = [[ascii(f) for f in t] for t in twins]
            raise DatasetError(
                f"Class folders in {split} differ only in Unicode normalization: {listing}. Merge each into one."
            )
    reference = classes["train"]
    for split, names in classes.items():
        if names == reference:
            continue
        only_train = sorted(set(reference) - set(names))
        only_here = sorted(set(names) - set(reference))
        nfc = [unicodedata.normalize("NFC", n) for n in reference]
        if sorted(nfc) == sorted(unicodedata.normalize("NFC", n) for n in names):
            pairs = [
                f"train {ascii(a)} vs {split} {ascii(b)}"
                for a in only_train
                for b in only_here
                if unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)
            ]
            raise DatasetError(
                f"Class folder names look the same in train and {split} but are written in different Unicode "
                f"forms (NFC vs NFD): {'; '.join(pairs)}. Rename them alike (e.g. with the same tool)."
            )
        raise DatasetError(
            f"Class folders differ between train and {split}: only in train: {only_train or 'none'}; "
            f"only in {split}: {only_here or 'none'}. Every split needs the same class folders."
        )


def data_fingerprint(root: Path, datasets: dict[str, ImageFolder], digests: dict[str, str], bad: dict[str, str]) -> str:
    """SHA-256 over (split, path under root, class, content SHA-256) of every usable image: what a run
    trained and validated on, independent of where the dataset folder sits."""
    rows = sorted(
        (split, os.path.relpath(p, root), ds.classes[c], digests.get(p, ""))
        for split, ds in datasets.items()
        for p, c in ds.samples
        if p not in bad
    )
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def sampler_epoch(trainer: Any) -> int:
    """The epoch Lightning's samplers are meant to see (what it passes to ``set_epoch``), 0 without a trainer.

    ``trainer.current_epoch`` lags by one when a run resumes from a checkpoint saved at an epoch's end.
    """
    return trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0
