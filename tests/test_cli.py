"""End to end through the real command line, as a user runs it."""

from __future__ import annotations

import csv
import glob
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from torchvision import transforms as T

from src.data.datamodule import ImageFolderDataModule
from src.data.preprocessing import transform_from_record
from src.models.classifier import TransferClassifier
from tests.conftest import compose_train_cfg, run_cli

pytestmark = pytest.mark.slow


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for path in glob.glob(str(run_dir / "tensorboard" / "**" / "events.out.tfevents*"), recursive=True):
        acc = EventAccumulator(path).Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """The no-argument default (synthetic shapes, efficientnet_lite0), shortened to 2 epochs on a third of the
    shapes (10 + 5 per class)."""
    tmp = tmp_path_factory.mktemp("default")
    run_dir = tmp / "run"
    fewer = ["data.prepare.train_per_class=10", "data.prepare.val_per_class=5"]
    proc = run_cli(
        "trainer.max_epochs=2", *fewer, f"paths.data_dir={tmp / 'data'}", f"hydra.run.dir={run_dir}", scratch=tmp
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_writes_checkpoints_summary_config_and_log(default_run):
    ckpts = sorted(p.name for p in (default_run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(name.startswith("epoch_") for name in ckpts)
    summary = json.loads((default_run / "summary.json").read_text())
    for key in ("best_checkpoint", "best_val_loss", "best_val_acc", "epochs", "classes", "wall_s"):
        assert summary[key] is not None, key
    assert summary["epochs"] == 2 and summary["classes"] == ["circle", "cross", "triangle"]
    assert Path(summary["best_checkpoint"]).is_file()
    assert min(h["val/loss"] for h in summary["history"]) == summary["best_val_loss"]
    assert summary["trainable_params"] == 1280 * 256 + 256 + 256 * 3 + 3
    assert (default_run / "config_tree.txt").read_text().startswith("CONFIG")
    assert "name: efficientnet_lite0" in (default_run / "config.yaml").read_text()
    log_text = (default_run / "train.log").read_text()
    assert "epoch 2/2 | train loss" in log_text and "| val loss" in log_text


def test_tensorboard_events_hold_each_epochs_metrics(default_run):
    tags = scalars(default_run)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert len(tags.get(tag, [])) == 2, (tag, tags.keys())
    summary = json.loads((default_run / "summary.json").read_text())
    assert min(tags["val/loss"]) == pytest.approx(summary["best_val_loss"], rel=1e-6)


def test_best_checkpoint_reproduces_the_logged_val_loss(default_run):
    summary = json.loads((default_run / "summary.json").read_text())
    ckpt = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == summary["classes"]
    model = TransferClassifier.load_from_checkpoint(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    model.eval()
    # the eval transforms the checkpoint records (the default run: lite0's own 256/224 bicubic)
    recipe_eval = transform_from_record(model.hparams.preprocessing).transforms[:-2]
    assert [type(t) for t in recipe_eval] == [T.Resize, T.CenterCrop] and recipe_eval[0].size == 256
    dm = ImageFolderDataModule(
        Path(default_run).parent / "data" / "synthetic_shapes",
        recipe_eval,
        recipe_eval,
        mean=model.hparams.preprocessing["mean"],
        std=model.hparams.preprocessing["std"],
        num_workers=0,
    )
    dm.setup("fit")
    total, n = 0.0, 0
    bf16 = summary["precision"].startswith("bf16")  # recompute at the run's precision
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x, y in dm.val_dataloader():
            total += torch.nn.functional.nll_loss(model(x), y, reduction="sum").item()
            n += len(y)
    assert total / n == pytest.approx(summary["best_val_loss"], abs=1e-4)


def test_tensorboard_server_lists_val_loss(default_run):
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "tensorboard"),
            "--logdir",
            str(default_run),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body, deadline = "", time.monotonic() + 90
        while time.monotonic() < deadline and "val/loss" not in body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(1)
        tags = json.loads(body)
        assert any("val/loss" in run_tags for run_tags in tags.values()), tags
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_missing_weights_stop_before_training_in_a_few_lines(tiny_data, tmp_path):
    missing = tmp_path / "resnet50-weights.pth"
    proc = run_cli(
        "experiment=resnet50_fe",
        f"data.root={tiny_data}",
        f"model.backbone.weights={missing}",
        f"hydra.run.dir={tmp_path / 'run'}",
        scratch=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert str(missing) in out and "does not exist" in out
    assert "Traceback" not in out and "Error executing job" not in out and "Error in call to target" not in out
    assert out.count("does not exist") == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def main_exit(cfg, caplog) -> tuple[int, str]:
    """src.train's Hydra main called in-process on a composed config: (exit status, what it logged)."""
    from src.train import main

    caplog.clear()
    with pytest.raises(SystemExit) as stopped:
        main(cfg)
    return stopped.value.code, caplog.text


def test_class_mismatch_stops_the_cli_with_the_names(tmp_path, caplog):
    from tests.conftest import make_imagefolder

    root = make_imagefolder(tmp_path / "d", classes=("ants", "bees"), per_split={"train": 2})
    make_imagefolder(root, classes=("ants", "wasps"), per_split={"val": 2})
    code, out = main_exit(compose_train_cfg(tmp_path / "run", "experiment=lite0_fe", f"data.root={root}"), caplog)
    assert code == 1
    assert out.count("only in train: ['bees']; only in val: ['wasps']") == 1
    assert "Traceback" not in out


def test_two_by_two_sweep_writes_four_rows(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "experiment=lite0_fe",
        f"data.root={tiny_data}",
        "model.optimizer.lr=0.001,0.01",
        "model.head.dropout=0.2,0.4",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        scratch=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert all(r["status"] == "ok" for r in rows)
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)
    swept = ("model.optimizer.lr=", "model.head.dropout=")
    combos = {tuple(sorted(o for o in r["overrides"].split() if o.startswith(swept))) for r in rows}
    assert len(combos) == 4
    summaries = {r["job"]: json.loads((sweep / r["job"] / "summary.json").read_text()) for r in rows}
    assert {s["best_val_loss"] for s in summaries.values()} == set(losses)
    # the jobs share one feature cache: only the first pays for the backbone
    assert summaries["0"]["feature_cache"]["misses"] == 2 and summaries["0"]["feature_cache"]["hits"] == 0
    for job in ("1", "2", "3"):
        assert summaries[job]["feature_cache"]["misses"] == 0 and summaries[job]["feature_cache"]["hits"] == 2


def test_lite0_fe_learns_hymenoptera_in_three_epochs(hymenoptera, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=lite0_fe",
        f"data.root={hymenoptera}",
        "trainer.max_epochs=3",
        f"hydra.run.dir={run_dir}",
        scratch=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_acc"] >= 0.90, summary["history"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.backbone.name=resnet5", "Unknown backbone 'resnet5'. Did you mean: resnet50"),
        ("model.head.dropout=1.0", "model.head.dropout must be a number in [0, 1), got 1.0"),
        ("model.optimizer.lr=0", "model.optimizer.lr must be a positive, finite number, got 0"),
        ("data.batch_size=0", "data.batch_size must be a whole number of at least 1, got 0"),
        ("model.scheduler.name=cosine", "model.scheduler.name='cosine': choose none"),
    ],
)
def test_bad_config_values_stop_before_any_data_work(override, message, tmp_path, caplog):
    # data.root does not exist: a config error reported first proves the check ran before the data
    # (the exit status and the absence of a traceback from a real process: test_missing_weights_stop_...)
    cfg = compose_train_cfg(tmp_path / "run", "experiment=lite0_fe", f"data.root={tmp_path / 'nowhere'}", override)
    code, out = main_exit(cfg, caplog)
    assert code == 1
    assert out.count(message) == 1, out[-2000:]
    assert "does not exist" not in out  # the missing data.root was never looked at
    assert not (tmp_path / "run" / "skipped_files.csv").exists()


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_that_cannot_work_stops_the_run_before_any_data_work(tracker, tmp_path, caplog, monkeypatch):
    """An MLflow server that does not answer (its client would retry for minutes) or W&B not installed."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
    overrides = {
        "mlflow": ["logger=mlflow", f"logger.mlflow.tracking_uri=http://127.0.0.1:{port.getsockname()[1]}"],
        "wandb": ["logger=wandb"],
    }[tracker]
    cfg = compose_train_cfg(tmp_path / "run", "experiment=lite0_fe", f"data.root={tmp_path / 'nowhere'}", *overrides)
    code, out = main_exit(cfg, caplog)
    port.close()
    assert code == 1
    assert ("cannot be reached" if tracker == "mlflow" else "pip install -e '.[trackers]'") in out, out[-2000:]
    assert "does not exist" not in out
