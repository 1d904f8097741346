"""``tune.lr_find=true``: Lightning's learning-rate range test before training, on what training would see.

The search runs in a throwaway Trainer of its own with the run's finetuning callback and feature cache (fresh
copies built from the same config): with a frozen backbone the head is searched on cached features (seconds),
and the cache it fills is the one the run then reads. Lightning's ``LearningRateFinder`` is run at the start
of the first epoch (its documented fine-tuning pattern): its default ``on_fit_start`` would come before the
feature cache has embedded anything (Lightning moves tuner callbacks to the front). The model leaves the
search with its initial weights (Lightning restores them) and the run's random state untouched.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning, LearningRateFinder
from lightning.pytorch.utilities.seed import isolate_rng

from src.callbacks.feature_cache import FeatureCache
from src.utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)
MIN_STEPS = 20  # the suggestion is the steepest descent between the 11th and the second-to-last step


class FirstEpochLRFinder(LearningRateFinder):
    """LearningRateFinder at the start of the first epoch, after every other callback's fit start; the
    search's Trainer then stops (it exists for the search only)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        return

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 0 and self.optimal_lr is None:
            self.lr_find(trainer, pl_module)
            trainer.should_stop = True


def find_learning_rate(
    settings: dict[str, Any],
    model: LightningModule,
    datamodule: Any,
    callbacks: list[Any],
    trainer_factory: Any,
    output_dir: Path,
) -> dict[str, Any]:
    """Run the range test, set the model's optimizer LR to the suggestion, write ``lr_find.png`` into
    ``output_dir`` and return what summary.json records under ``lr_find``.

    ``callbacks``: fresh instances of the run's callbacks (the finetuning one and the feature cache are kept);
    ``trainer_factory(**overrides)``: a Trainer as the run configures it.
    """
    check_settings(settings)
    finder = FirstEpochLRFinder(
        min_lr=float(settings["min_lr"]),
        max_lr=float(settings["max_lr"]),
        num_training_steps=int(settings["num_training"]),
        mode=str(settings["mode"]),
        early_stop_threshold=settings.get("early_stop_threshold"),
        update_attr=False,
    )
    kept = [c for c in callbacks if isinstance(c, BaseFinetuning | FeatureCache)]
    trainer = trainer_factory(
        callbacks=[*kept, finder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=-1,  # the search's step count ends it, not the run's epochs
        max_steps=-1,
        num_sanity_val_steps=0,
        default_root_dir=str(output_dir),  # Lightning's temporary checkpoint of the initial weights
    )
    if trainer.world_size > 1:
        raise ConfigError("tune.lr_find runs in one process: find the LR with one device, then train with DDP.")
    with isolate_rng():  # the run then starts as one with model.optimizer.lr set to the suggestion would
        trainer.fit(model, datamodule=datamodule)
    result = finder.optimal_lr
    suggestion = result.suggestion() if result is not None else None
    if suggestion is None or not math.isfinite(suggestion) or suggestion <= 0:
        raise UserError(
            "The learning-rate finder found no suggestion (too few steps before the loss diverged, or a flat "
            "curve): raise tune.num_training, narrow tune.min_lr/tune.max_lr, or set model.optimizer.lr yourself."
        )
    figure = result.plot(suggest=True, show=False)
    figure.savefig(output_dir / "lr_find.png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    before = model.hparams.optimizer["lr"]
    model.hparams.optimizer["lr"] = float(suggestion)  # configure_optimizers reads it; checkpoints record it
    log.info(
        "LR finder: suggestion %.4g (model.optimizer.lr was %.4g) after %d steps",
        suggestion,
        before,
        len(result.results["lr"]),
    )
    return {
        "suggestion": float(suggestion),
        "min_lr": float(settings["min_lr"]),
        "max_lr": float(settings["max_lr"]),
        "num_training": int(settings["num_training"]),
        "steps_run": len(result.results["lr"]),
        "configured_lr": float(before),
    }


def check_settings(settings: dict[str, Any]) -> None:
    """tune.* values a range test can run with, checked before any data work."""
    lo, hi, n = settings.get("min_lr"), settings.get("max_lr"), settings.get("num_training")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi, n))
    if not numbers or not 0 < lo < hi or n < MIN_STEPS or int(n) != n:
        raise ConfigError(
            f"tune: need 0 < min_lr < max_lr and num_training a whole number >= {MIN_STEPS} (Lightning's suggestion "
            f"leaves out the first 10 steps and the last), got min_lr={lo}, max_lr={hi}, num_training={n}."
        )
    if settings.get("mode") not in LearningRateFinder.SUPPORTED_MODES:
        raise ConfigError(
            f"tune.mode must be one of {LearningRateFinder.SUPPORTED_MODES}, got {settings.get('mode')!r}."
        )
