"""`make bench`: the project's feature extraction against the seed's plain loop, on the same data.

Runs, in one invocation, each from a cold feature cache:
  - the seed-style loop (benchmarks/seed_loop.py) and lite0_fe with its default config, same epochs;
  - lite0_fe with model.cache.train_views = 0, 2, 4 (to choose the default K);
  - an 8-job lr x dropout sweep against one job;
  - the same speed comparison for resnet50 with random weights (no pretrained file is needed for speed).
For every project run, the floor: one forward pass of the backbone at the run's precision over every image
the run embeds. Prints the tables and writes them to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from src.models.backbones import build_backbone
from src.utils.precision import fastest_precision

REPO = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def seed_run(data: Path, backbone: str, epochs: int, random_weights: bool, work: Path) -> dict:
    log = work / f"seed-{backbone}.log"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.seed_loop",
        "--data",
        str(data),
        "--backbone",
        backbone,
        "--epochs",
        str(epochs),
    ] + (["--random-weights"] if random_weights else [])
    timed(cmd, log)
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"result"')][-1]


def project_run(name: str, overrides: list[str], work: Path) -> dict:
    run_dir = work / name
    cmd = [
        sys.executable,
        "-m",
        "src.train",
        *overrides,
        f"model.cache.dir={work / ('cache-' + name)}",
        f"hydra.run.dir={run_dir}",
    ]
    process_s = timed(cmd, work / f"{name}.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["process_s"] = process_s
    return summary


def floor_seconds(backbone: str, weights: str | None, precision: str, n_images: int, batch: int) -> float:
    """Seconds for one forward pass of the backbone over ``n_images`` at ``precision``, channels_last."""
    net = build_backbone(backbone, weights).module.eval().to(memory_format=torch.channels_last)
    bf16 = precision.startswith("bf16")
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(x)  # warm-up: oneDNN builds its kernels on the first call
        start = time.perf_counter()
        full, rest = divmod(n_images, batch)
        for _ in range(full):
            net(x)
        if rest:
            net(x[:rest])
        return time.perf_counter() - start


def images_embedded(train: int, val: int, views: int, epochs: int) -> int:
    return val + (views * train if views > 0 else epochs * train)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera_data"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--r50-seed-epochs", type=int, default=2, help="resnet50's seed loop is slow: time fewer, scale")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    a = p.parse_args()
    data = Path(a.data).resolve()
    if not (data / "train").is_dir():
        sys.exit(f"no ImageFolder at {data}: pass --data /path/to/hymenoptera_data")
    train_n = sum(1 for _ in (data / "train").rglob("*") if _.is_file())
    val_n = sum(1 for _ in (data / "val").rglob("*") if _.is_file())
    precision = fastest_precision()
    E = a.epochs
    base = ["experiment=lite0_fe", f"data.root={data}", f"trainer.max_epochs={E}"]
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"scratch: {work}", flush=True)

    rows = {}
    print("seed loop, efficientnet_lite0 ...", flush=True)
    seed = seed_run(data, "efficientnet_lite0", E, False, work)
    for k in (1, 0, 2, 4):
        name = f"lite0_fe K={k}" + (" (default)" if k == 1 else "")
        print(f"{name} ...", flush=True)
        rows[k] = project_run(f"lite0-k{k}", [*base, f"model.cache.train_views={k}"], work)
        rows[k]["floor_s"] = floor_seconds(
            "efficientnet_lite0", "DEFAULT", precision, images_embedded(train_n, val_n, k, E), 32
        )

    print("8-job sweep ...", flush=True)
    sweep_dir = work / "sweep"
    sweep_cmd = [
        sys.executable,
        "-m",
        "src.train",
        "-m",
        *base,
        "model.optimizer.lr=0.001,0.003,0.01,0.03",
        "model.head.dropout=0.2,0.4",
        f"model.cache.dir={work / 'cache-sweep'}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    sweep_process_s = timed(sweep_cmd, work / "sweep.log")
    jobs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]
    sweep_jobs_s = sum(j["wall_s"] for j in jobs)

    print("resnet50 (random weights) ...", flush=True)
    r50_seed = seed_run(data, "resnet50", a.r50_seed_epochs, True, work)
    r50_seed_10 = r50_seed["wall_s"] * E / a.r50_seed_epochs
    r50 = project_run(
        "r50-k1",
        ["experiment=resnet50_fe", f"data.root={data}", f"trainer.max_epochs={E}", "model.backbone.weights=null"],
        work,
    )
    r50["floor_s"] = floor_seconds("resnet50", None, precision, images_embedded(train_n, val_n, 1, E), 32)

    per_epoch = train_n + val_n

    def speed_row(label: str, wall: float, loss: float, acc: float, ref: float, floor: float | None) -> str:
        floor_txt = f"{floor:.1f} ({wall / floor:.2f}×)" if floor else "—"
        return (
            f"| {label} | {wall:.1f} | {E * per_epoch / wall:.0f} | {loss:.4f} | {acc:.4f} | "
            f"{ref / wall:.1f}× | {floor_txt} |"
        )

    head = (
        "| run | wall s | images/s | best val loss | val acc at best loss | vs seed | floor s (run/floor) |\n"
        "|---|---|---|---|---|---|---|"
    )
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else "?"
    )
    lines = [
        "# Benchmarks",
        "",
        f"`make bench` on {data.name} ({train_n} train / {val_n} val images), {E} epochs, "
        f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, precision {precision}, "
        f"{time.strftime('%Y-%m-%d')}. Every project run starts from a cold feature cache; its wall time is "
        "summary.json's wall_s (data setup, embedding and every epoch). images/s = epochs × "
        "(train + val) / wall. The floor is one forward pass of the backbone at the run's precision "
        "(channels_last, batch 32) over every image the run embeds: val once plus K views of train, "
        "or every epoch's train when K = 0.",
        "",
        "## efficientnet_lite0 (ImageNet weights)",
        "",
        head,
        f"| seed loop (fp32, BN train mode, backbone every epoch) | {seed['wall_s']:.1f} | "
        f"{E * per_epoch / seed['wall_s']:.0f} | {seed['best_val_loss']:.4f} | {seed['best_val_acc']:.4f} | 1.0× | — |",
    ]
    for k in (1, 0, 2, 4):
        r = rows[k]
        label = f"lite0_fe, train_views={k}" + (" (default)" if k == 1 else "")
        lines.append(speed_row(label, r["wall_s"], r["best_val_loss"], r["best_val_acc"], seed["wall_s"], r["floor_s"]))
    one = rows[1]
    lines += [
        "",
        "## An 8-job lr × dropout sweep (lite0_fe, shared cold cache)",
        "",
        "| measure | one job | 8-job sweep | ratio |",
        "|---|---|---|---|",
        f"| process wall s (imports and start-up included) | {one['process_s']:.1f} | {sweep_process_s:.1f} | "
        f"{sweep_process_s / one['process_s']:.2f}× |",
        f"| sum of the jobs' wall_s | {one['wall_s']:.1f} | {sweep_jobs_s:.1f} | {sweep_jobs_s / one['wall_s']:.2f}× |",
        f"| backbone passes (cache misses) | {one['feature_cache']['misses']} | "
        f"{sum(j['feature_cache']['misses'] for j in jobs)} | |",
        "",
        f"## resnet50 (random weights: speed only; seed loop timed for {a.r50_seed_epochs} epochs, scaled to {E})",
        "",
        head,
        f"| seed loop | {r50_seed_10:.1f} | {E * per_epoch / r50_seed_10:.0f} | — | — | 1.0× | — |",
        speed_row(
            "resnet50_fe, train_views=1",
            r50["wall_s"],
            r50["best_val_loss"],
            r50["best_val_acc"],
            r50_seed_10,
            r50["floor_s"],
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = out.read_text() if out.exists() else ""
    marker = "\n## Notes"  # hand-written analysis and GPU tables follow the generated part: keep them
    keep = previous[previous.index(marker) :] if marker in previous else ""
    out.write_text(text + keep)
    print(f"written to {out}; runs in {work}")


if __name__ == "__main__":
    main()
