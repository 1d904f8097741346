"""The Python API: a trained checkpoint as a classifier of image files and PIL images.

    from src.inference import Classifier
    clf = Classifier.from_checkpoint("logs/train/runs/<run>/checkpoints/epoch_009.ckpt", device="auto")
    clf.predict(["a.jpg", pil_image], top_k=3)   # [{"class": ..., "probability": ..., "top_k": [...]}, ...]

One inference path: src.predict, src.eval and src.serve use it. The checkpoint is loaded safely
(src.inference.checkpoint) and its recorded preprocessing is applied; batches of ``batch_size`` images go
through the model at once.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from src.data.images import load_rgb, pil_rgb
from src.inference.checkpoint import TrainedModel, load_trained
from src.inference.tta import check_tta, predict_log_probs

Item = str | os.PathLike | io.IOBase | Image.Image


@dataclass
class Classifier:
    """A trained model on its device, its classes and its preprocessing."""

    trained: TrainedModel
    device: torch.device
    decode_min_side: int | None = 512  # JPEG draft decoding, as in training (conf/data/imagefolder.yaml)
    max_pixels: int | None = None  # image files decoding to more are refused from their header (src.serve sets it)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "auto",
        decode_min_side: int | None = 512,
        max_pixels: int | None = None,
    ) -> Classifier:
        """Load ``path`` (checked before anything in it is used); ``device`` ``auto``: the GPU when there is one.
        ``max_pixels``: refuse image files that would decode to more pixels (``ImageTooLargeError``)."""
        from src.utils.cli import pick_device

        target = pick_device(device) if isinstance(device, str) else device
        return cls(load_trained(path, target), target, decode_min_side, max_pixels)

    @property
    def classes(self) -> list[str]:
        return self.trained.classes

    @property
    def model(self) -> torch.nn.Module:
        return self.trained.model

    def image(self, item: Item) -> Image.Image:
        """An RGB image from a path, a binary file object or a PIL image, prepared the same way each time
        (``load_rgb``: EXIF orientation, wide greyscale scaled, shape and ``max_pixels`` checked)."""
        if isinstance(item, Image.Image):
            return pil_rgb(item)
        if not isinstance(item, str | os.PathLike | io.IOBase):
            raise TypeError(f"Classifier.predict takes image paths, files and PIL images, got {type(item).__name__}.")
        return load_rgb(item, self.decode_min_side, self.max_pixels)

    def tensor(self, item: Item) -> torch.Tensor:
        """The preprocessed 3×H×W tensor of one item, as the checkpoint's run prepared its val images."""
        return self.trained.transform(self.image(item))

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """Class probabilities (N × classes, on the CPU) of a preprocessed batch."""
        return predict_log_probs(self.model, batch.to(self.device), tta).exp().cpu()

    def results(self, probs: torch.Tensor, top_k: int = 3) -> list[dict[str, Any]]:
        """One ``{"class", "probability", "top_k": [{"class", "probability"}, ...]}`` per row of ``probs``."""
        k = max(1, min(int(top_k), len(self.classes)))
        top_p, top_i = probs.topk(k, dim=1)
        out = []
        for p, i in zip(top_p.tolist(), top_i.tolist(), strict=True):
            ranked = [{"class": self.classes[c], "probability": float(q)} for q, c in zip(p, i, strict=True)]
            out.append({"class": ranked[0]["class"], "probability": ranked[0]["probability"], "top_k": ranked})
        return out

    def predict(
        self, items: Item | Iterable[Item], top_k: int = 3, tta: str | None = None, batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """One result per item, in order (a single item gives a list of one). An unreadable file raises."""
        check_tta(tta)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}.")
        listed: Sequence[Item] = [items] if isinstance(items, Item) else list(items)  # one item, or many
        out: list[dict[str, Any]] = []
        for start in range(0, len(listed), batch_size):
            batch = torch.stack([self.tensor(item) for item in listed[start : start + batch_size]])
            out += self.results(self.probabilities(batch, tta), top_k)
        return out
