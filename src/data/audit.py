"""Dataset audit helpers: rank images by how likely their given label is wrong, and show the worst.

Out-of-fold predicted probabilities come from k logistic-regression heads (scikit-learn) on the cached
backbone features; cleanlab turns them into per-image label-quality scores and its confident-learning
verdict (``find_label_issues``), rather than a hand-rolled version of either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from src.data.images import load_rgb
from src.utils.errors import ConfigError

log = logging.getLogger(__name__)


def check_audit_config(folds: object, c: object, max_iter: object, near_cosine: object, grid_size: object) -> None:
    """The audit's settings, checked before any image is read."""
    whole = {"audit.folds": (folds, 2), "audit.max_iter": (max_iter, 1), "audit.grid_size": (grid_size, 0)}
    for key, (value, least) in whole.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key} must be a whole number of at least {least}, got {value!r}.")
    if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c < float("inf"):
        raise ConfigError(f"audit.C must be a positive number, got {c!r}.")
    if near_cosine is not None and (
        isinstance(near_cosine, bool) or not isinstance(near_cosine, int | float) or not -1 <= near_cosine <= 1
    ):
        raise ConfigError(f"audit.near_cosine must be a cosine in [-1, 1] or null, got {near_cosine!r}.")


@dataclass
class LabelRanking:
    """Per image (in input order): quality of its given label (0 worst .. 1 best), the label the heads
    suggest, and cleanlab's confident-learning verdict."""

    quality: np.ndarray
    suggested: np.ndarray
    flagged: np.ndarray
    oof_accuracy: float
    folds: int


def rank_label_issues(
    features: torch.Tensor, labels: torch.Tensor, folds: int, seed: int, c: float, max_iter: int
) -> LabelRanking:
    """Out-of-fold probabilities from ``folds`` stratified logistic-regression heads, scored by cleanlab."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features.float().numpy()
    y = labels.numpy()
    smallest = int(np.bincount(y).min())
    k = max(2, min(folds, smallest))
    if k != folds:
        log.warning(
            "The smallest class has %d image(s): %d folds instead of audit.folds=%d (stratified folds need that "
            "many images per class)%s",
            smallest,
            k,
            folds,
            "; its images are scored by heads that never saw their class" if smallest < 2 else "",
        )
    head = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    probs = out_of_fold_probabilities(head, x, y, cv.split(x, y), int(y.max()) + 1)
    quality = get_label_quality_scores(y, probs)
    flagged = np.zeros(len(y), dtype=bool)
    # n_jobs=1: cleanlab's own process pool, forked inside a process with torch's threads, was seen to hang
    flagged[find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)] = True
    suggested = probs.argmax(1)
    return LabelRanking(quality, suggested, flagged, float((suggested == y).mean()), k)


def out_of_fold_probabilities(head, x: np.ndarray, y: np.ndarray, folds, classes: int) -> np.ndarray:  # noqa: ANN001
    """Each image's class probabilities from a head fitted without it, one column per class. A class absent from a
    fold's training part (one with a single image) gets probability 0 in that fold; a training part of one class
    only predicts it with certainty (a head needs two classes to fit: sklearn's cross_val_predict stops there)."""
    probs = np.zeros((len(y), classes))
    for train, held_out in folds:
        present = np.unique(y[train])
        if len(present) == 1:
            probs[held_out, present[0]] = 1.0
            continue
        head.fit(x[train], y[train])
        probs[np.ix_(held_out, present)] = head.predict_proba(x[held_out])
    return probs


def suspects_grid(
    paths: list[str], given: list[str], suggested: list[str], out: Path, columns: int = 4, side: int = 192
) -> None:
    """A PNG grid of images, each captioned "given → suggested"."""
    if not paths:
        return
    caption = 36
    rows = (len(paths) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * side, rows * (side + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (path, g, s) in enumerate(zip(paths, given, suggested, strict=True)):
        x, y = (i % columns) * side, (i // columns) * (side + caption)
        try:
            tile = ImageOps.fit(load_rgb(path, side), (side - 8, side - 8))
        except Exception:  # noqa: BLE001 - a file that vanished since the scan: leave its tile blank
            tile = Image.new("RGB", (side - 8, side - 8), "lightgrey")
        sheet.paste(tile, (x + 4, y + 4))
        draw.text((x + 4, y + side), f"{i + 1}. {g} -> {s}"[:32], fill="black")
        draw.text((x + 4, y + side + 14), Path(path).name[:30], fill="dimgray")
    sheet.save(out)
