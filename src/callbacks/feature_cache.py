"""Never pay for a frozen backbone twice: embed images once, keep the features on disk, train the head on them."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import Dataset, Subset

from src.callbacks.finetuning import BackboneFinetuning
from src.data.embedding_store import EmbeddingStore
from src.data.features import FeatureSet, ViewSampler
from src.data.seeding import KeySeededItems, mix
from src.utils.errors import ConfigError, UserError
from src.utils.lightning_compat import sampler_epoch
from src.utils.tensor_store import tensors_digest

log = logging.getLogger(__name__)


class FeatureCache(Callback):
    """Precompute frozen-backbone features before the first epoch and serve the head from them.

    - val features (deterministic transforms) are computed once;
    - ``train_views`` K > 0: K augmented views of every training image (the train transforms, seeded per
      view), one drawn per image each epoch (src.data.features.ViewSampler); K = 0: train images go
      through the backbone every epoch, freshly augmented, as the seed recipe does;
    - features are kept per image (src.data.embedding_store: keyed by the file's content, under a folder
      named by backbone weights, transforms, precision, memory format, view and seed), so other splits,
      folds and re-splits of the same images reuse them; a corrupt or partial file is rebuilt; writes are
      atomic, so concurrent sweep jobs and later runs share them safely;
    - used only when the run's BackboneFinetuning (the one owner of that decision) keeps the backbone frozen
      for the whole run. The model tells feature batches (N×D) from images by their shape.
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
            "cached_images": 0,  # of the splits that needed some embedding, images read from the cache
            "embed_s": 0.0,
        }

    # ------------------------------------------------------------------------------------------- hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # after the datamodule's setup, before the optimizer (whose schedule counts the train batches)
        self.sets: dict[str, FeatureSet] = {}
        if stage != "fit" or not self.enabled:
            return
        self.finetuner = next((c for c in trainer.callbacks if isinstance(c, BackboneFinetuning)), None)
        if self.finetuner is None or not self.finetuner.keeps_backbone_frozen:
            log.info("Feature cache not used: the backbone trains in this run (no frozen-backbone finetuning)")
            return
        if self.train_views > 0 and getattr(pl_module, "mixes_images", False):
            raise ConfigError(
                "model.mixup / model.cutmix mix images, but with a frozen backbone the feature cache trains the head "
                "on features: set model.cache.enabled=false (images through the frozen backbone every epoch), "
                "model.cache.train_views=0, or fine-tune (model.finetune.schedule)."
            )
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
                ViewSampler(n, self.train_views, self.seed, lambda: sampler_epoch(trainer), dm.sample_weights()),
            )
        self.stats["used"] = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the model now sits on its device: embed (or load) what setup promised, before the first batch
        if not self.sets:
            return
        self.finetuner.apply_bn_policy(pl_module)  # embedding runs the backbone as training would see it
        self._identity = feature_identity(pl_module, str(trainer.precision))
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

    def features(
        self, trainer: Trainer, pl_module: LightningModule, split: str, view: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features N×D, labels N) of a split (and augmented view): the images already in the cache are
        read, the others embedded and added."""
        dm = trainer.datamodule
        dataset = dm.datasets[split]
        feats, labels, embedded, seconds = cached_features(
            EmbeddingStore(self.dir, feature_spec(self._identity, dataset, view, self.seed)),
            dataset,
            dm.digests,
            lambda subset: dm.image_loader(split, self.embed_batch_size, dataset=subset),
            lambda loader: embed(pl_module, loader, trainer.precision_plugin.forward_context, trainer),
            view_seed=None if view is None else (self.seed, view),
            write=trainer.is_global_zero,  # another rank computing it means rank zero's file is out of its reach
        )
        what = f"{split}{'' if view is None else f' view {view}'}"
        if not embedded:
            self.stats["hits"] += 1
            log.info("Feature cache hit: %s (%d images) in %s", what, len(labels), self.dir)
            return feats, labels
        self.stats["misses"] += 1
        self.stats["embedded_images"] += embedded
        self.stats["cached_images"] += len(labels) - embedded
        self.stats["embed_s"] = round(self.stats["embed_s"] + seconds, 3)
        log.info(
            "Embedded %s: %d of %d images in %.1f s (%.0f img/s; the rest from the cache)",
            what,
            embedded,
            len(labels),
            seconds,
            embedded / max(seconds, 1e-9),
        )
        return feats, labels


def feature_identity(pl_module: LightningModule, precision: str) -> dict[str, Any]:
    """What every cached feature of a run shares: the backbone's exact weights and numerics."""
    return {
        "backbone": pl_module.hparams.backbone["name"],
        "backbone_state_sha256": tensors_digest(pl_module.backbone.state_dict()),
        "precision": precision,
        "channels_last": bool(pl_module.hparams.backbone.get("channels_last", False)),
    }


def feature_spec(identity: dict[str, Any], dataset: Any, view: int | None, seed: int) -> dict[str, Any]:
    """What shapes a dataset's features besides the image: backbone, numerics, transform, decoder, view."""
    return {
        **identity,
        "transform": repr(dataset.transform),
        "loader": repr(dataset.loader),
        "view": view,
        "seed": None if view is None else seed,
    }


def cached_features(
    store: EmbeddingStore,
    dataset: Any,
    digests: dict[str, str],
    loader_for: Callable[[Dataset], Any],
    embed_loader: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
    view_seed: tuple[int, int] | None = None,
    write: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(features, labels, images embedded now, seconds spent) of every image of ``dataset``: the stored
    rows of ``store``, the rest embedded through ``embed_loader(loader_for(subset))`` and stored.

    ``view_seed`` (seed, view): an augmented view, each image transformed under a seed from (seed, view,
    its content), so the view is the same whichever run, split or fold embeds it.
    """
    keys = [digests[p] for p, _ in dataset.samples]
    labels = torch.tensor(dataset.targets, dtype=torch.long)
    found, missing = store.lookup(keys)
    if not missing:
        return found, labels, 0, 0.0
    start = time.perf_counter()
    subset: Dataset = Subset(dataset, missing)
    if view_seed is not None:
        subset = KeySeededItems(subset, [mix(*view_seed, int(keys[i][:15], 16)) for i in missing])
    with torch.random.fork_rng(devices=[]):  # a cold cache must not shift the run's RNG (dropout, shuffling)
        new, _ = embed_loader(loader_for(subset))  # (creating a loader draws its workers' base seed from it)
    seconds = time.perf_counter() - start
    if write:
        try:
            store.add([keys[i] for i in missing], new)
        except (OSError, RuntimeError, UserError) as err:  # full or read-only cache folder: go on from memory
            log.warning("Could not write the feature cache %s (%s); going on from memory", store.folder, err)
    if found is None:
        found = torch.zeros(len(keys), *new.shape[1:], dtype=new.dtype)
    found[torch.tensor(missing, dtype=torch.long)] = new
    return found, labels, len(missing), seconds


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
