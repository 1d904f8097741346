"""conf/debug/: Lightning's debugging switches as presets, each run in-process on the real config."""

from __future__ import annotations

import json

from src.train import train
from tests.conftest import SMALL_IMAGES, compose_train_cfg


def debug_run(tmp_path, tiny_data, preset: str) -> dict:
    cfg = compose_train_cfg(
        tmp_path / "run",
        "experiment=lite0_fe",
        f"data.root={tiny_data}",
        *SMALL_IMAGES,
        "data.batch_size=4",
        f"debug={preset}",
    )
    assert cfg.task_name == "debug"  # outputs in logs/debug/, away from real runs
    return train(cfg)


def test_fdr_runs_one_batch_of_each_and_keeps_no_best_checkpoint(tmp_path, tiny_data):
    summary = debug_run(tmp_path, tiny_data, "fdr")
    assert summary["epochs"] == 1 and summary["best_checkpoint"] is None
    assert summary["feature_cache"]["used"] is False  # one batch through the backbone, no embedding pass
    assert len(summary["history"]) == 1 and not list((tmp_path / "run").rglob("epoch_*.ckpt"))


def test_overfit_drives_the_training_loss_down_on_the_same_batches(tmp_path, tiny_data):
    history = debug_run(tmp_path, tiny_data, "overfit")["history"]
    assert len(history) == 20
    assert history[-1]["train/loss"] < 0.1 * history[0]["train/loss"] and history[-1]["train/acc"] == 1.0


def test_limit_runs_few_batches_per_epoch_and_writes_a_real_run(tmp_path, tiny_data):
    summary = debug_run(tmp_path, tiny_data, "limit")
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 3


def test_profiler_writes_its_report(tmp_path, tiny_data):
    debug_run(tmp_path, tiny_data, "profiler")
    (report,) = (tmp_path / "run").glob("*profile*.txt")
    assert "run_training_epoch" in report.read_text()


def test_the_cfg_train_fixture_is_the_real_config_shrunk(cfg_train):
    import torch

    assert cfg_train.model.backbone.name == "efficientnet_lite0" and cfg_train.trainer.max_epochs == 2
    assert cfg_train.callbacks.finetune.schedule == [] and cfg_train.callbacks.feature_cache.enabled
    summary = train(cfg_train)
    assert summary["feature_cache"]["used"] and summary["trainable_params"] < summary["frozen_params"]
    # the finetuning callback keeps the backbone frozen all run: it lets the checkpoint leave the backbone out
    ckpt = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert "backbone_ref" in ckpt and not any(k.startswith("backbone.") for k in ckpt["state_dict"])
