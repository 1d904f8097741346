"""Write a dataset as LitData shards for ``data=streaming``:
``python -m src.optimize data.root=/path/to/images output_dir=/path/or/s3://bucket/prefix``.

The images are listed (any layout), split and preflighted exactly as a training run does (unusable files
skipped or refused, copies across splits warned about or refused, per data.*); each split is then written
with ``litdata.optimize`` (the file's own bytes, class index and SHA-256 per item), and dataset.json beside
the splits records the classes, the items in shard order and the preflight's findings (src.data.shards).
The run folder gets split.csv, skipped_files.csv, duplicates.csv and optimize.json (the figures).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.data.shards import check_output, normalise_location, refuse_shards, write_shards
from src.train import SIZING_KEYS, write_preflight_report
from src.utils.cli import report_user_errors
from src.utils.errors import ConfigError
from src.utils.io import write_json

log = logging.getLogger("src.optimize")
NOT_READ = ("train_transforms", "eval_transforms", "mean", "std", *SIZING_KEYS)  # decoding is training's business


def optimize(cfg: DictConfig) -> dict[str, Any]:
    """List, split and preflight ``cfg.data``'s images, write them as shards at ``cfg.output_dir``; return
    the figures (also in the run folder's optimize.json)."""
    out = Path(cfg.paths.output_dir)
    chunk_mb = cfg.chunk_mb
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, int | float) or chunk_mb <= 0:
        raise ConfigError(f"chunk_mb must be a number of megabytes above 0, got {chunk_mb!r}.")
    workers = cfg.get("num_workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(
            f"num_workers must be a whole number of at least 1 (null: data.num_workers), got {workers!r}."
        )
    refuse_shards(cfg.data, "src.optimize")
    location = normalise_location(str(cfg.output_dir))
    if cfg.data.get("root") is not None:
        check_output(location, Path(str(cfg.data.root)).expanduser())
    settings = {  # resolved key by key: the transforms' sizes stay unresolved (src.train fills them)
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.data.items()
        if key not in NOT_READ
    }
    start = time.perf_counter()
    source = instantiate(
        settings, train_transforms=[], eval_transforms=[], mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], _convert_="all"
    )
    source.prepare_data()
    source.setup("fit")
    write_preflight_report(out, source)
    scanned = time.perf_counter()
    workers = workers or max(1, source.num_workers)  # null: the decoding workers data.num_workers gives
    storage_options = OmegaConf.to_container(cfg.storage_options, resolve=True) or {}
    metadata = write_shards(source, location, float(chunk_mb), int(workers), storage_options)
    done = time.perf_counter()
    images = {split: len(rows) for split, rows in metadata["items"].items()}
    figures = {
        "output_dir": location,
        "source": metadata["source"],
        "classes": metadata["classes"],
        "images": images,
        "skipped": len(metadata["skipped"]),
        "duplicates": len(metadata["duplicates"]),
        "scan_s": round(scanned - start, 2),
        "write_s": round(done - scanned, 2),
        "images_per_s": round(sum(images.values()) / max(done - scanned, 1e-9), 1),
    }
    write_json(out / "optimize.json", figures)
    log.info(
        "Wrote %d images (%s) as LitData shards to %s in %.1f s; train on them with: python -m src.train "
        "data=streaming data.input_dir=%s",
        sum(images.values()),
        ", ".join(f"{s} {n}" for s, n in images.items()),
        location,
        done - scanned,
        location,
    )
    return figures


@hydra.main(version_base="1.3", config_path="../conf", config_name="optimize")
@report_user_errors
def main(cfg: DictConfig) -> None:
    optimize(cfg)


if __name__ == "__main__":
    main()
