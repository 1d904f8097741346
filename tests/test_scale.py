"""Scaling out: DDP on CPU processes matches one process; sweeps and launchers compose from config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_imagefolder, run_cli

# dropout 0 and fp32: DDP's averaged gradients over 2 x 4 samples equal one process's over the same 8
PARITY = ["experiment=lite0_fe", "trainer.max_epochs=3", "model.head.dropout=0", "trainer.precision=32"]


@pytest.mark.slow
def test_ddp_cpu_matches_one_process_and_writes_one_set_of_outputs(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_split={"train": 16, "val": 6}, size=(96, 72))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = run_cli(*PARITY, f"data.root={data}", "data.batch_size=8", f"hydra.run.dir={single}", scratch=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(
        *PARITY,
        f"data.root={data}",
        "trainer=ddp_cpu",
        "data.batch_size=4",
        f"hydra.run.dir={ddp}",
        scratch=tmp_path / "fresh",  # its own feature cache: built here, by rank zero
    )
    assert two.returncode == 0, two.stderr[-3000:]

    a = json.loads((single / "summary.json").read_text())["history"]
    b = json.loads((ddp / "summary.json").read_text())["history"]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["val/acc"] == y["val/acc"]  # stated tolerance: equal accuracy, val/loss within 1e-5
        assert abs(x["val/loss"] - y["val/loss"]) <= 1e-5, (x, y)
        assert abs(x["train/loss"] - y["train/loss"]) <= 1e-5, (x, y)

    # one set of outputs, from rank zero
    assert [p.relative_to(ddp) for p in ddp.rglob("summary.json")] == [Path("summary.json")]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["epoch_002.ckpt", "last.ckpt"]
    assert len(list((ddp / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in ddp.glob("*.csv")) == ["duplicates.csv", "skipped_files.csv"]
    log = (ddp / "train.log").read_text()
    # built once by rank zero, read by rank 1 (whose log lines land in the same train.log)
    assert log.count("Embedded val") == 1 and log.count("Embedded train view 0") == 1
    assert log.count("Feature cache hit") == 2
    assert log.count("CONFIG") == 1
