"""Preflight: bad image files are found by a full decode, skipped and listed, or stop the run."""

from __future__ import annotations

import csv
import json
import random
import shutil
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from torchvision import transforms as T

from src.data.datamodule import ImageFolderDataModule
from src.data.duplicates import Pair
from src.data.images import load_rgb
from src.data.preflight import image_problem, scan
from src.utils.errors import DatasetError
from src.utils.io import sha256_file
from tests.conftest import make_imagefolder, run_cli

SMALL = [T.Resize(32), T.CenterCrop(32)]


def datamodule(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(root, SMALL, SMALL, mean=[0.5] * 3, std=[0.5] * 3, num_workers=0, **kwargs)


def write_bad_files(root: Path) -> dict[str, str]:
    """A truncated JPEG, a zero-byte file and text named .jpg among real images; name -> expected reason."""
    good = root / "train" / "ants" / "ants_0.png"
    Image.open(good).convert("RGB").resize((200, 150)).save(root / "full.jpg", quality=95)
    data = (root / "full.jpg").read_bytes()
    (root / "train" / "ants" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "train" / "bees" / "empty.jpg").write_bytes(b"")
    (root / "val" / "bees" / "notanimage.jpg").write_text("hello")
    (root / "full.jpg").unlink()
    return {"truncated.jpg": "unreadable", "empty.jpg": "zero-byte", "notanimage.jpg": "not an image"}


def test_image_problem_names_each_kind_of_bad_file(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 2, "val": 2})
    expected = write_bad_files(root)
    for path in root.rglob("*.*"):
        reason = image_problem(str(path))
        if path.name in expected:
            assert reason is not None and expected[path.name] in reason, (path.name, reason)
        else:
            assert reason is None, (path.name, reason)


def test_truncation_is_found_even_when_pil_is_told_to_tolerate_it(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 1, "val": 1})
    write_bad_files(root)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it globally
    assert "unreadable" in image_problem(str(root / "train" / "ants" / "truncated.jpg"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was


def test_scan_is_parallel_and_cached_by_file_list(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 20, "val": 20})
    write_bad_files(root)
    paths = sorted(str(p) for p in root.rglob("*.*"))
    first, digests, signatures = scan(paths, workers=2, cache_dir=tmp_path / "cache")
    assert sorted(Path(p).name for p in first) == ["empty.jpg", "notanimage.jpg", "truncated.jpg"]
    assert digests[paths[0]] == sha256_file(paths[0]) and len(digests) == len(paths)
    assert len(signatures) == len(paths) - 3 and all(len(h) == 16 + 384 for h in signatures.values())  # decodable
    assert scan(paths, workers=1, cache_dir=tmp_path / "cache") == (first, digests, signatures)  # from the cache
    assert len(list((tmp_path / "cache").glob("preflight-*.json"))) == 1
    (root / "train" / "bees" / "empty.jpg").write_bytes(b"")  # same content, new mtime: a new file list
    scan(paths, workers=1, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("preflight-*.json"))) == 2


@pytest.mark.slow
def test_a_few_bad_files_are_skipped_and_listed(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 30, "val": 12})  # 84 good images
    write_bad_files(root)  # 3 bad: 3.4%
    shutil.copy(root / "train" / "ants" / "ants_3.png", root / "val" / "ants" / "leak.png")
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=lite0_fe", f"data.root={root}", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", scratch=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run_dir / "skipped_files.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == ["empty.jpg", "notanimage.jpg", "truncated.jpg"]
    assert {r["split"] for r in rows} == {"train", "val"} and all(r["reason"] for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_files"] == 3 and summary["cross_split_duplicates"] == 1
    assert summary["images"] == {"train": {"ants": 30, "bees": 30}, "val": {"ants": 13, "bees": 12}}
    with open(run_dir / "duplicates.csv") as f:
        rows = list(csv.DictReader(f))
    pairs = [(r["kind"], r["split_a"], Path(r["path_a"]).name, r["split_b"], Path(r["path_b"]).name) for r in rows]
    assert pairs == [("exact", "train", "ants_3.png", "val", "leak.png")]


@pytest.mark.slow
def test_too_many_bad_files_stop_before_training(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 5, "val": 3})  # 16 good images
    write_bad_files(root)  # 3 bad: 16%
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=lite0_fe", f"data.root={root}", f"hydra.run.dir={run_dir}", scratch=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "3 unusable image files" in out and "above data.max_bad_fraction=5%" in out and "truncated.jpg" in out
    assert not (run_dir / "checkpoints").exists()


def png_claiming_size(path: Path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose header claims ``width`` x ``height``: a decompression bomb in a few bytes."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8  # after the PNG signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    path.write_bytes(bytes(data))


def test_decompression_bomb_is_named(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_claiming_size(bomb, 50_000, 50_000)  # 2.5 gigapixels, 12x PIL's limit
    reason = image_problem(str(bomb))
    assert reason is not None and "decompression-bomb" in reason


def test_duplicates_across_splits_are_found_and_can_stop_the_run(tmp_path, caplog):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 3, "val": 2})
    leaked = root / "val" / "bees" / "copy_of_train.png"
    shutil.copy(root / "train" / "bees" / "bees_1.png", leaked)
    dm = datamodule(root)
    dm.setup("fit")
    assert dm.duplicates == [
        Pair("exact", 1.0, "train", str(root / "train" / "bees" / "bees_1.png"), "val", str(leaked))
    ]
    assert "1 pairs of images in different splits are copies" in caplog.text
    assert dm.class_counts == {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 3}}
    with pytest.raises(DatasetError, match="copy_of_train.png"):
        datamodule(root, duplicates="error").setup("fit")


def test_hidden_folders_and_symlink_loops_stop_with_their_own_message(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 2, "val": 2})
    hidden = root / "train" / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(root / "train" / "ants" / "ants_0.png", hidden)
    with pytest.raises(DatasetError, match=r"Hidden folders would become classes:\n.*\.ipynb_checkpoints"):
        datamodule(root).setup("fit")
    shutil.rmtree(hidden)
    (root / "train" / "ants" / "more").symlink_to(root / "train", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"lead back to a folder above them.*\n.*ants/more"):
        datamodule(root).setup("fit")
    (root / "train" / "ants" / "more").unlink()
    extra = make_imagefolder(tmp_path / "elsewhere", per_split={"x": 1}) / "x" / "ants"
    (root / "train" / "ants" / "linked").symlink_to(extra, target_is_directory=True)  # no loop: followed
    dm = datamodule(root)
    dm.setup("fit")
    assert dm.class_counts["train"] == {"ants": 3, "bees": 2}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded corruption: flipped bytes, a cut, a spliced-in run of garbage or a shuffled chunk."""
    buf = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 20)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:
        buf = buf[: rng.randrange(1, len(buf))]
    elif kind == 2:
        at = rng.randrange(len(buf))
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    else:
        a, b = sorted(rng.sample(range(len(buf)), 2))
        chunk = buf[a:b]
        rng.shuffle(chunk)
        buf[a:b] = chunk
    return bytes(buf)


def test_fuzzed_image_bytes_load_or_get_a_reason_without_hanging(tmp_path):
    """300 seeded mutations of a JPEG (with EXIF), a PNG and a 16-bit PNG: preflight either passes a file,
    and then the training loader decodes it, or names a reason; every check ends within 10 s."""
    rng = random.Random(1234)
    img = Image.effect_mandelbrot((96, 72), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    img.save(tmp_path / "seed.jpg", quality=90, exif=exif)
    img.save(tmp_path / "seed.png")
    Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257).save(tmp_path / "seed16.png")
    seeds = [(tmp_path / name).read_bytes() for name in ("seed.jpg", "seed.png", "seed16.png")]

    def too_slow(signum, frame):
        raise TimeoutError("a single image check took over 10 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    outcomes = {"loads": 0, "skipped": 0}
    try:
        for i in range(300):
            path = tmp_path / f"fuzz{i}{'.jpg' if i % 3 == 0 else '.png'}"
            path.write_bytes(mutate(seeds[i % 3], rng))
            signal.alarm(10)
            reason = image_problem(str(path))
            if reason is None:
                loaded = load_rgb(path, min_side=None)  # what a training epoch would do with it
                assert loaded.mode == "RGB" and min(loaded.size) > 0
                outcomes["loads"] += 1
            else:
                assert isinstance(reason, str) and reason
                outcomes["skipped"] += 1
            signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["loads"] > 0 and outcomes["skipped"] > 0, outcomes
