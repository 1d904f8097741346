"""A harder image set than hymenoptera for fine-tuning comparisons: small shapes on clutter.

Four classes (circle, square, triangle, cross), each a small shape (18-36 px) of a random colour placed
anywhere on a 128-px image of random lines and boxes: colour and place say nothing about the class, and
ImageNet's pooled features see mostly clutter, so fine-tuning and augmentation matter more than on
hymenoptera. Deterministic (seeded). Usage: python -m benchmarks.harder_set OUT [--train 50 --val 25]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross")


def colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


def draw_shape(d: ImageDraw.ImageDraw, kind: str, x: int, y: int, s: int, fill: tuple[int, int, int]) -> None:
    if kind == "circle":
        d.ellipse((x, y, x + s, y + s), fill=fill)
    elif kind == "square":
        d.rectangle((x, y, x + s, y + s), fill=fill)
    elif kind == "triangle":
        d.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    else:
        w = max(3, s // 4)
        d.rectangle((x + (s - w) / 2, y, x + (s + w) / 2, y + s), fill=fill)
        d.rectangle((x, y + (s - w) / 2, x + s, y + (s + w) / 2), fill=fill)


def image(rng: random.Random, kind: str, size: int = 128) -> Image.Image:
    im = Image.new("RGB", (size, size), colour(rng))
    d = ImageDraw.Draw(im)
    for _ in range(12):  # clutter: lines and hollow boxes in random colours
        a, b = (rng.randrange(size), rng.randrange(size)), (rng.randrange(size), rng.randrange(size))
        if rng.random() < 0.5:
            d.line([a, b], fill=colour(rng), width=rng.randrange(1, 4))
        else:
            d.rectangle((min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1])), outline=colour(rng))
    s = rng.randrange(18, 37)
    draw_shape(d, kind, rng.randrange(0, size - s), rng.randrange(0, size - s), s, colour(rng))
    return im


def make(root: Path, train: int, val: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for split, n in (("train", train), ("val", val)):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image(rng, kind).save(folder / f"{i:04d}.jpg", quality=92)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--train", type=int, default=50, help="training images per class")
    p.add_argument("--val", type=int, default=25, help="validation images per class")
    a = p.parse_args()
    make(Path(a.out), a.train, a.val)
    print(f"wrote {len(CLASSES)} classes x ({a.train} train + {a.val} val) to {a.out}")


if __name__ == "__main__":
    main()
