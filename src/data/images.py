"""Decode any image file into an 8-bit RGB PIL image, the way the backbone expects it."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

# 16- and 32-bit greyscale modes: PIL's convert() clips them to 255 instead of scaling
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open ``path``, apply its EXIF orientation and convert it to RGB (grey, palette, alpha, CMYK, 16-bit)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # a fully loaded copy, rotated as the camera meant it
        return to_rgb(img)


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
