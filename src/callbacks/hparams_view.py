"""TensorBoard's HParams tab: each run's settings beside its best metrics, so sweep jobs compare on one screen."""

from __future__ import annotations

from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from src.callbacks.epoch_summary import EpochSummary, monitored_best

# overrides not shown: where data and outputs live says nothing about the model
HIDDEN_OVERRIDES = ("data.root", "hydra.run.dir", "paths.cache_dir")


class HParamsView(Callback):
    """At the end of training, log ``params`` (conf/callbacks/default.yaml) and every override of this Hydra job
    with hp/best_val_loss and hp/best_val_acc (at the epoch the best checkpoint keeps) to every TensorBoard
    logger, while its event file is still open. Without a TensorBoard logger it does nothing."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = dict(params)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        history = next((c.history for c in trainer.callbacks if isinstance(c, EpochSummary)), [])
        _, best = monitored_best(trainer, history)
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not best or not tensorboards:
            return
        params = {**job_overrides(), **self.params}
        params = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}
        metrics = {"hp/best_val_loss": best["val/loss"], "hp/best_val_acc": best.get("val/acc", float("nan"))}
        for logger in tensorboards:  # rank zero only: Lightning's loggers write nothing elsewhere
            logger.log_hyperparams(params, metrics)


def job_overrides() -> dict[str, Any]:
    """This Hydra job's command-line overrides as {key: value} (YAML-typed), data and output paths left out."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    params: dict[str, Any] = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in HIDDEN_OVERRIDES or key.startswith("callbacks."):
            continue
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            params[key] = value
    return params
