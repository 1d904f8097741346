"""Which images a run uses, with which labels, in which split: the three layouts a dataset comes in.

- split folders: ``root/train/<class>/*`` and ``root/val/<class>/*`` (``test/`` optional) — used as given;
  ``train/`` without ``val/``: val is split off train;
- one folder: ``root/<class>/*`` — split into train/val(/test);
- a label file: ``data.labels=labels.csv`` with columns ``path`` (relative to root), ``label`` and an
  optional ``split`` (used as given; without it the rows are split).

Splits are stratified and seeded: each class is ordered by a SHA-256 of (seed, relative path) and cut at
the fractions, so the listing order of the file system plays no part and adding k images to a class moves
at most k of its images across each cut. k-fold cuts the same order into K folds.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from src.data.preflight import hidden_class_folders, ignored_files, symlink_loops
from src.utils.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
LABEL_COLUMNS = ("path", "label", "split")
UNSPLIT = "(unsplit)"  # the split column of files listed before any split exists (ignored files)
LAYOUTS = (
    "data.root must hold one of: train/ and val/ folders (test/ optional) with one folder per class in each; "
    "class folders directly (split for you: data.split.val); or images with a label file (data.labels=labels.csv "
    "with columns path,label[,split])."
)


@dataclass(frozen=True)
class SplitOptions:
    """How unsplit images are split: fractions per class, or K folds with one held out."""

    seed: int = 0
    val: float = 0.2
    test: float = 0.0
    folds: int | None = None
    fold: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(
                f"data.split.seed must be a whole number (null: the run's seed, or 0), got {self.seed!r}."
            )
        if self.folds is None and self.fold != 0:
            raise ConfigError(f"data.split.fold={self.fold!r} needs data.split.folds (the number of folds), e.g. 5.")
        for key in ("val", "test"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ConfigError(f"data.split.{key} must be a fraction in [0, 1), got {value!r}.")
        if self.folds is None:
            if self.val + self.test >= 1:
                raise ConfigError(f"data.split.val + data.split.test must be below 1, got {self.val + self.test}.")
            return
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise ConfigError(f"data.split.folds must be a whole number of at least 2 (or null), got {self.folds!r}.")
        if isinstance(self.fold, bool) or not isinstance(self.fold, int) or not 0 <= self.fold < self.folds:
            raise ConfigError(f"data.split.fold must be one of 0..{self.folds - 1}, got {self.fold!r}.")

    def describe(self) -> str:
        if self.folds is not None:
            return f"fold {self.fold} of {self.folds} as val (seed {self.seed})"
        test = f", test {self.test:.0%}" if self.test else ""
        return f"val {self.val:.0%}{test} per class (seed {self.seed})"


@dataclass
class Listing:
    """The images of a run: ``samples[split]`` = [(absolute path, class index)], in a fixed order."""

    root: Path
    layout: str  # folders | flat | csv
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]
    ignored: list[tuple[str, str, str]] = field(default_factory=list)  # (split, path, reason)
    how: str = ""  # one line for the log: where the splits came from


class ImageList(Dataset):
    """(image, class index) pairs from a list of files: what ImageFolder is, for any listing.

    Keeps ImageFolder's attributes (``samples``, ``targets``, ``imgs``, ``classes``, ``class_to_idx``,
    ``root``), so the split-folder layout trains exactly as torchvision's ImageFolder would.
    """

    def __init__(
        self, root: str, samples: list[tuple[str, int]], classes: list[str], transform: Callable, loader: Callable
    ) -> None:
        self.root = root
        self.samples = list(samples)
        self.imgs, self.targets = self.samples, [c for _, c in self.samples]
        self.classes, self.class_to_idx = list(classes), {c: i for i, c in enumerate(classes)}
        self.transform, self.loader = transform, loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        return self.transform(self.loader(path)), target


def list_images(root: Path, folder_names: dict[str, str], labels: str | None, options: SplitOptions) -> Listing:
    """The run's images, labels and splits from whichever layout ``root`` has (see the module docstring)."""
    if not root.is_dir():
        raise DatasetError(f"data.root {root} does not exist or is not a folder.")
    if labels:
        listing = list_label_file(root, labels, options)
    else:
        folders = {s: root / folder_names[s] for s in SPLITS}
        present = [s for s in SPLITS if folders[s].is_dir()]
        if "train" in present:
            listing = list_split_folders(root, folders, present, options)
        elif present:
            raise DatasetError(f"{root} has {'/'.join(present)}/ but no {folder_names['train']}/. {LAYOUTS}")
        else:
            listing = list_class_folders(root, options)
    return listing  # classes left without training images are refused once the preflight has run


# ----------------------------------------------------------------------------------------------- folders


def check_folder_tree(root: Path, class_parents: list[Path]) -> None:
    """Stop on folder layouts that would be misread: symlink loops (an endless walk), hidden folders
    (extra classes)."""
    loops = symlink_loops(root)
    if loops:
        listing = "\n".join(f"  {link} -> {target}" for link, target in loops)
        raise DatasetError(
            f"Symlinked folders under {root} lead back to a folder above them (an endless walk):\n"
            f"{listing}\nRemove or replace these links."
        )
    hidden = hidden_class_folders(class_parents)
    if hidden:
        listing = "\n".join(f"  {h}" for h in hidden)
        raise DatasetError(
            f"Hidden folders would become classes:\n{listing}\nDelete them or move them out of the dataset "
            "(e.g. .ipynb_checkpoints left by Jupyter)."
        )


def folder_samples(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of one folder of class folders, exactly as torchvision's ImageFolder lists them."""
    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # no class folder, or a class folder with no image
        raise DatasetError(f"{folder}: {err}. {LAYOUTS}") from None
    return classes, samples


def list_split_folders(root: Path, folders: dict[str, Path], present: list[str], options: SplitOptions) -> Listing:
    check_folder_tree(root, [folders[s] for s in present])
    found = {s: folder_samples(folders[s]) for s in present}
    check_same_classes({s: classes for s, (classes, _) in found.items()})
    classes = found["train"][0]
    samples = {s: found[s][1] for s in present}
    ignored = [(s, p, why) for s in present for p, why in ignored_files(folders[s])]
    if "val" in samples and options.folds is None:
        return Listing(root, "folders", classes, samples, ignored, "splits: the train/val folders as given")
    pool = samples.pop("train") + samples.pop("val", [])
    test_given = "test" in samples
    opts = SplitOptions(options.seed, options.val, 0.0 if test_given else options.test, options.folds, options.fold)
    split = assign_splits(pool, lambda p: relative(root, p), opts)
    samples.update({s: [x for x, g in zip(pool, split, strict=True) if g == s] for s in SPLITS if s != "test"})
    if not test_given:
        samples["test"] = [x for x, g in zip(pool, split, strict=True) if g == "test"]
    what = "train/ and val/ merged" if "val" in found else "val split off train/"
    return Listing(root, "folders", classes, drop_empty(samples), ignored, f"splits: {what}, {opts.describe()}")


def list_class_folders(root: Path, options: SplitOptions) -> Listing:
    """One folder of class folders. Hidden folders (``.hydra``, ``.ipynb_checkpoints``) and folders with no
    image (a run's ``checkpoints/`` written beside the data) are not classes: they are named in the log."""
    check_folder_tree(root, [])
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    runs = [f for f in folders if (root / f / ".hydra").is_dir()]  # a run's output folder kept in the data
    classes = [f for f in folders if not f.startswith(".") and f not in runs and holds_images(root / f)]
    passed = [f for f in folders if f not in classes]
    if passed:
        log.info("Not classes (hidden, run folders, or no image inside): %s", ", ".join(f"{f}/" for f in passed))
    if not classes:
        raise DatasetError(f"{root} has no class folder with images. {LAYOUTS}")
    pool = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    split = assign_splits(pool, lambda p: relative(root, p), options)
    samples = {s: [x for x, g in zip(pool, split, strict=True) if g == s] for s in SPLITS}
    ignored = [(UNSPLIT, p, why) for p, why in ignored_files(root, classes)]
    how = f"splits: one folder of {len(classes)} class folders split for you, {options.describe()}"
    return Listing(root, "flat", classes, drop_empty(samples), ignored, how)


def holds_images(folder: Path) -> bool:
    """True when an image file (by ImageFolder's extensions) lies anywhere under ``folder``."""
    for _, _, files in os.walk(folder, followlinks=True):  # loops were refused before
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def check_same_classes(classes: dict[str, list[str]]) -> None:
    """Raise DatasetError naming the differing class folders when splits disagree, or when a class name
    can't be used as one.

    Plain ImageFolder numbers classes per split, so a missing folder silently shifts every label. A name
    with a line break or another control character would break labels.txt and every CSV a line per class;
    two names that differ only in Unicode normalization (NFC vs NFD, as macOS and Linux write "café") look
    identical but are different folders.
    """
    for split, names in classes.items():
        check_class_names(names, f"Class folder names in {split}")
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


def check_class_names(names: list[str], what: str) -> None:
    """No control characters (they break labels.txt and CSVs) and no two names alike but for Unicode form."""
    odd = [n for n in names if any(unicodedata.category(ch) == "Cc" for ch in n)]
    if odd:
        raise DatasetError(
            f"{what} hold line breaks or other control characters: {[ascii(n) for n in odd]}. "
            "Rename them (the name becomes the class label)."
        )
    by_form: dict[str, list[str]] = {}
    for n in names:
        by_form.setdefault(unicodedata.normalize("NFC", n), []).append(n)
    twins = [[ascii(f) for f in forms] for forms in by_form.values() if len(forms) > 1]
    if twins:
        raise DatasetError(f"{what} differ only in Unicode normalization: {twins}. Merge each into one.")


# ---------------------------------------------------------------------------------------------- labels


def list_label_file(root: Path, labels: str, options: SplitOptions) -> Listing:
    """Images and labels from a CSV (columns path, label and an optional split); every problem named by row."""
    path = Path(labels).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        what = "is a folder, not a CSV file" if path.is_dir() else "does not exist"
        raise DatasetError(f"data.labels: {path} {what} (a path relative to data.root, or absolute).")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's byte-order mark is no column
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as CSV UTF-8."
        ) from None
    except csv.Error as err:
        raise DatasetError(f"{path} line {reader.line_num}: not a readable CSV row ({err}).") from None
    unknown = [h for h in header if h not in LABEL_COLUMNS]
    missing = [h for h in ("path", "label") if h not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise DatasetError(
            f"{path}: the header must name the columns path and label, and optionally split; it has {header} "
            f"(missing: {missing or 'none'}; unknown: {unknown or 'none'})."
        )
    col = {h: i for i, h in enumerate(header)}
    problems: list[str] = []
    entries: dict[str, tuple[int, str, str | None]] = {}  # relative path -> (line, label, split)
    for line, row in rows:
        cells = {h: (row[i].strip() if i < len(row) else "") for h, i in col.items()}
        if len(row) != len(header):
            problems.append(f"line {line}: {len(row)} cells, the header has {len(header)}")
            continue
        rel, label, split = cells["path"], cells["label"], cells.get("split")
        if not rel:
            problems.append(f"line {line}: empty path")
        elif not label:
            problems.append(f"line {line}: {rel}: empty label")
        elif split is not None and split not in SPLITS:
            problems.append(f"line {line}: {rel}: split {split!r} is not one of train, val, test")
        elif os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
            problems.append(f"line {line}: {rel}: paths must lie under data.root (relative, no ..)")
        else:
            rel = os.path.normpath(rel)
            if rel in entries and entries[rel][1:] != (label, split):
                first = entries[rel]
                what = "labels" if first[1] != label else "splits"
                before, now = (first[1], label) if what == "labels" else (first[2], split)
                problems.append(
                    f"line {line}: {rel} is listed twice with different {what}: {before!r} (line {first[0]}) "
                    f"and {now!r}"
                )
            elif rel not in entries:
                entries[rel] = (line, label, split)
    for rel, (line, _, _) in entries.items():
        where = root / rel
        if where.is_dir():
            problems.append(f"line {line}: {rel}: a folder, not an image file")
        elif not where.exists():
            problems.append(f"line {line}: {rel}: no such file" + (" (a dangling link)" if where.is_symlink() else ""))
    if problems:
        problems.sort(key=lambda p: int(p.split(":")[0].split()[1]))  # "line N: ...", in file order
        listing = "\n".join(f"  {p}" for p in problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise DatasetError(f"{path} has {len(problems)} problem rows; nothing was trained:\n{listing}{more}")
    if not entries:
        raise DatasetError(f"{path} lists no images.")
    classes = sorted({label for _, label, _ in entries.values()})
    check_class_names(classes, f"Labels in {path}")
    index = {c: i for i, c in enumerate(classes)}
    ordered = sorted(entries.items(), key=lambda kv: (index[kv[1][1]], kv[0]))  # like ImageFolder: class, path
    pool = [(str(root / rel), index[label]) for rel, (_, label, _) in ordered]
    given = [split for _, (_, _, split) in ordered]
    if "split" in col and options.folds is None:
        samples = {s: [x for x, g in zip(pool, given, strict=True) if g == s] for s in SPLITS}
        for need in ("train", "val"):
            if not samples[need]:
                raise DatasetError(f"{path}: no row has split {need}; a split column needs train and val rows.")
        return Listing(root, "csv", classes, drop_empty(samples), [], f"splits: the split column of {path.name}")
    held_test = [x for x, g in zip(pool, given, strict=True) if g == "test"]
    rest = [x for x, g in zip(pool, given, strict=True) if g != "test"]
    opts = options if not held_test else SplitOptions(options.seed, options.val, 0.0, options.folds, options.fold)
    split = assign_splits(rest, lambda p: relative(root, p), opts)
    samples = {s: [x for x, g in zip(rest, split, strict=True) if g == s] for s in SPLITS}
    samples["test"] = held_test or samples["test"]
    return Listing(root, "csv", classes, drop_empty(samples), [], f"splits: {path.name} rows, {opts.describe()}")


# ---------------------------------------------------------------------------------------------- splits


def relative(root: Path, path: str) -> str:
    """The path under root with / separators: what splits are hashed by and split.csv lists."""
    return Path(os.path.relpath(path, root)).as_posix()


def split_rank(seed: int, rel: str) -> str:
    """The position of an image within its class: a SHA-256 of (seed, relative path)."""
    return hashlib.sha256(f"{seed}\0{rel}".encode("utf-8", "surrogateescape")).hexdigest()


def assign_splits(pool: list[tuple[str, int]], rel: Callable[[str], str], options: SplitOptions) -> list[str]:
    """The split of each (path, class) in ``pool``: per class, ordered by ``split_rank`` and cut at the
    fractions (test first, then val), or into ``folds`` equal runs with fold ``fold`` as val."""
    by_class: dict[int, list[int]] = {}
    for i, (_, c) in enumerate(pool):
        by_class.setdefault(c, []).append(i)
    out = ["train"] * len(pool)
    for members in by_class.values():
        order = sorted(members, key=lambda i: split_rank(options.seed, rel(pool[i][0])))
        n = len(order)
        n_test = min(cut(n * options.test), max(n - 1, 0))
        for i in order[:n_test]:
            out[i] = "test"
        rest = order[n_test:]
        if options.folds is not None:
            k = options.folds
            lo, hi = cut(len(rest) * options.fold / k), cut(len(rest) * (options.fold + 1) / k)
            held = rest[lo:hi]
        else:
            held = rest[: min(cut(n * options.val), max(len(rest) - 1, 0))]
        for i in held:
            out[i] = "val"
    return out


def cut(x: float) -> int:
    """Round half up (Python's round() goes to even: 2.5 -> 2), so cuts move predictably with n."""
    return int(math.floor(x + 0.5))


def drop_empty(samples: dict[str, list[tuple[str, int]]]) -> dict[str, list[tuple[str, int]]]:
    """Splits with images only; train and val must have some."""
    out = {s: v for s, v in samples.items() if v}
    for need in ("train", "val"):
        if need not in out:
            raise DatasetError(
                f"The {need} split is empty: too few images to split (data.split.val, data.split.folds)."
            )
    return out


def split_rows(root: Path, datasets: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(path under root, label, split) of every image a run uses, sorted by path: split.csv's rows."""
    rows = [(relative(root, p), ds.classes[c], split) for split, ds in datasets.items() for p, c in ds.samples]
    return sorted(rows)


def class_counts(datasets: dict[str, Any]) -> dict[str, dict[str, int]]:
    """split -> class -> images."""
    counts = {}
    for split, ds in datasets.items():
        per_class = Counter(ds.targets)
        counts[split] = {name: per_class[i] for i, name in enumerate(ds.classes)}
    return counts
