"""Preflight: check the dataset before training and report what can't be used, and why.

- files that are not regular files (dangling links, FIFOs) listed without being opened;
- every image decoded once (parallel, cached by the file list): unreadable, truncated, zero-byte,
  non-image and decompression-bomb files;
- the same bytes in two splits (train/val leakage), by SHA-256; near-duplicates (resized, re-encoded
  copies) by a signature of the decoded image (pHash and colour thumbnail), computed in the same pass;
- hidden folders that ImageFolder would turn into classes, and symlinked folders that loop.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import stat
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import imagehash
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from src.data.images import load_rgb
from src.utils.errors import UserError
from src.utils.io import atomic_write, json_digest
from src.utils.processes import start_worker

log = logging.getLogger(__name__)
FORMAT = 4  # cache layout: bump when what a scan records changes
HASH_SIDE = 256  # images are reduced to about this short side before hashing: large photos hash fast
THUMB_SIDE = 8  # the colour thumbnail of a signature: 8 x 8 RGB


def image_problem(path: str) -> str | None:
    """Why ``path`` can't be used as an image, or None when the training loader decodes it completely."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return f"unreadable: {type(err).__name__}: {err}"
    return decode_problem(data)


class Scan(NamedTuple):
    """What a preflight scan found: {path: why unusable}, {path: SHA-256 of its bytes}, {path: ``signature``}."""

    bad: dict[str, str]
    digests: dict[str, str]
    signatures: dict[str, str]


def decode_problem(data: bytes) -> str | None:
    """Why these file bytes can't be used as an image, or None when the training loader decodes them."""
    return decode(data)[0]


def decode(data: bytes) -> tuple[str | None, Image.Image | None]:
    """(why these file bytes can't be used as an image, None) or (None, the decoded RGB image).

    The loader's own full decode (not ``verify()``, which misses truncation), with PIL's decompression-bomb
    warning as an error and truncated files never tolerated.
    """
    if not data:
        return "zero-byte file", None
    try:
        tolerate_truncation, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:  # another library may have switched it on for the whole process: truncation stays an error here
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = load_rgb(io.BytesIO(data))
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = tolerate_truncation
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"over PIL's decompression-bomb limit ({err})", None
    except UnidentifiedImageError:
        return "not an image PIL can identify", None
    except Exception as err:  # truncated, corrupt, unreadable: whatever a decoder raises on malformed bytes
        return f"unreadable: {type(err).__name__}: {err}", None
    return None, image


def signature(image: Image.Image) -> str:
    """What a near-duplicate looks like, as hex: a 64-bit pHash (imagehash: luminance structure) followed by
    an 8x8 RGB thumbnail (colour), see src.data.duplicates.

    Measured on hymenoptera (396 photos): copies resized to 50-70 % and saved at JPEG quality 40-60 differ
    by at most 2 pHash bits and 2.4/255 in the thumbnail; no two distinct photos by fewer than 14 bits.
    """
    factor = max(1, min(image.size) // HASH_SIDE)
    small = image.reduce(factor) if factor > 1 else image
    return str(imagehash.phash(small)) + small.resize((THUMB_SIDE, THUMB_SIDE), Image.BOX).tobytes().hex()


def signature_arrays(signatures: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N x 8 uint8 pHash bytes for vectorised Hamming distances, N x 192 float32 thumbnails)."""
    raw = np.frombuffer(b"".join(bytes.fromhex(s) for s in signatures), dtype=np.uint8).reshape(len(signatures), -1)
    return raw[:, :8], raw[:, 8:].astype(np.float32)


def ignored_files(split_dir: str | os.PathLike, classes: list[str] | None = None) -> list[tuple[str, str]]:
    """(path, reason) of every file under a split's class folders that ImageFolder passes over for its
    extension: the seed recipe (torchvision's ImageFolder) never trains on them, and now a user sees them.
    GIFs are among them (often animations, or placeholders such as hymenoptera's imageNotFound.gif).
    ``classes``: the class folders to look in (default: every folder not starting with a dot)."""
    found = []
    for class_dir in sorted(Path(split_dir).iterdir()):
        if not class_dir.is_dir() or class_dir.name.startswith(".") or (classes and class_dir.name not in classes):
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):  # loops were refused before
            dirnames.sort()
            found += [(os.path.join(dirpath, n), ignored_reason(n)) for n in sorted(filenames) if ignored_reason(n)]
    return found


def ignored_reason(name: str) -> str | None:
    """Why a file of this name is not read as an image (its extension), or None for an image type."""
    if name.lower().endswith(IMG_EXTENSIONS):
        return None
    ext = os.path.splitext(name)[1] or "no extension"
    return f"ignored: {ext} is not an image type ImageFolder reads ({', '.join(IMG_EXTENSIONS)}); convert it to use it"


def stat_regular(path: str) -> tuple[os.stat_result | None, str | None]:
    """(its stat, None) for a regular file; (None, why it must not be opened at all) for a dangling link, a
    FIFO that would block a reader forever, a folder named like an image. Links are followed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "dangling symlink (its target does not exist)" if os.path.islink(path) else "vanished"
    except OSError as err:
        return None, f"unreadable: {err.strerror or err}"
    if stat.S_ISREG(st.st_mode):
        return st, None
    kind = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
    return None, f"not a regular file ({kind.get(stat.S_IFMT(st.st_mode), 'a folder')})"


def not_a_regular_file(path: str) -> str | None:
    """Why ``path`` must not be opened at all, or None for a regular file (see ``stat_regular``)."""
    return stat_regular(path)[1]


def stamp(st: os.stat_result) -> list[int]:
    """(size, mtime, ctime, inode) of a file: a rewrite that keeps size and mtime still changes ctime, which
    no tool can set back, so cached results keyed by it are never used for other bytes."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_stamp(path: str) -> list[int]:
    """``stamp`` of the file at ``path``."""
    return stamp(os.stat(path))


def check_file(path: str) -> tuple[str | None, str | None, str | None]:
    """(reason it is unusable or None, SHA-256 of its bytes or None when unreadable, signature or None)."""
    try:
        data = Path(path).read_bytes()  # read once: hashed here, decoded from memory
    except OSError as err:
        return f"unreadable: {type(err).__name__}: {err}", None, None
    problem, image = decode(data)
    return problem, hashlib.sha256(data).hexdigest(), signature(image) if image is not None else None


# what a cached scan checked: raised when the preflight refuses more (2: images over 25:1, ImageShapeError), so
# scans cached before are redone instead of passing such files on
CHECKS = 2


def scan(paths: list[str], workers: int, cache_dir: str | os.PathLike | None) -> Scan:
    """Every unusable file (and why), SHA-256 and ``signature`` over ``paths``; parallel, cached by the file list.

    What is not a regular file is listed without being opened. Worker processes die with this process
    (a kill -9 leaves none behind) and are stopped at once when it stops on an exception (SIGTERM too).
    """
    checked = {p: stat_regular(p) for p in paths}  # one stat per file: kind and cache key
    bad = {p: why for p, (_, why) in checked.items() if why is not None}
    regular = [p for p in paths if p not in bad]
    key = json_digest([CHECKS, *([p, *stamp(checked[p][0])] for p in regular)])
    cache = Path(cache_dir) / f"preflight-{key[:32]}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8", errors="surrogateescape"))
            if data.get("format") == FORMAT and data.get("count") == len(regular):
                return Scan({**bad, **data["bad"]}, dict(data["digests"]), dict(data["signatures"]))
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: scan again
    if workers > 1 and len(regular) > 32:
        chunksize = max(1, len(regular) // (workers * 8))
        with multiprocessing.Pool(workers, initializer=start_worker) as pool:  # leaving it terminates them
            results = list(pool.imap(check_file, regular, chunksize=chunksize))
    else:
        results = [check_file(p) for p in regular]
    found = {p: r for p, (r, _, _) in zip(regular, results, strict=True) if r is not None}
    digests = {p: d for p, (_, d, _) in zip(regular, results, strict=True) if d is not None}
    signatures = {p: h for p, (_, _, h) in zip(regular, results, strict=True) if h is not None}
    if cache is not None:
        payload = {"format": FORMAT, "count": len(regular), "bad": found, "digests": digests, "signatures": signatures}
        try:
            atomic_write(cache, lambda f: json.dump(payload, f))
        except (OSError, UserError) as err:  # a cache that can't be written costs a rescan next time, no more
            log.warning("Preflight results not cached (%s); the next run scans again", err)
    return Scan({**bad, **found}, digests, signatures)


def drop_samples(dataset: Any, bad: dict[str, str]) -> None:
    """Remove ``bad`` files from an ImageFolder's samples (and the imgs/targets lists that mirror them)."""
    dataset.samples = [(p, c) for p, c in dataset.samples if p not in bad]
    dataset.imgs, dataset.targets = dataset.samples, [c for _, c in dataset.samples]


def hidden_class_folders(split_dirs: list[Path]) -> list[Path]:
    """Folders named ``.something`` directly under a split: ImageFolder would make each one a class."""
    return sorted(e for d in split_dirs for e in d.iterdir() if e.name.startswith(".") and e.is_dir())


def symlink_loops(root: Path) -> list[tuple[Path, Path]]:
    """(link, the folder it leads back to) for every symlinked folder under ``root`` that loops.

    ImageFolder walks with followlinks=True, which never ends on such a loop.
    """
    loops = []

    def walk(folder: Path, ancestors: tuple[str, ...]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=True):
                    continue
            except OSError:  # a link to itself: not a folder; the preflight lists it as unreadable
                continue
            real = os.path.realpath(entry.path)
            if real in ancestors:
                loops.append((Path(entry.path), Path(real)))
            else:
                walk(Path(entry.path), (*ancestors, real))

    walk(root, (os.path.realpath(root),))
    return loops
