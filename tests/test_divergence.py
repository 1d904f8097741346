"""A diverging run stops with a clear message; in a sweep only that job fails, and the sweep says so."""

from __future__ import annotations

import csv

import pytest

from tests.conftest import make_imagefolder, run_cli

pytestmark = pytest.mark.slow


def test_nan_loss_stops_the_run_with_a_message(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_split={"train": 8, "val": 4})
    proc = run_cli(
        "experiment=lite0_fe",
        f"data.root={data}",
        "model.optimizer.lr=1e30",
        "trainer.max_epochs=3",
        f"hydra.run.dir={tmp_path / 'run'}",
        scratch=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "training diverged" in out and "model.optimizer.lr" in out and "Traceback" not in out
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_failing_sweep_job_does_not_stop_the_others(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_split={"train": 8, "val": 4})
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "experiment=lite0_fe",
        f"data.root={data}",
        "model.optimizer.lr=1e30,0.01",
        "trainer.max_epochs=3",
        f"hydra.sweep.dir={sweep}",
        scratch=tmp_path,
    )
    assert proc.returncode != 0  # the sweep as a whole reports the failure
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "failed"]  # the failed job ran first, the other still ran
    assert "lr=1e+30" in rows[1]["overrides"] and "training diverged" in rows[1]["reason"]
    assert float(rows[0]["best_val_loss"]) > 0
