"""Dataset checks with clear messages, the synthetic default set and the verified download."""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from torchvision import transforms as T

from src.data.datamodule import ImageFolderDataModule
from src.data.download import fetch_zipped_imagefolder
from src.data.synthetic import COMPLETE_MARKER, make_shapes_dataset
from src.utils.errors import DatasetError
from src.utils.io import sha256_tree
from tests.conftest import make_imagefolder

SMALL = [T.Resize(32), T.CenterCrop(32)]


def datamodule(root) -> ImageFolderDataModule:
    return ImageFolderDataModule(root, SMALL, SMALL, mean=[0.5] * 3, std=[0.5] * 3, num_workers=0)


def test_class_mismatch_names_the_differing_classes(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=("ants", "bees"), per_split={"train": 2})
    make_imagefolder(root, classes=("ants", "wasps"), per_split={"val": 2})
    with pytest.raises(DatasetError, match=r"only in train: \['bees'\]; only in val: \['wasps'\]"):
        datamodule(root).setup("fit")


def test_missing_root_and_missing_split(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        datamodule(tmp_path / "nowhere").setup("fit")
    make_imagefolder(tmp_path / "only_val", per_split={"val": 2})
    with pytest.raises(DatasetError, match=r"has val/ but no train/"):
        datamodule(tmp_path / "only_val").setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"class folders directly"):  # the three layouts are named
        datamodule(tmp_path / "empty").setup("fit")
    with pytest.raises(DatasetError, match="data.root is not set"):
        datamodule(None)


def test_empty_class_folder_is_a_clear_error(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 2, "val": 2})
    for f in (root / "val" / "bees").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="bees"):
        datamodule(root).setup("fit")


def test_synthetic_dataset_is_deterministic_and_complete(tmp_path):
    kwargs = dict(classes=["circle", "cross"], train_per_class=3, val_per_class=2, image_size=48, seed=0)
    make_shapes_dataset(tmp_path / "a", **kwargs)
    make_shapes_dataset(tmp_path / "b", **kwargs)
    count, digest = sha256_tree(tmp_path / "a")
    assert count == 2 * (3 + 2) + 1  # images plus the completion marker
    assert sha256_tree(tmp_path / "b") == (count, digest)
    assert (tmp_path / "a" / COMPLETE_MARKER).is_file()
    dm = datamodule(tmp_path / "a")
    dm.setup("fit")
    assert dm.classes == ["circle", "cross"]
    # an incomplete folder (no marker) is regenerated, not trusted
    (tmp_path / "a" / COMPLETE_MARKER).unlink()
    shutil.rmtree(tmp_path / "a" / "val")
    make_shapes_dataset(tmp_path / "a", **kwargs)
    assert sha256_tree(tmp_path / "a") == (count, digest)


def zipped(tmp_path: Path) -> tuple[str, str]:
    src = make_imagefolder(tmp_path / "src" / "mini", per_split={"train": 2, "val": 1})
    archive = tmp_path / "mini.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src.parent))
    return archive.as_uri(), sha256_tree(src)[1]


def test_download_is_verified_and_unpacked(tmp_path):
    url, digest = zipped(tmp_path)
    root = tmp_path / "data" / "mini"
    fetch_zipped_imagefolder(root, url, "mini", digest, timeout_s=10)
    assert sha256_tree(root)[1] == digest
    assert sorted(p.name for p in (root / "train").iterdir()) == ["ants", "bees"]


def test_download_with_wrong_checksum_keeps_nothing(tmp_path):
    url, _ = zipped(tmp_path)
    root = tmp_path / "data" / "mini"
    with pytest.raises(DatasetError, match="checksum"):
        fetch_zipped_imagefolder(root, url, "mini", "0" * 64, timeout_s=10)
    assert not root.exists()
    assert list((tmp_path / "data").iterdir()) == []


def test_unreachable_download_says_how_to_use_a_local_copy(tmp_path):
    root = tmp_path / "data" / "mini"
    with pytest.raises(DatasetError, match=r"data.root=/path/to/mini"):
        fetch_zipped_imagefolder(root, (tmp_path / "missing.zip").as_uri(), "mini", "0" * 64, timeout_s=10)
    assert not root.exists()


def slow_prepare(root: Path, log: Path) -> None:
    """A prepare step that takes a while and notes when it starts and ends (one line each, appended); like the
    real ones, it does nothing when the root is there."""
    if root.exists():
        return
    with open(log, "a") as f:
        f.write(f"start {os.getpid()}\n")
    time.sleep(0.3)
    root.mkdir(exist_ok=True)
    with open(log, "a") as f:
        f.write(f"end {os.getpid()}\n")


def prepare_in_process(root: str, log: str) -> None:
    prepare = functools.partial(slow_prepare, log=Path(log))
    ImageFolderDataModule(root, SMALL, SMALL, mean=[0.5] * 3, std=[0.5] * 3, prepare=prepare).prepare_data()


def test_prepare_data_runs_one_process_at_a_time(tmp_path):
    """Ranks or sweep jobs start together: the second waits for the first to finish preparing."""
    root, log = tmp_path / "data" / "set", tmp_path / "prepare.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=prepare_in_process, args=(str(root), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    lines = log.read_text().splitlines()  # one process prepared; the others waited and found the root there
    assert len(lines) == 2 and lines[0].split()[0] == "start" and lines[1] == f"end {lines[0].split()[1]}"
