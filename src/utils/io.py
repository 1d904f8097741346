"""Small file helpers: atomic writes that respect the umask, a clear error on a full disk, content hashes."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from src.utils.errors import UserError

# file names are str with surrogates where their bytes are not UTF-8 (Linux): write those bytes back as they are
TEXT_OPTIONS = {"encoding": "utf-8", "errors": "surrogateescape"}
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 1 << 20  # a failed write with less than this left is reported as a full disk


class DiskFullError(UserError):
    """A write failed because its file system is full (or over quota)."""

    def __init__(self, folder: str | os.PathLike, detail: str = "", hint: str = "") -> None:
        self.folder, self.detail = Path(folder), detail
        where = f"{self.folder}{f' ({detail})' if detail else ''}"
        super().__init__(
            f"No space left on the disk holding {where}. Free some space there, or move the output with "
            f"hydra.run.dir=... (caches: paths.cache_dir=...).{f' {hint}' if hint else ''}"
        )


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows (no window with another umask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_disk_full(err: BaseException, folder: str | os.PathLike) -> bool:
    """True when ``err`` (torch wraps OSErrors in RuntimeErrors) comes from a full file system at ``folder``."""
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename over it.

    A crash at any moment leaves either the old file or the new one, never a torn file. The file gets the
    permissions a plain ``open`` would (0666 less the umask), not mkstemp's 0600, so a team sharing a log or
    cache folder can read it. A full disk raises DiskFullError naming the folder; nothing partial stays.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else TEXT_OPTIONS)) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, UserError) and is_disk_full(err, path.parent):
            raise DiskFullError(path.parent, f"writing {path.name}") from None
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``atomic_write`` for writers that take a file name, not a file object (torch.onnx.export,
    torch.export.save): yields a temp name beside ``path`` (same suffix, for writers that check it); when the
    block ends without an error, the file there is fsynced and renamed over ``path``, else removed.

    ``path`` is thus never a half-written file: a kill mid-write leaves the old file (or none) and a hidden
    ``.<name>.*.tmp<suffix>`` beside it. Permissions and a full disk as in ``atomic_write``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # the writer may have kept mkstemp's 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, UserError) and is_disk_full(err, path.parent):
            raise DiskFullError(path.parent, f"writing {path.name}") from None
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=False, default=str))


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Atomically write a CSV file: a header row, then ``rows``."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def json_digest(value: Any) -> str:
    """Hex SHA-256 of ``value`` as canonical JSON (sorted keys): the one fingerprint of lists and specs
    (preflight's file list, a run's data, a feature-cache folder)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8", "surrogateescape")).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_tree(root: str | os.PathLike) -> tuple[int, str]:
    """(file count, SHA-256) over every file's relative path and content under ``root``, in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            digest.update(str(full.relative_to(root)).encode() + b"\0")
            digest.update(bytes.fromhex(sha256_file(full)))
            count += 1
    return count, digest.hexdigest()
