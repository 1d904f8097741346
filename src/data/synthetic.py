"""A small synthetic ImageFolder of coloured shapes: the offline default dataset, generated on first use."""

from __future__ import annotations

import colorsys
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from src.utils.io import current_umask

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
# one shape and one hue family per class: visually distinct, yet varied in size, place, tint and background
SHAPES = {"circle": 0.0, "square": 0.33, "triangle": 0.62, "cross": 0.83}


def make_shapes_dataset(
    root: Path,
    classes: Sequence[str],
    train_per_class: int,
    val_per_class: int,
    image_size: int,
    seed: int,
) -> None:
    """Generate ``root``/{train,val}/<class>/*.png deterministically unless a complete copy is there.

    Built in a temporary folder and renamed into place, so an interrupted run never leaves half a dataset.
    """
    root = Path(root)
    if (root / COMPLETE_MARKER).is_file():
        return
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(f"Unknown synthetic classes {unknown}; choose from {list(SHAPES)}.")
    log.info("Generating the synthetic shapes dataset into %s", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        rng = np.random.default_rng(seed)
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for name in classes:
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    draw_shape(name, image_size, rng).save(folder / f"{name}_{i:04d}.png")
        (tmp / COMPLETE_MARKER).write_text("synthetic shapes dataset\n")
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; a plain mkdir would follow the umask
        try:
            tmp.rename(root)  # atomic; refused when root exists
        except OSError:
            if (root / COMPLETE_MARKER).is_file():
                return  # a run started alongside this one finished first: its copy is the same
            shutil.rmtree(root)  # an incomplete leftover
            tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def draw_shape(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image: a noisy pale background and a randomly placed, sized and tinted shape of class ``name``."""
    background = rng.integers(170, 255, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    hue = (SHAPES[name] + rng.uniform(-0.05, 0.05)) % 1.0
    color = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.9)))
    r = rng.uniform(0.18, 0.3) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif name == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif name == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
        draw.polygon(pts, fill=color)
    else:  # cross
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.2))))
