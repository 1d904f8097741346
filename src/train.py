"""Train a classifier: ``python -m src.train [experiment=...] [data.root=...] [key=value ...]``.

A thin Hydra main: compose the config, instantiate datamodule, model, callbacks, logger and trainer,
fit, and write summary.json into the run's output folder.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BaseFinetuning
from omegaconf import DictConfig, OmegaConf, open_dict

from src.callbacks.lr_finder import check_settings as check_lr_find_settings
from src.callbacks.lr_finder import find_learning_rate
from src.data.duplicates import COLUMNS as DUPLICATE_COLUMNS
from src.data.preprocessing import MAX_PIXELS_PER_SIDE, check_same_preprocessing, pil_filter, preprocessing_record
from src.models.backbones import fetch_weights, weights_preprocessing
from src.models.classifier import check_model_config, inverse_frequency_weights
from src.models.timm_backbones import HUB_TIMEOUT_S
from src.utils.checkpoint_io import newest_readable_checkpoint
from src.utils.cli import report_user_errors
from src.utils.config import (
    check_trainer_settings,
    instantiate_each,
    module_config,
    run_record,
    save_config,
    write_run_record,
)
from src.utils.distributed import launched_as_rank_zero
from src.utils.errors import ConfigError
from src.utils.io import DiskFullError, write_csv, write_json
from src.utils.lightning_compat import spawns_local_processes
from src.utils.resume import changed_settings, check_same_data, remove_interrupted_writes, resume_checkpoint

log = logging.getLogger("src.train")
# a frozen backbone is in eval mode on purpose when training starts (BatchNorm statistics must not move)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def route_lightning_logs() -> None:
    """Send Lightning's own messages through the root logger, so they reach the run's log file too."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model on the configured data; return the run summary (also in summary.json)."""
    route_lightning_logs()
    output_dir = Path(cfg.paths.output_dir)
    writer = launched_as_rank_zero()  # DDP: the other ranks run this too, and write nothing
    record = run_record(cfg)  # .hydra/, as composed; written with the rest once every check below has passed
    resolve_preprocessing(cfg)
    # before any data work: a typo costs seconds
    model_settings = OmegaConf.to_container(cfg.model, resolve=True)
    check_model_config(
        model_settings["backbone"],
        model_settings["head"],
        model_settings["optimizer"],
        model_settings.get("scheduler"),
        model_settings.get("loss"),
        model_settings.get("mixup"),
        model_settings.get("cutmix"),
    )
    backbone = model_settings["backbone"]
    fetch_weights(backbone["name"], backbone.get("weights"), backbone.get("hub_timeout_s", HUB_TIMEOUT_S))
    check_trainer_settings(cfg.trainer)
    check_monitor(cfg.get("callbacks"))
    check_trackers(cfg.get("logger"), float(cfg.tracker_timeout_s))
    tune = OmegaConf.to_container(cfg.tune, resolve=True) if cfg.get("tune") else {}
    if tune.get("lr_find"):
        check_lr_find_settings(tune)
    preprocessing = preprocessing_record(  # what inference needs; the eval transforms checked here
        cfg.data.mean, cfg.data.std, OmegaConf.to_container(cfg.data.eval_transforms, resolve=True)
    )
    resume = resume_checkpoint(cfg.get("ckpt_path"), output_dir / "checkpoints")
    if resume is not None:
        check_same_preprocessing(resume.hparams.get("preprocessing"), preprocessing, resume.path)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    start = time.perf_counter()  # wall_s: from data setup to the end of the last epoch
    datamodule = instantiate_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    changed = {}
    if resume is not None:
        check_same_data(resume, datamodule.classes, datamodule.fingerprint, bool(cfg.get("allow_new_data", False)))
        changed = changed_settings(resume, cfg)
    if writer:  # every refusal came before this: a refused resume leaves the run folder as it was
        write_run_record(output_dir, record)
        log.info("Config\n%s", save_config(cfg, output_dir))
        write_preflight_report(output_dir, datamodule)
        remove_interrupted_writes(output_dir / "checkpoints")
    model_cfg = module_config(cfg.model)
    loss = class_weighted_loss(model_settings.get("loss"), datamodule)
    model = instantiate(
        model_cfg,
        class_names=datamodule.classes,
        preprocessing=preprocessing,
        data_root=str(datamodule.root),
        data_fingerprint=datamodule.fingerprint,
        loss=loss,
        _convert_="all",
    )
    callbacks, loggers = instantiate_each(cfg.get("callbacks")), instantiate_each(cfg.get("logger"))
    if not any(isinstance(c, BaseFinetuning) for c in callbacks):
        log.warning(
            "No finetuning callback (model.finetune or callbacks.finetune is off): nothing is frozen, every backbone "
            "parameter trains at the head's learning rate and the feature cache is not used."
        )
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_launch(trainer)
    lr_find = None
    if tune.get("lr_find") and resume is not None:
        lr = resume.hparams.get("optimizer", {}).get("lr")
        model.hparams.optimizer["lr"] = lr  # the LR the search found, recorded again in this run's checkpoints
        lr_find = {"suggestion": lr, "from_checkpoint": resume.path}
        log.info("tune.lr_find: not run on a resume; the checkpoint's LR %s goes on", lr)
    elif tune.get("lr_find"):
        fresh = instantiate_each(cfg.get("callbacks"))  # the search's own finetuning callback and feature cache
        lr_find = find_learning_rate(
            tune, model, datamodule, fresh, lambda **kw: instantiate(cfg.trainer, **kw), output_dir
        )

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume.path if resume else None)
    except DiskFullError as err:
        good = newest_readable_checkpoint(output_dir / "checkpoints")
        hint = (
            f"The last good checkpoint is {good}: resume with ckpt_path={good}" if good else "No checkpoint was saved."
        )
        raise DiskFullError(err.folder, err.detail, hint) from None
    finally:
        finish_wandb_run()
    wall_s = time.perf_counter() - start

    summary = run_summary(trainer, model, datamodule.classes, wall_s)
    summary["skipped_files"] = len(datamodule.skipped)
    summary["cross_split_duplicates"] = len(datamodule.duplicates)
    summary["images"] = datamodule.class_counts  # split -> class -> images used
    summary["split"] = datamodule.split_summary()
    if lr_find is not None:
        summary["lr_find"] = lr_find
    if resume is not None:
        summary["resumed"] = {"from": resume.path, "changed_settings": changed}
    if not trainer.is_global_zero:
        return summary  # metrics were synced across ranks: rank zero reports them
    if "test" in datamodule.datasets and summary["best_checkpoint"]:
        summary["test"] = evaluate_on_test(summary["best_checkpoint"], datamodule)
    write_json(output_dir / "summary.json", summary)
    write_run_card(output_dir, cfg, model, summary)
    log.info(
        "Best val loss %.4f (val acc %.4f, epoch %s) in %.1f s; outputs in %s",
        summary["best_val_loss"],
        summary["best_val_acc"],
        summary["best_epoch"],
        wall_s,
        output_dir,
    )
    return summary


def finish_wandb_run() -> None:
    """End the W&B run that logger=wandb opened: W&B keeps one run per process until it is finished, so the next
    job of a sweep (same process) would otherwise log into this one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


SIZING_KEYS = ("resize", "crop", "interpolation")


def resolve_preprocessing(cfg: DictConfig) -> None:
    """Fill data.mean, std, resize, crop and interpolation left null with the backbone weights' own (their
    config: torchvision's weights transforms, timm's pretrained config), so the transforms built from them and
    the config.yaml the run saves say what was used."""
    weights = weights_preprocessing(cfg.model.backbone.name)
    if cfg.data.get("interpolation") is not None:
        pil_filter(cfg.data.interpolation)  # a ConfigError naming the choices, before anything resolves it
    with open_dict(cfg.data):
        for key in ("mean", "std", *SIZING_KEYS):
            if cfg.data.get(key) is None:
                value = getattr(weights, key)
                cfg.data[key] = list(value) if isinstance(value, tuple) else value
    check_sizes(cfg.data, weights, cfg.model.backbone.name)


def check_sizes(data: DictConfig, weights: Any, backbone: str) -> None:
    """Before any data work: whole positive sizes, a crop inside the resized image (CenterCrop would pad it
    with black), the one input size a ViT takes, and a training augmentation to build."""
    for key in ("resize", "crop"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PIXELS_PER_SIDE:
            raise ConfigError(
                f"data.{key} must be a whole number of pixels in [1, {MAX_PIXELS_PER_SIDE}], got {value!r}."
            )
    if data.crop > data.resize:
        raise ConfigError(
            f"data.crop={data.crop} is larger than data.resize={data.resize}: the centre crop would be padded with "
            "black borders. Resize at least as large as the crop."
        )
    if weights.fixed_input and data.crop != weights.crop:
        raise ConfigError(
            f"{backbone} takes {weights.crop}×{weights.crop} images only: data.crop={data.crop} cannot run."
        )
    if data.get("train_transforms") is None:
        raise ConfigError(
            "data.train_transforms is missing: choose an augmentation preset, augment=seed (conf/augment/)."
        )


def instantiate_datamodule(cfg: DictConfig) -> Any:
    """The configured datamodule, its preprocessing resolved (``resolve_preprocessing``)."""
    resolve_preprocessing(cfg)
    settings = OmegaConf.to_container(cfg.data, resolve=True)
    for key in SIZING_KEYS:  # read by the transforms (${data.resize} ...), not the datamodule
        settings.pop(key)
    return instantiate(settings, _convert_="all")


MONITORED = {  # what the model logs each epoch, and which way is better
    "val/loss": "min",
    "val/acc": "max",
    "val/macro_f1": "max",
    "val/balanced_acc": "max",
    "train/loss": "min",
    "train/acc": "max",
}


def check_monitor(callbacks: Any) -> None:
    """Before any data work: the checkpoint's and early stopping's monitor must be a logged metric, watched
    the right way (macro-F1 with mode=min would keep the worst epoch)."""
    for name in ("model_checkpoint", "early_stopping"):
        settings = (callbacks or {}).get(name)
        if not settings or settings.get("monitor") is None:
            continue
        monitor, mode = settings.get("monitor"), settings.get("mode", "min")
        if monitor not in MONITORED:
            raise ConfigError(
                f"callbacks.{name}.monitor={monitor!r} is not a metric the model logs; choose one of "
                f"{', '.join(MONITORED)}."
            )
        if mode != MONITORED[monitor]:
            raise ConfigError(
                f"callbacks.{name}.monitor={monitor} is {'higher' if MONITORED[monitor] == 'max' else 'lower'} "
                f"is better: set callbacks.{name}.mode={MONITORED[monitor]} (it is {mode})."
            )


def check_trackers(loggers: DictConfig | None, timeout_s: float) -> None:
    """Before any data work: the optional package a tracker needs is installed, and a tracking server named by
    URL answers within ``timeout_s`` (MLflow's client would retry for minutes, training nothing, before it fails)."""
    from src.utils.network import unreachable

    for name, settings in (loggers or {}).items():
        target = str((settings or {}).get("_target_", ""))
        if target.endswith("WandbLogger") and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"logger.{name} (W&B) needs the optional wandb package: pip install -e '.[trackers]'.")
        uri = str((settings or {}).get("tracking_uri") or "")
        if target.endswith("MLFlowLogger") and uri.startswith(("http://", "https://")):
            reason = unreachable(uri, timeout_s)
            if reason:
                raise ConfigError(
                    f"logger.{name}.tracking_uri={uri}: {reason}. Start the server, fix the URI, or drop it to "
                    "keep the run's own store (sqlite in the run folder)."
                )


def check_launch(trainer: L.Trainer) -> None:
    """Refuse DDP that starts its own processes inside a local multirun: Lightning's launcher re-runs the
    command line in every new process, which would start the whole sweep again in each of them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    sweeping = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if sweeping and spawns_local_processes(trainer):
        raise ConfigError(
            "A sweep (-m or hparams_search) cannot run DDP jobs that start their own processes here: Lightning "
            "would re-run the sweep in each process. Sweep on a cluster (hydra/launcher=slurm: SLURM starts "
            "the processes), or sweep with one device per job (trainer.devices=1)."
        )


def class_weighted_loss(loss: dict[str, Any] | None, datamodule: Any) -> dict[str, Any]:
    """model.loss with class_weights=auto turned into numbers (inverse class frequency over train), so the
    checkpoint records the weights it trained with."""
    loss = dict(loss or {})
    if loss.get("class_weights") == "auto":
        counts = [datamodule.class_counts["train"][c] for c in datamodule.classes]
        loss["class_weights"] = inverse_frequency_weights(counts)
        log.info(
            "Class weights (inverse frequency over train): %s",
            dict(zip(datamodule.classes, loss["class_weights"], strict=True)),
        )
    return loss


def write_preflight_report(output_dir: Path, datamodule: Any) -> None:
    """split.csv (path, label, split of every image used), skipped_files.csv (split, path, reason of every
    image left out) and duplicates.csv (pairs of copies in different splits: kind exact/near, similarity);
    header only when there are none."""
    write_csv(output_dir / "split.csv", ["path", "label", "split"], datamodule.split_rows())
    write_csv(output_dir / "skipped_files.csv", ["split", "path", "reason"], datamodule.skipped)
    write_csv(output_dir / "duplicates.csv", DUPLICATE_COLUMNS, [q.row() for q in datamodule.duplicates])


def evaluate_on_test(path: str, datamodule: Any) -> dict[str, Any]:
    """The best checkpoint's metrics on the dataset's test split, loaded the way a user loads it."""
    from src.inference.checkpoint import load_trained
    from src.inference.evaluate import evaluate_split
    from src.utils.cli import pick_device

    device = pick_device("auto")
    model = load_trained(path, device).model
    metrics, _, _ = evaluate_split(
        model,
        datamodule.datasets["test"],
        datamodule.classes,
        datamodule.eval_batch_size,
        datamodule.num_workers,
        device,
    )
    log.info(
        "Best checkpoint on test: accuracy %.4f, loss %.4f (%d images)",
        metrics["accuracy"],
        metrics["loss"],
        metrics["samples"],
    )
    keys = ("samples", "loss", "accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class")
    return {k: metrics[k] for k in keys}


def write_run_card(output_dir: Path, cfg: DictConfig, model: Any, summary: dict[str, Any]) -> None:
    """MODEL_CARD.md for the run's best checkpoint: best val metrics, test per class when there is a test split
    (per-class val scores: ``src.eval`` writes a refreshed card)."""
    from src.inference.model_card import write_model_card

    hp = dict(model.hparams)
    evaluations = {
        "val (best epoch)": {
            "accuracy": summary.get("best_val_acc"),
            "macro_f1": summary.get("best_val_macro_f1"),
            "loss": summary.get("best_val_loss"),
        }
    }
    if summary.get("test"):
        evaluations["test"] = summary["test"]
    training = {
        "epochs": summary.get("epochs"),
        "best epoch": summary.get("best_epoch"),
        "optimizer": {k: v for k, v in hp.get("optimizer", {}).items()},
        "batch size": cfg.data.get("batch_size"),
        "augmentation": [str(t.get("_target_", "")).rsplit(".", 1)[-1] for t in cfg.data.get("train_transforms") or []],
        "finetune_schedule": list(cfg.model.finetune.get("schedule") or []) if cfg.model.get("finetune") else None,
        "label smoothing": (hp.get("loss") or {}).get("label_smoothing"),
        "precision": summary.get("precision"),
        "seed": cfg.get("seed"),
        "wall time (s)": summary.get("wall_s"),
    }
    write_model_card(output_dir, hp, summary.get("images"), training, evaluations, summary.get("best_checkpoint"))


def run_summary(trainer: L.Trainer, model: L.LightningModule, classes: list[str], wall_s: float) -> dict[str, Any]:
    """What a user wants to know after a run, as plain JSON values."""
    from src.callbacks.epoch_summary import EpochSummary, latest_checkpoint_path, model_checkpoint, monitored_best
    from src.callbacks.feature_cache import FeatureCache

    history = next((c.history for c in trainer.callbacks if isinstance(c, EpochSummary)), [])
    cache = next((c.stats for c in trainer.callbacks if isinstance(c, FeatureCache)), None)
    ckpt = model_checkpoint(trainer)
    monitor, best = monitored_best(trainer, history)
    return {
        "status": "ok",
        "best_checkpoint": getattr(ckpt, "best_model_path", "") or None,
        "last_checkpoint": latest_checkpoint_path(trainer),
        "best_val_loss": best.get("val/loss"),
        "best_val_acc": best.get("val/acc"),
        "best_val_macro_f1": best.get("val/macro_f1"),
        "best_val_balanced_acc": best.get("val/balanced_acc"),
        "best_epoch": best.get("epoch"),
        "monitor": monitor,
        "epochs": trainer.current_epoch,
        "classes": list(classes),
        "wall_s": round(wall_s, 3),
        **model.parameter_counts(),
        "backbone": model.hparams.backbone,
        "backbone_weights_sha256": model.weights_sha256,
        "precision": str(trainer.precision),
        "feature_cache": cache,
        "history": history,
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimized metric for sweepers."""
    summary = train(cfg)
    metric = cfg.get("optimized_metric")
    return summary.get(metric) if metric else None


if __name__ == "__main__":
    main()
