"""Never pay for a frozen backbone twice: embed images once, keep the features on disk, train the head on them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.data.datamodule import sampler_epoch
from src.data.features import FeatureSet, ViewSampler
from src.data.preflight import file_stamp
from src.utils.errors import ConfigError, UserError
from src.utils.tensor_store import load_tensors, save_tensors, tensors_digest

log = logging.getLogger(__name__)


class FeatureCache(Callback):
    """Precompute frozen-backbone features before the first epoch and serve the head from them.

    - val features (deterministic transforms) are computed once;
    - ``train_views`` K > 0: K augmented views of every training image (the train transforms, seeded per
      view), one drawn per image each epoch (src.data.features.ViewSampler); K = 0: train images go
      through the backbone every epoch, freshly augmented, as the seed recipe does;
    - files live under ``dir``, named by a hash of everything that shapes them (backbone weights,
      transforms, precision, memory format, the split's file list with sizes and mtimes, view and seed);
      any change is a new file, a corrupt or partial one is rebuilt; writes are atomic, so concurrent
      sweep jobs and later runs share them safely;
    - used only when every backbone parameter is frozen for the whole run.
    """

    def __init__(
        self,
        enabled: bool,
        dir: str | os.PathLike,
        train_views: int,
        eval_batch_size: int,
        embed_batch_size: int,
        seed: int | None = None,
    ) -> None:
        if int(train_views) < 0:
            raise ConfigError(f"model.cache.train_views must be >= 0, got {train_views}.")
        self.enabled = bool(enabled)
        self.dir = Path(dir)
        self.train_views = int(train_views)
        self.eval_batch_size = int(eval_batch_size)
        self.embed_batch_size = int(embed_batch_size)
        self.seed = 0 if seed is None else int(seed)
        self.stats: dict[str, Any] = {
            "used": False,
            "hits": 0,
            "misses": 0,
            "embedded_images": 0,
            "embed_s": 0.0,
        }

    # ------------------------------------------------------------------------------------------- hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # after the datamodule's setup, before the optimizer (whose schedule counts the train batches)
        self.sets: dict[str, FeatureSet] = {}
        if stage != "fit" or not self.enabled:
            return
        if not pl_module.backbone_stays_frozen():
            log.info("Feature cache not used: the backbone trains in this run")
            return
        dm = trainer.datamodule
        self.sets["val"] = FeatureSet(len(dm.datasets["val"]))
        dm.use_features("val", self.sets["val"], batch_size=self.eval_batch_size)
        if self.train_views > 0:
            n = len(dm.datasets["train"])
            self.sets["train"] = FeatureSet(self.train_views * n)
            dm.use_features(
                "train",
                self.sets["train"],
                dm.batch_size,
                ViewSampler(n, self.train_views, self.seed, lambda: sampler_epoch(trainer)),
            )
        pl_module.feature_inputs = set(self.sets)
        self.stats["used"] = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the model now sits on its device: embed (or load) what setup promised, before the first batch
        if not self.sets:
            return
        pl_module.keep_frozen_parts_in_eval()
        self._identity = self.identity(trainer, pl_module)
        # DDP: rank zero embeds and writes; the others wait for it, then read the files (every rank holds
        # all features; Lightning's distributed sampler gives each its share of the indices)
        distributed = trainer.world_size > 1
        if distributed and not trainer.is_global_zero:
            trainer.strategy.barrier("feature_cache")
        self.sets["val"].fill(*self.features(trainer, pl_module, "val", view=None))
        if "train" in self.sets:
            views = [self.features(trainer, pl_module, "train", view=k) for k in range(self.train_views)]
            self.sets["train"].fill(torch.cat([f for f, _ in views]), torch.cat([y for _, y in views]))
        if distributed and trainer.is_global_zero:
            trainer.strategy.barrier("feature_cache")

    # ------------------------------------------------------------------------------------------- cache

    def identity(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """What every cached file of this run shares: the backbone's exact weights and numerics."""
        return {
            "backbone": pl_module.hparams.backbone["name"],
            "backbone_state_sha256": tensors_digest(pl_module.backbone.state_dict()),
            "precision": str(trainer.precision),
            "channels_last": bool(pl_module.hparams.backbone.get("channels_last", False)),
        }

    def meta(self, dataset: Any, split: str, view: int | None) -> dict[str, Any]:
        files = [[str(path), int(label), *file_stamp(path)] for path, label in dataset.samples]
        return {
            **self._identity,
            "split": split,
            "transform": repr(dataset.transform),
            "loader": repr(dataset.loader),
            "files_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
            "count": len(files),
            "view": view,
            "seed": None if view is None else self.seed,
        }

    def path_for(self, meta: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
        suffix = "" if meta["view"] is None else f"-view{meta['view']}"
        return self.dir / f"{meta['split']}{suffix}-{key}.pt"

    def features(
        self, trainer: Trainer, pl_module: LightningModule, split: str, view: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features N×D, labels N) of a split (and augmented view), from the cache or computed and stored."""
        dm = trainer.datamodule
        meta = self.meta(dm.datasets[split], split, view)
        path = self.path_for(meta)
        cached = load_tensors(path, meta)
        if cached is not None:
            self.stats["hits"] += 1
            log.info("Feature cache hit: %s (%d images)", path, meta["count"])
            return cached["features"], cached["labels"]
        start = time.perf_counter()
        generator = None
        if view is not None:  # a different, reproducible augmentation per view
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + view)
        with torch.random.fork_rng(devices=[]):
            if generator is not None:
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            loader = dm.image_loader(split, self.embed_batch_size, generator=generator)
            feats, labels = embed(pl_module, loader, trainer.precision_plugin.forward_context, trainer)
        seconds = time.perf_counter() - start
        if trainer.is_global_zero:  # another rank computing it means rank zero's file is out of its reach
            try:
                save_tensors(path, {"features": feats, "labels": labels}, meta)
            except (OSError, RuntimeError, UserError) as err:  # full or read-only cache folder: train from memory
                log.warning("Could not write the feature cache %s (%s); training goes on from memory", path, err)
        self.stats["misses"] += 1
        self.stats["embedded_images"] += len(labels)
        self.stats["embed_s"] = round(self.stats["embed_s"] + seconds, 3)
        log.info(
            "Embedded %s%s: %d images in %.1f s (%.0f img/s) -> %s",
            split,
            "" if view is None else f" view {view}",
            len(labels),
            seconds,
            len(labels) / seconds,
            path,
        )
        return feats, labels


def embed(
    pl_module: LightningModule, loader: Any, forward_context: Any, trainer: Trainer | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen backbone over a loader at the run's precision; features and labels on the CPU.

    A SIGTERM stops it at the next batch (Lightning only checks between training batches)."""
    feats, labels = [], []
    with torch.inference_mode(), forward_context():
        for x, y in loader:
            if trainer is not None and trainer.received_sigterm:
                raise SIGTERMException(143)
            feats.append(pl_module.features(x.to(pl_module.device, non_blocking=True)).cpu())
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)
