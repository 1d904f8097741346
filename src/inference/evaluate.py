"""Evaluate a trained model on a split of images: metrics, confusion matrix, worst mistakes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchvision.utils import make_grid, save_image

from src.inference.tta import predict_log_probs
from src.utils.io import write_csv, write_json

log = logging.getLogger(__name__)


@torch.inference_mode()
def log_probs_of(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, tta: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs (log-probabilities; with ``tta``, over its averaged views) and labels over a loader, on
    the CPU."""
    outs, labels = [], []
    for x, y in loader:
        outs.append(predict_log_probs(model, x.to(device), tta).cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def compute_metrics(log_probs: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Loss, accuracy, macro and per-class precision/recall/F1/support (torchmetrics), confusion matrix."""
    n = len(class_names)
    per_class = {
        "precision": MulticlassPrecision(num_classes=n, average=None)(log_probs, labels),
        "recall": MulticlassRecall(num_classes=n, average=None)(log_probs, labels),
        "f1": MulticlassF1Score(num_classes=n, average=None)(log_probs, labels),
    }
    support = torch.bincount(labels, minlength=n)
    return {
        "samples": int(len(labels)),
        "loss": float(torch.nn.functional.nll_loss(log_probs, labels)),
        "accuracy": float(MulticlassAccuracy(num_classes=n, average="micro")(log_probs, labels)),
        "macro_precision": float(MulticlassPrecision(num_classes=n, average="macro")(log_probs, labels)),
        "macro_recall": float(MulticlassRecall(num_classes=n, average="macro")(log_probs, labels)),
        "macro_f1": float(MulticlassF1Score(num_classes=n, average="macro")(log_probs, labels)),
        "per_class": {
            name: {**{k: float(v[i]) for k, v in per_class.items()}, "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": MulticlassConfusionMatrix(num_classes=n)(log_probs, labels).tolist(),
    }


def evaluate_split(
    model: torch.nn.Module,
    dataset: Dataset,
    class_names: list[str],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    tta: str | None = None,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Metrics of ``model`` on ``dataset`` (test-time augmented with ``tta``), plus its outputs and labels."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    log_probs, labels = log_probs_of(model, loader, device, tta)
    return compute_metrics(log_probs, labels, class_names), log_probs, labels


def write_reports(
    out_dir: Path,
    metrics: dict[str, Any],
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    dataset: Dataset,
    class_names: list[str],
    mean: list[float],
    std: list[float],
    grid_size: int,
) -> None:
    """metrics.json, confusion_matrix.csv/.png, misclassified.csv/.png, and the same figures in TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    from torch.utils.tensorboard import SummaryWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    cm = metrics["confusion_matrix"]
    rows = ([name, *row] for name, row in zip(class_names, cm, strict=True))
    write_csv(out_dir / "confusion_matrix.csv", ["true \\ predicted", *class_names], rows)
    cm_metric = MulticlassConfusionMatrix(num_classes=len(class_names))
    cm_metric.update(log_probs, labels)
    fig, ax = cm_metric.plot(labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion_matrix.png", dpi=120)

    probs = log_probs.exp()
    conf, pred = probs.max(1)
    wrong = (pred != labels).nonzero().flatten()
    worst = wrong[conf[wrong].argsort(descending=True)][:grid_size].tolist()
    rows = ([dataset.samples[i][0], class_names[labels[i]], class_names[pred[i]], f"{conf[i]:.4f}"] for i in worst)
    write_csv(out_dir / "misclassified.csv", ["path", "true", "predicted", "probability"], rows)
    grid = None
    if worst:
        m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        images = torch.stack([(dataset[i][0] * s + m).clamp(0, 1) for i in worst])
        grid = make_grid(images, nrow=min(4, len(worst)), padding=4, pad_value=1.0)
        save_image(grid, out_dir / "misclassified.png")

    writer = SummaryWriter(str(out_dir / "tensorboard"))
    for key in ("loss", "accuracy", "macro_precision", "macro_recall", "macro_f1"):
        writer.add_scalar(f"eval/{key}", metrics[key])
    writer.add_figure("eval/confusion_matrix", fig)
    if grid is not None:
        writer.add_image("eval/most_confident_mistakes", grid)
    writer.close()
    log.info(
        "Accuracy %.4f, loss %.4f, macro F1 %.4f on %d images; reports in %s",
        metrics["accuracy"],
        metrics["loss"],
        metrics["macro_f1"],
        metrics["samples"],
        out_dir,
    )
