"""`make bench-predict`: src.predict's images/s over a folder against the model's own forward rate.

Trains lite0_fe for one epoch on the data (or takes --ckpt), links every image of the data set into one
folder (hymenoptera: 397 photos), runs ``python -m src.predict`` over it (decoding in DataLoader workers) and
reads the rate it logs; then times the same model's forward pass alone over the same images, decoded and
preprocessed beforehand, in batches of the same size. Writes the table into docs/benchmarks.md (its
"## Prediction" section; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from benchmarks.report import replace_section
from src.inference.classifier import Classifier

REPO = Path(__file__).resolve().parent.parent
RATE = re.compile(r"(\d+) images in ([\d.]+) s \(([\d.]+) images/s, (\d+) decoding workers\)")


def run(cmd: list[str], log: Path) -> str:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n" + log.read_text()[-3000:])
    return log.read_text()


def checkpoint(data: Path, work: Path) -> str:
    run_dir = work / "train"
    args = ["experiment=lite0_fe", f"data.root={data}", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]
    run([sys.executable, "-m", "src.train", *args, f"paths.cache_dir={work / 'cache'}"], work / "train.log")
    return json.loads((run_dir / "summary.json").read_text())["best_checkpoint"]


def forward_rate(ckpt: str, files: list[Path], batch_size: int, device: str) -> float:
    """Images/s of the model's forward pass alone (as src.predict runs it) on preprocessed batches."""
    clf = Classifier.from_checkpoint(ckpt, device)
    tensors = [clf.tensor(f) for f in files]
    batches = [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
    clf.probabilities(batches[0])  # warm-up
    if clf.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        clf.probabilities(batch)  # its .cpu() waits for the GPU
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera_data"))
    p.add_argument("--ckpt", default=None, help="a trained checkpoint (default: train lite0_fe for one epoch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = p.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"--data {data} is not a folder")
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        ckpt = args.ckpt or checkpoint(data, work)
        folder = work / "images"
        folder.mkdir()
        files = sorted(p for p in data.rglob("*") if p.name.lower().endswith(IMG_EXTENSIONS))
        for i, f in enumerate(files):
            os.symlink(f.resolve(), folder / f"{i:06d}{f.suffix.lower()}")
        cmd = [sys.executable, "-m", "src.predict", f"ckpt_path={ckpt}", f"input={folder}"]
        cmd += [f"batch_size={args.batch_size}", f"device={args.device}", f"hydra.run.dir={work / 'predict'}"]
        count, seconds, rate, workers = RATE.search(run(cmd, work / "predict.log")).groups()
        forward = forward_rate(ckpt, sorted(folder.iterdir()), args.batch_size, args.device)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    ratio = float(rate) / forward
    body = f"""
{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {device}, torch {torch.__version__},
{time.strftime("%B %Y")}; `make bench-predict`: lite0_fe (1 epoch) over {count} images of {data.name}, batches
of {args.batch_size}, fp32 as src.predict runs it.

| | images/s |
|---|---|
| src.predict over the folder (decoding workers: {workers}; decode, transforms, forward, CSV rows) | {float(rate):.1f} |
| the model's forward pass alone on preprocessed batches | {forward:.1f} |
| ratio | **{ratio:.2f}** |
"""
    print(body)
    replace_section(Path(args.out), "Prediction (src.predict)", body)


if __name__ == "__main__":
    main()
