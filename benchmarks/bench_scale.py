"""`make bench-scale`: the frozen-backbone path on a generated set of many images.

Generates N images (default 10,000: 10 classes, 80% train / 20% val, 128×128 JPEGs of coloured ellipses), then
runs lite0_fe for 2 epochs three times against one cache folder: cold, identical again, and after adding 100
new training images. Reports the embedding rate, the peak RSS of the run (its DataLoader workers included),
the cache's size on disk, each run's wall time and how many images the third run embedded. Writes the table
into docs/benchmarks.md (its "## Scale: N images" section; the rest of the file is kept). ``--crop 56`` makes
100,000 images affordable on a CPU (memory, not the forward, is what the larger runs measure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from benchmarks.report import replace_section

REPO = Path(__file__).resolve().parent.parent


def generate(root: Path, images: int, classes: int = 10, size: int = 128) -> None:
    rng = random.Random(0)
    per_class = images // classes
    for split, share in (("train", 0.8), ("val", 0.2)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(round(per_class * share)):
                im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
                x, y, r = rng.randrange(10, size // 2), rng.randrange(10, size // 2), 20 + 4 * c
                colour = tuple((37 * c + 60 * k) % 256 for k in range(3))
                ImageDraw.Draw(im).ellipse((x, y, x + r, y + r), fill=colour)
                im.save(folder / f"{i:05d}.jpg", quality=90)


def run(name: str, data: Path, cache: Path, work: Path, crop: int | None = None) -> dict:
    """One lite0_fe run in its own process: its summary, wall time and peak RSS (largest process of the run).
    ``crop``: images resized to 8/7 of it and cropped to it instead of the recipe's 256/224."""
    cmd = [sys.executable, "-m", "src.train", "experiment=lite0_fe", f"data.root={data}", "trainer.max_epochs=2"]
    if crop:
        cmd += [f"data.resize={round(crop * 8 / 7)}", f"data.crop={crop}"]
    cmd += [f"model.cache.dir={cache}", f"paths.cache_dir={work / 'cache'}", f"hydra.run.dir={work / name}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{name} failed: see {work / (name + '.log')}")
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    summary = json.loads((work / name / "summary.json").read_text())
    return {"summary": summary, "wall": wall, "peak_gb": peak_kb / 2**20, "peak_grew": peak_kb > before}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--work", default=None, help="a folder to keep the set, runs and cache in (default: temporary)")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument(
        "--crop", type=int, default=None, help="crop to this size instead of 224 (e.g. 56: memory at 100,000 images)"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(args.work or tmp)
        data, cache = work / "images", work / "features"
        start = time.perf_counter()
        generate(data, args.images)
        made = time.perf_counter() - start
        cold = run("cold", data, cache, work, args.crop)
        again = run("again", data, cache, work, args.crop)
        for i in range(100):
            Image.new("RGB", (128, 128), (i, 255 - i, 128)).save(data / "train" / f"c{i % 10}" / f"new_{i:03d}.jpg")
        added = run("added", data, cache, work, args.crop)
        cache_mb = folder_bytes(cache) / 2**20
    fc = cold["summary"]["feature_cache"]
    rate = fc["embedded_images"] / max(fc["embed_s"], 1e-9)
    body = f"""
{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime("%B %Y")}; `make bench-scale`:
{args.images:,} generated 128×128 JPEGs (10 classes, 80/20 split; made in {made:.0f} s), lite0_fe for 2 epochs
{f"at {args.crop}-px crops (resize {round(args.crop * 8 / 7)})" if args.crop else "(the recipe's 256/224)"}, three runs
sharing one feature cache.

| | figure |
|---|---|
| cold run: wall time | {cold["wall"]:.1f} s ({cold["summary"]["wall_s"]:.1f} s of it in training, embedding included) |
| cold run: embedding rate | {rate:.1f} images/s ({fc["embedded_images"]:,} images in {fc["embed_s"]:.1f} s) |
| peak RSS of a run (largest process) | {max(cold["peak_gb"], again["peak_gb"], added["peak_gb"]):.2f} GB |
| feature cache on disk | {cache_mb:.1f} MB |
| identical second run: wall time | {again["wall"]:.1f} s ({again["summary"]["wall_s"]:.1f} s in training) |
| after adding 100 training images: images embedded | {added["summary"]["feature_cache"]["embedded_images"]} |
| after adding 100 training images: wall time | {added["wall"]:.1f} s |
"""
    print(body)
    title = f"Scale: {args.images:,} images" + (f", {args.crop}-px crops" if args.crop else "")
    replace_section(Path(args.out), title, body)


if __name__ == "__main__":
    main()
