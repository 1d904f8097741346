"""Evaluate a checkpoint: ``python -m src.eval ckpt_path=... [data.root=...] [split=test|val]``.

Writes metrics.json, confusion_matrix.csv/.png, misclassified.csv/.png and TensorBoard figures into its
output folder (logs/eval/runs/<date_time>/ unless hydra.run.dir says otherwise).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from src.data.datamodule import default_num_workers
from src.data.images import RGBLoader
from src.inference.checkpoint import eval_transform, model_from_checkpoint, read_checkpoint
from src.inference.evaluate import evaluate_split, write_reports
from src.utils.cli import pick_device, report_user_errors
from src.utils.errors import DatasetError

log = logging.getLogger("src.eval")


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@report_user_errors
def main(cfg: DictConfig) -> float:
    hparams = read_checkpoint(cfg.ckpt_path)["hyper_parameters"]
    classes = list(hparams["class_names"])
    root = Path(cfg.data.root or hparams.get("data_root") or "")
    if not str(root) or not root.is_dir():
        raise DatasetError(f"Dataset root {root} not found: pass data.root=/path/to/dataset.")
    split = cfg.split or ("test" if (root / "test").is_dir() else "val")
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist: choose split=val or split=test.")
    found = find_classes(str(folder))[0]
    if found != classes:
        raise DatasetError(f"{folder} has classes {found}; the checkpoint was trained on {classes}.")
    dataset = ImageFolder(str(folder), eval_transform(hparams), loader=RGBLoader(cfg.data.decode_min_side))
    device = pick_device(cfg.device)
    model = model_from_checkpoint(cfg.ckpt_path, device)
    workers = default_num_workers() if cfg.data.num_workers is None else int(cfg.data.num_workers)
    metrics, log_probs, labels = evaluate_split(model, dataset, classes, cfg.data.batch_size, workers, device)
    metrics.update(checkpoint=str(cfg.ckpt_path), data_root=str(root), split=split)
    pre = hparams["preprocessing"]
    write_reports(
        Path(cfg.paths.output_dir), metrics, log_probs, labels, dataset, classes, pre["mean"], pre["std"], cfg.grid_size
    )
    return metrics["accuracy"]


if __name__ == "__main__":
    main()
