"""Decode any image file into an 8-bit RGB PIL image, the way the backbone expects it."""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# 16- and 32-bit greyscale modes: PIL's convert() clips them to 255 instead of scaling
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# The eval transform resizes the short side (e.g. to 256): a 1×30,000-px strip of a few hundred bytes would
# become 256×7.7 M pixels (9 GB). Photos, scans and panoramas stay well inside 25:1.
MAX_ASPECT_RATIO = 25


class ImageShapeError(ValueError):
    """An image with an empty side or too elongated to preprocess."""


def check_shape(size: tuple[int, int]) -> None:
    """Refuse, from the header's size alone, an image with an empty side or a side over MAX_ASPECT_RATIO times
    the other (its resize to the model's input would need gigabytes)."""
    width, height = size
    if min(width, height) < 1:
        raise ImageShapeError(f"the image is {width}×{height} px: it has no pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageShapeError(
            f"the image is {width}×{height} px, more than {MAX_ASPECT_RATIO} times longer than wide: resizing its "
            "short side to the model's input would take gigabytes"
        )


def load_rgb(path: str | os.PathLike | BinaryIO, min_side: int | None = None) -> Image.Image:
    """Open ``path`` (or a binary file object), apply its EXIF orientation and convert it to RGB (grey,
    palette, alpha, CMYK, 16-bit).

    ``min_side``: a JPEG at least twice that large on its short side is decoded at a reduced scale (PIL's
    draft mode: 1/2, 1/4 or 1/8 in the DCT) that keeps its short side >= ``min_side``. The transforms
    resize far below that anyway, so only resampling noise changes, at a fraction of the decoding time.
    """
    with Image.open(path) as img:
        check_shape(img.size)
        if min_side and img.format == "JPEG" and min(img.size) >= 2 * min_side:
            scale = min_side / min(img.size)
            img.draft("RGB", (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))))
        img = ImageOps.exif_transpose(img)  # a fully loaded copy, rotated as the camera meant it
        return to_rgb(img)


def pil_rgb(img: Image.Image) -> Image.Image:
    """An in-memory PIL image prepared as ``load_rgb`` prepares a file: shape checked, EXIF orientation
    applied, converted to RGB (wide greyscale scaled, not clipped)."""
    check_shape(img.size)
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB, scaling wide greyscale instead of clipping it."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "I" or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency must go through RGBA to convert cleanly
    return img.convert("RGB")


class RGBLoader:
    """ImageFolder loader: ``load_rgb`` with a fixed ``min_side``; a stable repr for cache keys."""

    def __init__(self, min_side: int | None) -> None:
        self.min_side = min_side

    def __call__(self, path: str) -> Image.Image:
        return load_rgb(path, self.min_side)

    def __repr__(self) -> str:
        return f"RGBLoader(min_side={self.min_side})"
