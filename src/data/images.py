"""Decode any image file into an 8-bit RGB PIL image, the way the backbone expects it."""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# 16- and 32-bit greyscale modes (PIL's convert() clips them to 255 instead of scaling) and their full-scale values:
# the first at or above the image's largest value scales it to 0..255, else the last (a 32-bit "I" image holding
# 8-bit values is 8-bit). src.export writes this table into export.json for clients without torch.
WIDE_GREYSCALE = {"I;16": (65535,), "I;16B": (65535,), "I;16L": (65535,), "I;16N": (65535,), "I": (255, 65535)}
# The eval transform resizes the short side (e.g. to 256): a 1×30,000-px strip of a few hundred bytes would
# become 256×7.7 M pixels (9 GB). Photos, scans and panoramas stay well inside 25:1.
MAX_ASPECT_RATIO = 25


class ImageShapeError(ValueError):
    """An image with an empty side or too elongated to preprocess."""


class ImageTooLargeError(ImageShapeError):
    """An image whose decoding would produce more pixels than the caller's budget (``max_pixels``)."""


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


def check_pixels(size: tuple[int, int], max_pixels: int, decoded: tuple[int, int] | None = None) -> None:
    """Refuse an image whose decoding would produce more than ``max_pixels`` pixels: ``size`` from its header,
    ``decoded`` the size it is decoded at when smaller (a JPEG in draft mode). A 13000×13000 greyscale PNG is
    190 KB and below PIL's decompression-bomb limit, yet takes seconds and gigabytes to decode."""
    width, height = decoded or size
    if width * height > max_pixels:
        at = f", decoded at {width}×{height}" if decoded and decoded != size else ""
        raise ImageTooLargeError(
            f"the image is {size[0]}×{size[1]} px{at}: {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:g} megapixels"
        )


def load_rgb(
    path: str | os.PathLike | BinaryIO, min_side: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Open ``path`` (or a binary file object), apply its EXIF orientation and convert it to RGB (grey,
    palette, alpha, CMYK, 16-bit).

    ``min_side``: a JPEG at least twice that large on its short side is decoded at a reduced scale (PIL's
    draft mode: 1/2, 1/4 or 1/8 in the DCT) that keeps its short side >= ``min_side``. The transforms
    resize far below that anyway, so only resampling noise changes, at a fraction of the decoding time.

    ``max_pixels``: refuse (``ImageTooLargeError``), from the header and before decoding, an image that would
    decode to more pixels; a JPEG counts the pixels of its reduced scale (what decoding it costs). None: no limit.
    """
    with Image.open(path) as img:
        check_shape(img.size)
        size = img.size
        if min_side and img.format == "JPEG" and min(img.size) >= 2 * min_side:
            scale = min_side / min(img.size)
            img.draft("RGB", (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))))
        if max_pixels is not None:
            check_pixels(size, max_pixels, img.size)
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
    if img.mode in WIDE_GREYSCALE:
        arr = np.asarray(img, dtype=np.float64)
        fulls = WIDE_GREYSCALE[img.mode]
        top = float(next((f for f in fulls if f >= arr.max(initial=0)), fulls[-1]))
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
