"""Fetch a zipped ImageFolder dataset once, verify its content and unpack it atomically."""

from __future__ import annotations

import logging
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from src.utils.errors import DatasetError
from src.utils.io import sha256_tree

log = logging.getLogger(__name__)


def fetch_zipped_imagefolder(root: Path, url: str, folder: str, tree_sha256: str, timeout_s: float) -> None:
    """Make sure ``root`` holds the dataset: download ``url`` and unpack its ``folder`` there when absent.

    The unpacked files are verified against ``tree_sha256`` (SHA-256 over every file's relative path and
    content, see src.utils.io.sha256_tree) before they are moved into place; nothing unverified is kept.
    An existing ``root`` is used as it is (a local copy the user pointed data.root at).
    """
    root = Path(root)
    if root.exists():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        archive = tmp / "download.zip"
        log.info("Downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:
            raise DatasetError(
                f"Could not download {url} ({type(err).__name__}: {err}) into {root}.\n"
                f"Offline? Point data.root at a local copy instead: data.root=/path/to/{folder} "
                "(an ImageFolder root with train/ and val/)."
            ) from None
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp / "unpacked")
        unpacked = tmp / "unpacked" / folder
        count, digest = sha256_tree(unpacked) if unpacked.is_dir() else (0, "")
        if digest != tree_sha256:
            raise DatasetError(
                f"{url} unpacked to {count} files whose checksum {digest[:16]}… is not the expected "
                f"{tree_sha256[:16]}…: the download is corrupt or the archive changed. Nothing was kept."
            )
        unpacked.rename(root)
        log.info("Dataset ready at %s (%d files, checksum verified)", root, count)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
