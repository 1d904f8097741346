"""`make bench-ft-stages`: what a fine-tuning epoch costs at each stage, with and without the feature cache.

Runs experiment=lite0_ft for 2 epochs on one schedule at a time (every group from epoch 0; head only; the
last 2 groups from epoch 0), each with the cache (the default: frozen parts served from it) and the head-only
and last-2 stages also with model.cache.enabled=false (the whole backbone every epoch, as fine-tuning ran
before). Reports the second epoch's seconds (summary.json history: training and validation, embedding done
in the first) and its ratio to a full fine-tuning epoch. Writes the "## Fine-tuning stages" section of
docs/benchmarks.md (the rest of the file is kept).
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

from benchmarks.report import replace_section
from src.utils.precision import fastest_precision

REPO = Path(__file__).resolve().parent.parent
STAGES = {  # name -> schedule override (None: lite0_ft's)
    "every group": "model.finetune.schedule=[{epoch:0,groups:all}]",
    "head only": None,  # the experiment's own schedule: its first two epochs train the head only
    "last 2 groups": "model.finetune.schedule=[{epoch:0,groups:2}]",
}


def run(name: str, schedule: str | None, cache: bool, data: Path, work: Path) -> dict:
    folder = work / name.replace(", ", "-").replace(" ", "_")
    cmd = [sys.executable, "-m", "src.train", "experiment=lite0_ft", f"data.root={data}", "trainer.max_epochs=2"]
    cmd += [f"model.cache.dir={work / 'cache'}", f"model.cache.enabled={str(cache).lower()}"]
    cmd += [f"hydra.run.dir={folder}", *([schedule] if schedule else [])]
    with open(f"{folder}.log", "w") as log:
        if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{name} failed: see {folder}.log")
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera_data"))
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    a = p.parse_args()
    data = Path(a.data).resolve()
    work = Path(tempfile.mkdtemp(prefix="ft-stages-"))
    rows, full = [], None
    for stage, schedule in STAGES.items():
        for cache in (True, False) if stage != "every group" else (True,):
            name = f"{stage}{'' if cache else ', cache off'}"
            print(f"{name} ...", flush=True)
            s = run(name, schedule, cache, data, work)
            second = s["history"][1]["seconds"]
            full = second if full is None else full
            served = "; ".join(x["served_from"] for x in s["feature_cache"].get("stages", [])) or "images"
            rows.append(f"| {name} | {second:.2f} | {second / full:.3f} | {served} |")
    body = "\n".join(
        [
            f"`make bench-ft-stages` on {data.name}, lite0_ft, 2 epochs per run, second epoch's seconds (training "
            f"and validation); precision {fastest_precision()}, torch {torch.__version__}, "
            f"{platform.processor() or 'CPU'} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}. The first "
            "epoch also embeds what the cache serves (pooled features or the frozen groups' outputs: one pass, "
            "K=1 view).",
            "",
            "| stage | s / epoch | × an every-group epoch | served from |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    replace_section(Path(a.out), "Fine-tuning stages", body)
    print(f"written to {a.out}; runs in {work}")


if __name__ == "__main__":
    main()
