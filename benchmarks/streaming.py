"""`make bench-stream`: what reading LitData shards (data=streaming) costs against reading the folder.

Writes the training set's shards (src.optimize's own function: list, preflight, litdata.optimize), then
times a training epoch's data alone (decode + the recipe's train transforms, batches of 32, the default
decoding workers, no model) from the folder, from the shards in a local folder, and from the shards read as
object storage is (``local:``: chunks copied into the download cache; cold, then warm). Writes the
"## Streaming (LitData shards)" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from torchvision import transforms as T

from benchmarks.bench_scale import folder_bytes, generate
from benchmarks.report import replace_section
from src.data.datamodule import ImageFolderDataModule, default_num_workers
from src.data.shards import write_shards
from src.data.streaming import StreamingDataModule
from src.models.backbones import weights_preprocessing

REPO = Path(__file__).resolve().parent.parent
BATCH = 32


def recipe() -> tuple[list, list]:
    train = [
        T.RandomResizedCrop(256, scale=(0.8, 1.0)),
        T.RandomRotation(15),
        T.RandomHorizontalFlip(),
        T.CenterCrop(224),
    ]
    return train, [T.Resize(256), T.CenterCrop(224)]


def epoch_rate(dm, passes: int) -> tuple[float, float]:
    """(first pass images/s, best of the later passes) over the training split's loader."""
    loader = dm._image_split_loader("train", shuffle=True)
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        rates.append(n / (time.perf_counter() - start))
    return rates[0], max(rates[1:] or rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera_data"))
    p.add_argument("--images", type=int, default=0, help="generate this many images instead of --data")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    a = p.parse_args()
    weights = weights_preprocessing("efficientnet_lite0")
    train, evaluation = recipe()
    workers = default_num_workers()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = Path(a.data).resolve()
        if a.images:
            data = work / "images"
            generate(data, a.images)
        options = {"num_workers": workers, "seed": 0, "preflight_cache_dir": str(work / "preflight")}
        folder = ImageFolderDataModule(data, train, evaluation, weights.mean, weights.std, **options)
        folder.setup("fit")
        start = time.perf_counter()
        write_shards(folder, str(work / "shards"), 64.0, workers)
        write_s = time.perf_counter() - start
        images = sum(len(d) for d in folder.datasets.values())
        train_images = len(folder.datasets["train"])
        rows = [("image folder", *epoch_rate(folder, a.passes))]
        for name, location in (
            ("shards, local folder", str(work / "shards")),
            ("shards as object storage (`local:`)", f"local:{work / 'shards'}"),
        ):
            shutil.rmtree(work / "download", ignore_errors=True)
            streamed = StreamingDataModule(
                location,
                work / "download",
                train_transforms=train,
                eval_transforms=evaluation,
                mean=weights.mean,
                std=weights.std,
                **options,
            )
            streamed.setup("fit")
            rows.append((name, *epoch_rate(streamed, a.passes)))
        shard_mb = folder_bytes(work / "shards") / 2**20
        data_mb = folder_bytes(data) / 2**20
    table = [f"| {name} | {first:.1f} | {steady:.1f} |" for name, first, steady in rows]
    body = "\n".join(
        [
            f"`make bench-stream`: {'generated' if a.images else data.name} ({images} images, {train_images} train), "
            f"the recipe's train transforms, batches of {BATCH}, {workers} decoding worker(s), no model; "
            f"{platform.processor() or 'CPU'} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}. Writing the shards "
            f"(list, preflight done before; litdata.optimize): {write_s:.1f} s, {images / write_s:.0f} images/s; "
            f"{shard_mb:.1f} MB of shards for {data_mb:.1f} MB of images (the files' own bytes).",
            "",
            "| training data read from | first epoch images/s | later epochs images/s |",
            "|---|---|---|",
            *table,
        ]
    )
    print(body)
    replace_section(Path(a.out), "Streaming (LitData shards)", body)


if __name__ == "__main__":
    main()
