"""TensorBoard's HParams tab: each run's settings beside its best metrics, so sweep jobs compare on one screen."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from src.callbacks.epoch_summary import EpochSummary, monitored_best


class HParamsView(Callback):
    """At the end of training, log ``params`` with hp/best_val_loss and hp/best_val_acc (at the epoch the best
    checkpoint keeps) to every TensorBoard logger, while its event file is still open."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        history = next((c.history for c in trainer.callbacks if isinstance(c, EpochSummary)), [])
        _, best = monitored_best(trainer, history)
        if not best:
            return
        metrics = {"hp/best_val_loss": best["val/loss"], "hp/best_val_acc": best.get("val/acc", float("nan"))}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # rank zero only: Lightning's loggers write nothing elsewhere
                logger.log_hyperparams(self.params, metrics)


# the settings shown beside every run's best metrics in TensorBoard's HParams tab (plus the job's overrides)
HPARAMS = (
    "model.backbone.name",
    "model.head.hidden_dim",
    "model.head.dropout",
    "model.optimizer.name",
    "model.optimizer.lr",
    "model.scheduler.name",
    "data.batch_size",
    "trainer.max_epochs",
    "seed",
)


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The settings of HPARAMS and every override of this job (data and output paths left out)."""
    from hydra.core.hydra_config import HydraConfig

    params: dict[str, Any] = {key: OmegaConf.select(cfg, key) for key in HPARAMS}
    if HydraConfig.initialized():
        for override in HydraConfig.get().overrides.task:
            key, _, value = override.partition("=")
            key = key.lstrip("+~")
            if key not in ("data.root", "hydra.run.dir", "paths.cache_dir") and not key.startswith("callbacks."):
                params.setdefault(key, OmegaConf.select(cfg, key, default=value))
    return params
