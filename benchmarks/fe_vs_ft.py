"""`make bench-ft`: feature extraction vs fine-tuning on the same data, over several seeds.

Runs experiment=lite0_fe, experiment=lite0_ft (its frozen parts served from the feature cache, the default)
and lite0_ft with the cache off (every epoch through the whole backbone, freshly augmented: fine-tuning
before the cache served it) once per seed, each from a cold feature cache, and writes docs/fe_vs_ft.md: mean
± std of the best-val-loss epoch's val accuracy, and the time per epoch (wall_s / epochs, embedding
included). ``--data`` another ImageFolder (e.g. one from benchmarks.harder_set), ``--out`` another report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from src.utils.precision import fastest_precision

REPO = Path(__file__).resolve().parent.parent


# name -> (experiment, extra overrides)
VARIANTS = {
    "lite0_fe": ("lite0_fe", []),
    "lite0_ft": ("lite0_ft", []),
    "lite0_ft_uncached": ("lite0_ft", ["model.cache.enabled=false"]),
}


def run(variant: str, data: Path, seed: int, epochs: int, work: Path) -> dict:
    experiment, extra = VARIANTS[variant]
    name = f"{variant}-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "src.train",
        f"experiment={experiment}",
        f"data.root={data}",
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        f"model.cache.dir={work / ('cache-' + name)}",
        f"hydra.run.dir={work / name}",
        *extra,
    ]
    with open(work / f"{name}.log", "w") as log:
        if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{name} failed; see {work / (name + '.log')}")
    return json.loads((work / name / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera_data"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "docs" / "fe_vs_ft.md"))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    a = p.parse_args()
    data = Path(a.data).resolve()
    if not (data / "train").is_dir():
        sys.exit(f"no ImageFolder at {data}: pass --data /path/to/hymenoptera_data")
    seeds = [int(s) for s in a.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fe-vs-ft-"))
    rows = []
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    for experiment in variants:
        accs, per_epoch = [], []
        for seed in seeds:
            print(f"{experiment} seed {seed} ...", flush=True)
            s = run(experiment, data, seed, a.epochs, work)
            accs.append(s["best_val_acc"])
            per_epoch.append(s["wall_s"] / s["epochs"])
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(
            f"| {experiment} | {statistics.mean(accs):.4f} ± {std:.4f} | {', '.join(f'{x:.4f}' for x in accs)} "
            f"| {statistics.mean(per_epoch):.2f} |"
        )
    text = (
        "\n".join(
            [
                "# Feature extraction vs fine-tuning",
                "",
                f"`make bench-ft` on {data.name}, {a.epochs} epochs, seeds {a.seeds}, precision {fastest_precision()}, "
                f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, CPU only. Accuracy: val accuracy of the "
                "best-val-loss epoch; time per epoch: wall_s / epochs (data setup and embedding included).",
                "",
                "| run | best val acc, mean ± std | per seed | s / epoch |",
                "|---|---|---|---|",
                *rows,
                "",
                "lite0_fe: frozen backbone, cached features (train_views=1). lite0_ft: head only for epochs 0-1, "
                "blocks.6 + head_conv from epoch 2, every group from epoch 4, backbone at 0.1 x the head's LR, "
                "warm-up + cosine schedule, BatchNorm frozen; its head-only epochs train on cached pooled features "
                "and its blocks.6 + head_conv epochs on cached outputs of stem..blocks.5 (train_views=1: one "
                "augmented view per image, the same each epoch). lite0_ft_uncached (model.cache.enabled=false): "
                "every epoch through the whole backbone, freshly augmented.",
            ]
        )
        + "\n"
    )
    print(text)
    Path(a.out).write_text(text)
    print(f"written to {a.out}; runs in {work}")


if __name__ == "__main__":
    main()
