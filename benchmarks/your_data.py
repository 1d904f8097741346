"""`make bench-data`: the "your data" features measured on a split dataset merged into one folder.

On a copy of the data (symlinks) with train/ and val/ merged into class folders, writes docs/data_figures.md:
split time; best val accuracy of the merged set vs the split set; audit time and how many of 5 planted
wrong labels it ranks in its top 10; pHash bits and centred feature cosines of resized + re-encoded and
cropped copies vs distinct photos (what data.near_duplicates and audit.near_cosine are chosen from); and
the cost of a 5-fold sweep vs one run, each from a cold feature cache.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.data.preflight import signature
from src.utils.precision import fastest_precision

REPO = Path(__file__).resolve().parent.parent
IMAGE_TYPES = (".jpg", ".jpeg", ".png")


def merge(data: Path, out: Path, planted: int = 0) -> list[Path]:
    """Class folders with every split's images (symlinks); ``planted`` images of the first class copied into
    the second under new names (label errors). Returns the planted files."""
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    for c in classes:
        (out / c).mkdir(parents=True)
        for split in ("train", "val"):
            for f in sorted((data / split / c).iterdir()):
                if f.suffix.lower() in IMAGE_TYPES:
                    os.symlink(f.resolve(), out / c / f"{split}_{f.name}")
    sources = sorted((out / classes[0]).iterdir())[-planted:] if planted else []
    copies = []
    for i, f in enumerate(sources):
        copies.append(out / classes[1] / f"planted_{i}{f.suffix}")
        copies[-1].write_bytes(f.read_bytes())
    return copies


def run(module: str, work: Path, name: str, *overrides: str, sweep: bool = False) -> float:
    cmd = [sys.executable, "-m", module, *(["-m"] if sweep else []), *overrides]
    cmd.append(f"hydra.{'sweep' if sweep else 'run'}.dir={work / name}")
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{name} failed: see {work / name}.log")
    return time.perf_counter() - start


def summary(path: Path) -> dict:
    return json.loads(path.read_text())


def copies_and_distinct(folder: Path, limit: int) -> dict[str, list[float]]:
    """pHash bits and centred lite0 feature cosines: each image vs its resized/re-encoded and cropped copy,
    and every distinct pair of the originals (same class)."""
    from torchvision import transforms as T

    from src.data.images import load_rgb
    from src.models.backbones import build_backbone, weights_preprocessing

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_TYPES)[:limit]
    originals = [load_rgb(f) for f in files]

    def variant(im: Image.Image, scale: float, crop: float, quality: int) -> Image.Image:
        w, h = im.size
        im = im.crop((int(w * crop), int(h * crop), int(w * (1 - crop)), int(h * (1 - crop))))
        im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    kinds = {"resized 70 %, JPEG q60": (0.7, 0.0, 60), "resized 80 %, 5 % cropped per side, q75": (0.8, 0.05, 75)}
    weights = weights_preprocessing("efficientnet_lite0")
    mean, std = weights.mean, weights.std
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
    net = build_backbone("efficientnet_lite0", "DEFAULT").module.eval()

    @torch.inference_mode()
    def feats(images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), 32):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fastest_precision() == "bf16-mixed"):
                out.append(net(torch.stack([tf(im) for im in images[i : i + 32]])).float())
        return torch.cat(out)

    base = feats(originals)
    centre = base.mean(0, keepdim=True)
    unit = torch.nn.functional.normalize(base - centre, dim=1)
    hashes = [int(signature(im)[:16], 16) for im in originals]
    result: dict[str, list[float]] = {}
    for kind, (scale, crop, quality) in kinds.items():
        copies = [variant(im, scale, crop, quality) for im in originals]
        cu = torch.nn.functional.normalize(feats(copies) - centre, dim=1)
        result[f"{kind}: cosine"] = (unit * cu).sum(1).tolist()
        result[f"{kind}: pHash bits"] = [
            (h ^ int(signature(c)[:16], 16)).bit_count() for h, c in zip(hashes, copies, strict=True)
        ]
    sim = unit @ unit.T
    iu = torch.triu_indices(len(files), len(files), 1)
    result["distinct photos: cosine"] = sim[iu[0], iu[1]].tolist()
    result["distinct photos: pHash bits"] = [
        (hashes[i] ^ hashes[j]).bit_count() for i, j in zip(iu[0].tolist(), iu[1].tolist(), strict=True)
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera_data")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "data_figures.md")
    args = parser.parse_args()
    data = args.data.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    flat = work / "flat"
    merge(data, flat)
    planted_root = work / "planted"
    planted = merge(data, planted_root, planted=5)

    from src.data.listing import SplitOptions, list_images

    start = time.perf_counter()
    listing = list_images(flat, {"train": "train", "val": "val", "test": "test"}, None, SplitOptions(seed=42))
    split_s = time.perf_counter() - start
    n_images = sum(len(v) for v in listing.samples.values())

    common = ["experiment=lite0_fe", f"trainer.max_epochs={args.epochs}", f"paths.cache_dir={work / 'pre'}"]
    run("src.train", work, "split", *common, f"data.root={data}", f"model.cache.dir={work / 'c-split'}")
    one_s = run("src.train", work, "flat", *common, f"data.root={flat}", f"model.cache.dir={work / 'c-flat'}")
    folds_s = run(
        "src.train",
        work,
        "kfold",
        *common,
        f"data.root={flat}",
        "data.split.folds=5",
        "data.split.fold=0,1,2,3,4",
        f"model.cache.dir={work / 'c-kfold'}",
        sweep=True,
    )
    audit_s = run(
        "src.audit",
        work,
        "audit",
        f"data.root={planted_root}",
        f"model.cache.dir={work / 'c-audit'}",
        f"paths.cache_dir={work / 'pre-audit'}",
    )
    split_run, flat_run = summary(work / "split" / "summary.json"), summary(work / "flat" / "summary.json")
    folds = [summary(work / "kfold" / str(i) / "summary.json") for i in range(5)]
    kfold = json.loads((work / "kfold" / "kfold_summary.json").read_text())[0]
    audit = summary(work / "audit" / "audit.json")
    with open(work / "audit" / "label_issues.csv", newline="") as fh:
        top10 = [r["path"] for r in list(csv.DictReader(fh))[:10]]
    found = sum(any(p.endswith(f.name) for p in top10) for f in planted)
    measured = copies_and_distinct(data / "train" / sorted(listing.classes)[0], 60)

    def dist(values: list[float]) -> str:
        v = np.asarray(values)
        return (
            f"min {v.min():.3f} · median {np.median(v):.3f} · 99th pct {np.percentile(v, 99):.3f} · max {v.max():.3f}"
        )

    lines = [
        "# Your data: measurements",
        "",
        f"`make bench-data` on {data.name} ({n_images} images merged from train/ and val/ into one folder), "
        f"lite0_fe, {args.epochs} epochs, seed 42, {fastest_precision()}; host: {os.cpu_count()} CPUs. "
        "Each run starts from a cold feature cache of its own.",
        "",
        "| what | figure |",
        "|---|---|",
        f"| listing + stratified split of {n_images} images | {split_s * 1000:.0f} ms |",
        f"| best val acc, the given train/val split ({sum(split_run['images']['val'].values())} val) | "
        f"{split_run['best_val_acc']:.4f} (val loss {split_run['best_val_loss']:.4f}) |",
        f"| best val acc, merged and split 80/20 ({sum(flat_run['images']['val'].values())} val) | "
        f"{flat_run['best_val_acc']:.4f} (val loss {flat_run['best_val_loss']:.4f}) |",
        f"| one run: wall / embedded images | {one_s:.1f} s (train {flat_run['wall_s']:.1f} s) / "
        f"{flat_run['feature_cache']['embedded_images']} |",
        f"| 5-fold sweep: wall / embedded images over all folds | {folds_s:.1f} s / "
        f"{sum(f['feature_cache']['embedded_images'] for f in folds)} |",
        f"| 5 folds: best val acc / macro-F1 | {kfold['best_val_acc']['mean']:.4f} ± {kfold['best_val_acc']['std']:.4f}"
        f" / {kfold['best_val_macro_f1']['mean']:.4f} ± {kfold['best_val_macro_f1']['std']:.4f} |",
        f"| audit ({audit['images']} images, 5 planted wrong labels): wall | {audit_s:.1f} s "
        f"(scan {audit['scan_s']} s, embed {audit['embed_s']} s, ranking {audit['rank_s']} s) |",
        f"| planted wrong labels in the audit's top 10 | {found} of 5 |",
        "",
        "## Copies vs distinct photos (60 photos of one class)",
        "",
        "Cosine of lite0 features centred on the set's mean; pHash: bits that differ of 64.",
        "",
        "| pair | value |",
        "|---|---|",
        *[f"| {k} | {dist(v)} |" for k, v in measured.items()],
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
