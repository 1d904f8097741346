"""Preflight: bad image files are found by a full decode, skipped and listed, or stop the run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from src.data.preflight import image_problem, scan
from tests.conftest import make_imagefolder, run_cli


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


def test_scan_is_parallel_and_cached_by_file_list(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 20, "val": 20})
    write_bad_files(root)
    paths = sorted(str(p) for p in root.rglob("*.*"))
    first = scan(paths, workers=2, cache_dir=tmp_path / "cache")
    assert sorted(Path(p).name for p in first) == ["empty.jpg", "notanimage.jpg", "truncated.jpg"]
    assert len(list((tmp_path / "cache").glob("preflight-*.json"))) == 1
    (root / "train" / "bees" / "empty.jpg").write_bytes(b"")  # same content, new mtime: a new file list
    scan(paths, workers=1, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("preflight-*.json"))) == 2


@pytest.mark.slow
def test_a_few_bad_files_are_skipped_and_listed(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 30, "val": 12})  # 84 good images
    write_bad_files(root)  # 3 bad: 3.4%
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=lite0_fe", f"data.root={root}", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", scratch=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run_dir / "skipped_files.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == ["empty.jpg", "notanimage.jpg", "truncated.jpg"]
    assert {r["split"] for r in rows} == {"train", "val"} and all(r["reason"] for r in rows)
    assert json.loads((run_dir / "summary.json").read_text())["skipped_files"] == 3


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
