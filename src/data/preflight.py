"""Preflight: decode every image once before training and report what can't be used, and why."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from src.utils.io import atomic_write

log = logging.getLogger(__name__)
FORMAT = 1


def image_problem(path: str) -> str | None:
    """Why ``path`` can't be used as an image, or None when it decodes completely.

    A full ``load()`` (not ``verify()``, which misses truncation), with PIL's decompression-bomb check as
    an error and truncated files never tolerated.
    """
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"over PIL's decompression-bomb limit ({err})"
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except (OSError, SyntaxError, ValueError) as err:  # truncated, corrupt or unreadable
        return f"unreadable: {type(err).__name__}: {err}"
    return None


def file_list_key(paths: list[str]) -> str:
    """SHA-256 over (path, size, mtime) of every file: any change re-scans."""
    rows = []
    for p in paths:
        st = os.stat(p)
        rows.append([p, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def scan(paths: list[str], workers: int, cache_dir: str | os.PathLike | None) -> dict[str, str]:
    """{path: reason} for every unusable file among ``paths``; parallel, and cached by the file list."""
    cache = Path(cache_dir) / f"preflight-{file_list_key(paths)[:32]}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("format") == FORMAT and data.get("count") == len(paths):
                return dict(data["bad"])
        except (OSError, ValueError):
            pass  # unreadable cache: scan again
    if workers > 1 and len(paths) > 32:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(image_problem, paths, chunksize=max(1, len(paths) // (workers * 8))))
    else:
        reasons = [image_problem(p) for p in paths]
    bad = {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}
    if cache is not None:
        payload = {"format": FORMAT, "count": len(paths), "bad": bad}
        atomic_write(cache, lambda f: json.dump(payload, f))
    return bad
