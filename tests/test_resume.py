"""A run killed with SIGKILL and resumed from last.ckpt ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from src.data.seeding import EpochSampler
from tests.conftest import REPO, make_imagefolder, run_cli


@pytest.mark.slow
def test_killed_and_resumed_run_matches_the_uninterrupted_one(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_split={"train": 16, "val": 6}, size=(96, 72))
    # fresh augmentation every epoch (no train cache): shuffling, augmentation and dropout must all replay
    args = [
        "experiment=lite0_fe",
        f"data.root={data}",
        "trainer.max_epochs=5",
        "seed=7",
        "data.batch_size=8",
        "model.cache.train_views=0",
    ]
    straight = run_cli(*args, f"hydra.run.dir={tmp_path / 'straight'}", scratch=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "src.train",
        *args,
        f"hydra.run.dir={killed_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed_dir / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "summary.json").exists(), "inconclusive: the run finished before the kill"

    resumed = run_cli(*args, f"hydra.run.dir={killed_dir}", "ckpt_path=last", scratch=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((killed_dir / "summary.json").read_text())
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3, 4, 5]
    for x, y in zip(a["history"], b["history"], strict=True):
        assert abs(x["val/loss"] - y["val/loss"]) <= 1e-6 and abs(x["train/loss"] - y["train/loss"]) <= 1e-6
    wa = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def test_epoch_sampler_follows_its_epoch_source():
    epoch = {"now": 3}
    sampler = EpochSampler(10, seed=1, epoch_source=lambda: epoch["now"])
    first = list(sampler)
    assert {e for _, e in first} == {3} and sorted(i for i, _ in first) == list(range(10))
    assert list(sampler) == first
    epoch["now"] = 4
    assert list(sampler) != first


@pytest.mark.slow
def test_resume_from_a_corrupt_or_missing_last_ckpt_is_a_clear_error(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_split={"train": 8, "val": 4})
    run_dir = tmp_path / "run"
    args = ["experiment=lite0_fe", f"data.root={data}", f"hydra.run.dir={run_dir}"]
    missing = run_cli(*args, "ckpt_path=last", scratch=tmp_path)
    assert missing.returncode == 1 and "Cannot resume" in missing.stdout + missing.stderr
    assert not (run_dir / "summary.json").exists()  # no silent start from scratch
    first = run_cli(*args, "trainer.max_epochs=2", scratch=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    proc = run_cli(*args, "trainer.max_epochs=3", "ckpt_path=last", scratch=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert f"{last} is corrupt" in out and "epoch_" in out and "Traceback" not in out
