"""A dataset as LitData shards: one optimized folder per split (``litdata.optimize``), each item the image
file's own bytes, its class index and SHA-256, and beside them ``dataset.json``: the classes, every item's
path under the source, class and SHA-256 in shard order, and what the preflight found. Written by
``python -m src.optimize``, read by ``data=streaming`` (src.data.streaming).

Items keep the file's bytes as they are (no re-encoding): a streamed image decodes to exactly the pixels the
folder gives, so feature-cache rows (keyed by content SHA-256) are shared between the two.

Where: a local folder, or object storage through LitData's own clients (``s3://``, ``gs://``, ``r2://``,
``azure://``); ``local:/dir`` is a local folder read the way a bucket is (downloaded into the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.utils.errors import ConfigError, DatasetError

METADATA = "dataset.json"
FORMAT_FAMILY = "transfer-learning-template/litdata-shards/"
FORMAT = f"{FORMAT_FAMILY}1"  # the family marks a folder as this project's shards; the number is the version
# written before anything is removed or written, removed once dataset.json is in place: a write cut short (kill -9)
# leaves it, so the folder is still known as this project's and can be written again
WRITING = ".src-optimize-writing.json"
# what LitData leaves in a split folder (chunks, per-rank and merged indexes, their temp and lock files, key sidecars)
LITDATA_FILE = re.compile(
    r"(chunk-[\w.-]*\.bin|([\w-]+[.-])?index\.json|[\w.-]*\.(lock|tmp)|shard-[\w-]*\.parquet)(\.tmp[\w.]*)?"
)
REMOTE_PREFIXES = ("s3://", "gs://", "r2://", "azure://", "hf://", "local:")


def refuse_shards(data: Any, task: str) -> None:
    """Tasks that read image folders (writing shards, the audit) refuse ``data=streaming`` by name."""
    if str(data.get("_target_", "")).endswith("StreamingDataModule"):
        raise ConfigError(
            f"{task} reads image folders, not shards: pass the folder the shards were written from "
            "(data.root=..., without data=streaming)."
        )


def is_remote(location: str) -> bool:
    """Object storage (or ``local:``, a folder read as storage is): read through LitData's cache."""
    return str(location).startswith(REMOTE_PREFIXES)


def normalise_location(location: str | os.PathLike) -> str:
    """A URL as given (no trailing slash); a local folder as an absolute path."""
    text = str(location).rstrip("/") or str(location)  # "/" stays "/"
    return text if is_remote(text) else str(Path(text).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for URLs and local paths alike."""
    return "/".join([location.rstrip("/"), *parts])


def local_folder(location: str) -> Path | None:
    """The folder on this machine behind ``location`` (``local:/dir`` too); None for object storage."""
    if location.startswith("local:"):
        return Path(location.removeprefix("local:"))
    return None if is_remote(location) else Path(location)


_WRITER_STARTED = False


def encode_item(item: tuple[str, int, str]) -> dict[str, Any]:
    """One shard item from (path, class index, SHA-256 found by the preflight): the file's bytes, checked
    against that SHA-256 so a file edited since the preflight is not written under its old identity.

    Runs in LitData's writer processes, which never learn that their parent died: the first item makes this
    one die with it."""
    global _WRITER_STARTED
    if not _WRITER_STARTED:
        from src.utils.processes import die_with_parent

        die_with_parent()
        _WRITER_STARTED = True
    path, label, sha256 = item
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DatasetError(f"{path} became unreadable while the shards were being written ({err}).") from err
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DatasetError(f"{path} changed while the shards were being written.")
    return {"image": data, "label": int(label), "sha256": sha256}


def write_metadata(location: str, metadata: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """``dataset.json`` at ``location``: atomically in a local folder, uploaded to object storage."""
    text = json.dumps(metadata, separators=(",", ":"))
    folder = local_folder(location)
    if folder is not None:
        write_atomic(folder / METADATA, text)
        (folder / WRITING).unlink(missing_ok=True)  # the write is whole: the marker's work is done
        return
    from src.utils.lightning_compat import storage

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) / METADATA
        tmp.write_text(text)
        storage(location, storage_options).upload_file(str(tmp), join(location, METADATA))


def remove_metadata(location: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete ``dataset.json`` first when rewriting: readers never pair it with half-written shards."""
    folder = local_folder(location)
    if folder is not None:
        (folder / METADATA).unlink(missing_ok=True)
        return
    from src.utils.lightning_compat import storage

    fs = storage(location, storage_options)
    if fs.exists(join(location, METADATA)):
        fs.delete_file_or_directory(join(location, METADATA))


def read_metadata(location: str, cache_dir: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Any:
    """``dataset.json`` of the shards at ``location`` (downloaded into ``cache_dir`` from object storage),
    checked to be this project's format."""
    folder = local_folder(location)
    missing = (
        f"{location} holds no {METADATA}: not a dataset written by src.optimize. Write one with "
        f"`python -m src.optimize data.root=/path/to/images output_dir={location}`."
    )
    if folder is not None and not (folder / METADATA).is_file():
        if (folder.parent / METADATA).is_file():
            raise DatasetError(f"{location} is one split of a dataset: pass the folder above it, {folder.parent}.")
        raise DatasetError(missing)
    if folder is not None and not is_remote(location):
        raw = (folder / METADATA).read_bytes()
    else:  # object storage, or local: (read as storage is, through the cache)
        from src.utils.lightning_compat import download

        local = Path(cache_dir) / hashlib.sha256(location.encode()).hexdigest()[:16] / METADATA
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            download(location, join(location, METADATA), str(local), str(local.parent), storage_options)
        except Exception as err:  # any client's error: missing object, credentials, network
            raise DatasetError(f"Could not read {join(location, METADATA)}: {err}. {missing}") from err
        raw = local.read_bytes()
    metadata = parse_metadata(raw)
    if metadata is None:
        raise DatasetError(
            f"{join(location, METADATA)} is not JSON text: not a dataset written by src.optimize (or damaged); "
            "write the shards again with src.optimize."
        )
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        version = (
            f" (it is version {found.removeprefix(FORMAT_FAMILY)!r} of this project's shards)"
            if is_ours(metadata)
            else ""
        )
        raise DatasetError(
            f"{join(location, METADATA)} is not in this project's format {FORMAT}{version}; write the shards again "
            "with src.optimize."
        )
    problem = metadata_problem(metadata)
    if problem:
        raise DatasetError(
            f"{join(location, METADATA)} is damaged ({problem}); write the shards again with src.optimize."
        )
    return metadata


def parse_metadata(raw: bytes) -> Any:
    """The JSON value in ``raw``; None when it is not UTF-8 JSON text (random bytes, a binary file)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_ours(metadata: Any) -> bool:
    """A dataset.json (or write marker) this project wrote: a mapping whose ``format`` names this project's shard
    format, any version. A file that is merely called dataset.json is not proof."""
    return isinstance(metadata, dict) and str(metadata.get("format", "")).startswith(FORMAT_FAMILY)


def metadata_problem(metadata: dict[str, Any]) -> str | None:
    """What is wrong with a dataset.json's contents (edited by hand, cut short), or None."""
    from src.data.listing import SPLITS

    classes = metadata.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        return "classes must be a list of names"
    if len(set(classes)) != len(classes):
        return "class names repeat"
    for key in ("source", "fingerprint", "layout", "how"):
        if not isinstance(metadata.get(key), str):
            return f"{key} must be text"
    items = metadata.get("items")
    if not isinstance(items, dict) or not set(items) <= set(SPLITS):
        return f"items must map splits ({', '.join(SPLITS)}) to rows"
    for split, rows in items.items():
        if not isinstance(rows, list):
            return f"items.{split} must be a list"
        for n, row in enumerate(rows):
            ok = (
                isinstance(row, list)
                and len(row) == 3
                and isinstance(row[0], str)
                and row[0]
                and not Path(row[0]).is_absolute()
                and isinstance(row[1], int)
                and not isinstance(row[1], bool)
                and 0 <= row[1] < len(classes)
                and isinstance(row[2], str)
                and len(row[2]) == 64
            )
            if not ok:
                return f"items.{split}[{n}] is not [path under the source, class index, SHA-256]: {str(row)[:200]}"
    for key, width in (("skipped", 3), ("duplicates", 6)):
        rows = metadata.get(key, [])
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == width for r in rows):
            return f"{key} must be a list of rows of {width}"
    return None


def check_output(location: str, source_root: Path) -> None:
    """Before any work: a local ``output_dir`` must be a folder (or not exist yet), and neither hold the
    images nor sit among them (rewriting the shards empties their split folders; a layout of class folders
    would list the shards as a class)."""
    folder = local_folder(location)
    if folder is None:
        return
    folder, root = folder.resolve(), source_root.resolve()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir={location} is a file, not a folder; nothing was written.")
    if folder == root or folder in root.parents or root in folder.parents:
        raise ConfigError(
            f"output_dir={location} and data.root={source_root} overlap: write the shards to a folder outside "
            "the images (and the images outside it); nothing was written."
        )


def foreign_entries(folder: Path) -> list[str]:
    """What in a local ``folder`` this project's shard writing did not put there: anything but dataset.json, the
    write marker and split folders holding only LitData's files. Empty for a folder of shards (or of a write cut
    short) that may be written again."""
    from src.data.listing import SPLITS

    own = False
    for name in (METADATA, WRITING):
        if (folder / name).is_file():
            own = own or is_ours(parse_metadata((folder / name).read_bytes()))
    if not own:  # no marker of this project's format: nothing here is ours (a file named dataset.json is not proof)
        return sorted(p.name for p in folder.iterdir())
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name in (METADATA, WRITING, f".{METADATA}.tmp") and entry.is_file():
            continue
        if entry.name in SPLITS and entry.is_dir() and not entry.is_symlink():
            found += [
                f"{entry.name}/{p.relative_to(entry)}"
                for p in entry.rglob("*")
                if not (p.is_dir() and not p.is_symlink()) and not LITDATA_FILE.fullmatch(p.name)
            ]
            continue
        found.append(entry.name)
    return found


def prepare_output(location: str, storage_options: dict[str, Any] | None = None) -> None:
    """Ready ``location`` for new shards. A local folder: created, or, when it holds shards this project wrote (its
    dataset.json or write marker says so by its format, not by its name) and nothing else, the write marker put in
    place and the old dataset.json and split folders removed; any other folder is refused, untouched. Object
    storage: an existing dataset.json must be this project's; it is removed first (LitData's overwrite mode
    replaces the shards)."""
    from src.data.listing import SPLITS

    folder = local_folder(location)
    if folder is None:
        refuse_foreign_remote(location, storage_options)
        remove_metadata(location, storage_options)
        return
    if folder.exists() and any(folder.iterdir()):
        foreign = foreign_entries(folder)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise DatasetError(
                f"output_dir={location} holds what src.optimize did not write ({shown}): choose an empty or new "
                f"folder, or one holding only shards written before (nothing was written or removed)."
            )
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / WRITING, json.dumps({"format": FORMAT, "state": "writing"}))
    (folder / METADATA).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(folder / split, ignore_errors=True)


def refuse_foreign_remote(location: str, storage_options: dict[str, Any] | None) -> None:
    """Object storage: a dataset.json at ``location`` that this project did not write is refused, untouched."""
    from src.utils.lightning_compat import download, storage

    if not storage(location, storage_options).exists(join(location, METADATA)):
        return
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / METADATA
        download(location, join(location, METADATA), str(local), scratch, storage_options)
        metadata = parse_metadata(local.read_bytes())
    if not is_ours(metadata):
        raise DatasetError(
            f"output_dir={location} holds a {METADATA} that src.optimize did not write: choose another prefix "
            "(nothing was written or removed)."
        )


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_writers(optimize: Callable[..., None], **kwargs: Any) -> None:
    """``litdata.optimize(**kwargs)``; when a writer fails (or the run is stopped), every process it started is
    ended — LitData leaves its writers and their helper processes (a remover blocked on its own queue)
    running, holding the terminal's output — and a DatasetError raised in a writer comes out as itself, not
    inside LitData's RuntimeError."""
    from src.utils.processes import descendants, kill_descendants

    before = set(descendants(os.getpid()))  # a caller's own workers are left alone
    try:
        optimize(**kwargs)
    except BaseException as err:
        kill_descendants(keep=before)
        found = re.search(r"DatasetError: (.+)", str(err))
        if found:
            raise DatasetError(f"{found.group(1)} Nothing usable was written; run src.optimize again.") from None
        raise


def write_shards(
    source: Any,
    location: str,
    chunk_mb: float,
    workers: int,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the set-up ``source`` datamodule (ImageFolderDataModule: listed, split, preflighted) as shards at
    ``location``, one folder per split, then ``dataset.json``; returns the metadata written."""
    from litdata import optimize

    from src.data.listing import relative

    logging.getLogger("litdata").setLevel(logging.WARNING)  # its cache-size notes, once per split written
    prepare_output(location, storage_options)
    folder = local_folder(location)
    target = str(folder) if folder is not None else location  # LitData writes local: folders as plain paths
    items: dict[str, list[list[Any]]] = {}
    for split, dataset in source.datasets.items():
        rows = [(path, label, source.digests[path]) for path, label in dataset.samples]
        items[split] = [[relative(source.root, p), c, sha] for p, c, sha in rows]
        if not rows:
            continue
        run_writers(
            optimize,
            fn=encode_item,
            inputs=rows,
            output_dir=join(target, split),
            chunk_bytes=max(1, int(chunk_mb * 2**20)),
            num_workers=max(1, min(workers, len(rows))),
            keep_data_ordered=True,  # shard order = the listing's: dataset.json's rows name each item
            reorder_files=False,
            mode="overwrite",
            start_method="fork",  # spawn re-imports torch and this project in every writer: ~13 s a split
            verbose=False,
            storage_options=storage_options or {},
        )
    metadata = {
        "format": FORMAT,
        "source": str(source.root),
        "classes": list(source.classes),
        "layout": source.layout,
        "how": source.how,
        "split": source.split_summary(),
        "fingerprint": source.fingerprint,
        "items": items,  # split -> [path under source, class index, SHA-256], in shard order
        "skipped": [list(row) for row in source.skipped],
        "duplicates": [list(q.row()) for q in source.duplicates],
    }
    write_metadata(location, metadata, storage_options)
    return metadata
