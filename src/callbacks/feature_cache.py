"""Never pay for a frozen backbone twice: embed images once, keep the features on disk, train the head on them."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import Dataset, Sampler, Subset

from src.callbacks.finetuning import BackboneFinetuning
from src.data.embedding_store import EmbeddingStore
from src.data.features import FeatureSet, Rows, ViewSampler
from src.data.seeding import KeySeededItems, mix
from src.models.layer_groups import layer_groups
from src.models.modes import eval_mode
from src.models.onnx_engine import OnnxBackbone
from src.utils.errors import ConfigError, UserError
from src.utils.lightning_compat import reload_loaders_every_epoch, sampler_epoch
from src.utils.tensor_store import tensors_digest

log = logging.getLogger(__name__)
ENGINES = ("torch", "onnxruntime", "auto")


class FeatureCache(Callback):
    """Compute what stays frozen once, keep it on disk, and train only what trains.

    - feature extraction (the whole backbone frozen): pooled backbone features; val features (deterministic
      transforms) once; ``train_views`` K > 0: K augmented views of every training image (the train
      transforms, seeded per view), one drawn per image each epoch (src.data.features.ViewSampler); K = 0:
      train images go through the backbone every epoch, freshly augmented, as the seed recipe does;
    - fine-tuning (a BackboneFinetuning schedule): each epoch is served from what is frozen in it. Head-only
      epochs train on pooled features (the same cache entries as feature extraction); epochs that train the
      last N layer groups on the output of the groups below them (K views, val once), which then never run
      again: only the trainable groups go forward and backward. That needs the backbone's forward as one
      stage per group (src.models.layer_groups.group_stages, checked numerically) and those outputs within
      ``prefix_max_gb``; otherwise, and once every group trains, the epochs run on images. The loaders are
      rebuilt every epoch (the stage may change), the image loaders kept across epochs;
    - features are kept per image (src.data.embedding_store: keyed by the file's content, under a folder
      named by the frozen part's weights, transforms, precision, memory format, view and seed), so other
      splits, folds, re-splits and runs reuse them; a corrupt or partial file is rebuilt; writes are atomic,
      so concurrent sweep jobs and later runs share them safely. New features are written in ``chunk_mb``
      shards as they are computed and read back memory-mapped: nothing holds all of them in memory.

    The run's BackboneFinetuning is the one owner of what trains; this callback only reads its schedule.
    Batches say what they hold: N×D pooled features, or (frozen-part outputs, labels, first group to run).
    """

    def __init__(
        self,
        enabled: bool,
        dir: str | os.PathLike,
        train_views: int,
        eval_batch_size: int,
        embed_batch_size: int,
        seed: int | None = None,
        prefix_max_gb: float = 2.0,
        chunk_mb: float = 256.0,
        engine: str = "torch",
        onnx_min_images: int = 2000,
    ) -> None:
        if int(train_views) < 0:
            raise ConfigError(f"model.cache.train_views must be >= 0, got {train_views}.")
        if not float(prefix_max_gb) >= 0:
            raise ConfigError(
                f"model.cache.prefix_max_gb must be >= 0 (0: fine-tuning epochs run on images), got {prefix_max_gb}."
            )
        self.enabled = bool(enabled)
        self.dir = Path(dir)
        self.train_views = int(train_views)
        self.eval_batch_size = int(eval_batch_size)
        self.embed_batch_size = int(embed_batch_size)
        self.seed = 0 if seed is None else int(seed)
        self.prefix_max_gb = float(prefix_max_gb)
        if not float(chunk_mb) > 0:
            raise ConfigError(f"model.cache.chunk_mb must be > 0, got {chunk_mb}.")
        self.chunk_mb = float(chunk_mb)
        if engine not in ENGINES:
            raise ConfigError(f"model.cache.engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
        if isinstance(onnx_min_images, bool) or not isinstance(onnx_min_images, int) or onnx_min_images < 0:
            raise ConfigError(f"model.cache.onnx_min_images must be a whole number >= 0, got {onnx_min_images!r}.")
        self.engine_setting, self.onnx_min_images = engine, onnx_min_images
        self.engine = "torch"
        self.onnx: OnnxBackbone | None = None
        self.stats: dict[str, Any] = {
            "used": False,
            "hits": 0,
            "misses": 0,
            "embedded_images": 0,
            "cached_images": 0,  # of the splits that needed some embedding, images read from the cache
            "embed_s": 0.0,
            "stages": [],  # per schedule stage: its first epoch, the groups training, what its epochs run on
        }

    # ------------------------------------------------------------------------------------------- hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # after the datamodule's setup, before the optimizer (whose schedule counts the train batches)
        self.sets: dict[tuple[str, int], FeatureSet] = {}  # (split, frozen groups) -> features
        self.cuts: dict[int, int | None] = {}  # trainable groups -> frozen groups served from the cache (None: images)
        self.stats["stages"] = []
        if stage != "fit" or not self.enabled:
            return
        self.finetuner = next((c for c in trainer.callbacks if isinstance(c, BackboneFinetuning)), None)
        if self.finetuner is None:
            log.info("Feature cache not used: no BackboneFinetuning callback (the whole backbone trains)")
            return
        frozen = self.finetuner.keeps_backbone_frozen
        if getattr(pl_module, "mixes_images", False):
            if frozen and self.train_views > 0:
                raise ConfigError(
                    "model.mixup / model.cutmix mix images, but with a frozen backbone the feature cache trains the "
                    "head on features: set model.cache.enabled=false (images through the frozen backbone every "
                    "epoch), model.cache.train_views=0, or fine-tune (model.finetune.schedule)."
                )
            if not frozen:
                log.info("Feature cache not used: MixUp/CutMix mix images, so every fine-tuning epoch runs on images")
                return
        self.groups = layer_groups(pl_module.hparams.backbone["name"], pl_module.backbone)
        self.plan_stages(trainer, pl_module)
        if all(cut is None for cut in self.cuts.values()):
            return
        self.engine = self.choose_engine(trainer)
        dm = trainer.datamodule
        dm.use_features("val", lambda epoch: self.source(trainer, "val", epoch))
        if self.train_views > 0:
            dm.use_features("train", lambda epoch: self.source(trainer, "train", epoch))
        if not frozen:
            reload_loaders_every_epoch(trainer)
        self.stats["used"] = True

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fill(trainer, pl_module, ("val",))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fill(trainer, pl_module, ("val", "train"))  # a run resumed mid-epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fill(trainer, pl_module, ("val", "train"))  # a new fine-tuning stage: its frozen part's outputs

    # ------------------------------------------------------------------------------------------ stages

    def plan_stages(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """What each stage of the schedule runs on, decided once: pooled features while every group is frozen,
        the frozen groups' outputs while some train (when the backbone runs as stages and they fit in
        ``prefix_max_gb``), images once every group trains."""
        total = len(self.groups)
        starts = sorted({0, *(e["epoch"] for e in self.finetuner.schedule)})
        stages = pl_module.backbone_stages()
        for epoch in starts:
            training = self.finetuner.groups_training_at(epoch, total)
            if training in self.cuts:
                continue
            frozen = total - training
            if frozen == total:
                cut, served = total, "pooled features"
            elif frozen == 0:
                cut, served = None, "images (every group trains)"
            elif stages is None:
                cut, served = None, "images (this backbone's forward is not known as stages)"
            else:
                gb = self.prefix_gb(trainer, pl_module, frozen)
                if gb > self.prefix_max_gb:
                    limit = f"model.cache.prefix_max_gb={self.prefix_max_gb:g}"
                    cut, served = None, f"images ({gb:.3g} GB of frozen-part outputs > {limit})"
                else:
                    cut, served = frozen, f"outputs of {self.groups[0][0]}..{self.groups[frozen - 1][0]} ({gb:.3g} GB)"
            self.cuts[training] = cut
            self.stats["stages"].append({"from_epoch": epoch, "training_groups": training, "served_from": served})
            log.info("Epochs from %d (%d of %d groups training) run on %s", epoch, training, total, served)

    def choose_engine(self, trainer: Trainer) -> str:
        """What computes pooled features: ``torch`` (the run's precision) or ``onnxruntime`` (fp32, CPU only),
        by ``model.cache.engine``; ``auto`` takes ONNX Runtime on a CPU for runs whose features (val + K views
        of train) number at least ``onnx_min_images``: decided by the data's size, so a run that adds a few
        images keeps the engine (and the features) of the runs before it."""
        cpu = isinstance(trainer.accelerator, CPUAccelerator)
        if self.engine_setting == "onnxruntime" and not cpu:
            raise ConfigError("model.cache.engine=onnxruntime runs on the CPU; this run uses a GPU: use torch or auto.")
        dm = trainer.datamodule
        images = len(dm.datasets["val"]) + self.train_views * len(dm.datasets["train"])
        auto = self.engine_setting == "auto" and cpu and images >= self.onnx_min_images
        engine = "onnxruntime" if self.engine_setting == "onnxruntime" or auto else "torch"
        self.stats["engine"] = engine
        if engine != "torch":
            log.info(
                "Pooled features through ONNX Runtime (%d images; model.cache.engine=%s)", images, self.engine_setting
            )
        return engine

    def onnx_backbone(self, trainer: Trainer, pl_module: LightningModule) -> OnnxBackbone | None:
        """The backbone under ONNX Runtime when that is the engine (exported once, the file kept in the cache
        folder); an export that fails under ``auto`` leaves the run on torch, with a warning."""
        if self.engine != "onnxruntime" or self.onnx is not None:
            return self.onnx
        example, _ = trainer.datamodule.datasets["val"][0]
        key = tensors_digest(pl_module.backbone.state_dict())
        try:
            self.onnx = OnnxBackbone(pl_module.backbone, example[None], self.dir / "onnx", key)
        except Exception as err:  # an operator the exporter or ONNX Runtime lacks, a full disk, ...
            if self.engine_setting == "onnxruntime":
                raise ConfigError(
                    f"model.cache.engine=onnxruntime: this backbone could not run under ONNX Runtime ({err}); "
                    "use engine=torch."
                ) from err
            log.warning("ONNX Runtime could not run this backbone (%s); pooled features through torch", err)
            self.engine = self.stats["engine"] = "torch"
        return self.onnx

    def prefix_gb(self, trainer: Trainer, pl_module: LightningModule, frozen: int) -> float:
        """Size of the first ``frozen`` groups' outputs for every val image and K views of every training
        image, from one image through them on the CPU (16-bit precisions store 2 bytes a value)."""
        dm = trainer.datamodule
        x, _ = dm.datasets["val"][0]
        with torch.inference_mode(), eval_mode(pl_module.backbone):
            numel = pl_module.frozen_prefix(x[None].to(pl_module.device), frozen)[0].numel()
        width = 2 if "16" in str(trainer.precision) else 4
        rows = len(dm.datasets["val"]) + self.train_views * len(dm.datasets["train"])
        return numel * width * rows / 1e9

    def cut_at(self, epoch: int) -> int | None:
        """How many layer groups, from the input side, the cache serves at ``epoch`` (None: images)."""
        return self.cuts[self.finetuner.groups_training_at(epoch, len(self.groups))]

    def source(self, trainer: Trainer, split: str, epoch: int) -> tuple[Dataset, Sampler | None, int] | None:
        """(features, sampler, batch size) a loader of ``split`` serves at ``epoch``; None: images."""
        cut = self.cut_at(epoch)
        if cut is None:
            return None
        dm = trainer.datamodule
        features = self.feature_set(trainer, split, cut)
        pooled = cut == len(self.groups)
        if split == "val":  # pooled features: a few large batches; frozen-part outputs still run groups
            return features, None, self.eval_batch_size if pooled else dm.eval_batch_size
        n = len(dm.datasets["train"])
        views = ViewSampler(n, self.train_views, self.seed, lambda: sampler_epoch(trainer), dm.sample_weights())
        return features, views, dm.batch_size

    def feature_set(self, trainer: Trainer, split: str, cut: int) -> FeatureSet:
        if (split, cut) not in self.sets:
            size = len(trainer.datamodule.datasets[split]) * (self.train_views if split == "train" else 1)
            features = FeatureSet(size, start=None if cut == len(self.groups) else cut)
            # the hooks below fill it before its first batch; a loop that skips them (the LR finder's, which
            # runs inside the first epoch's start and may cross into the next stage) fills it on first read
            features.filler = lambda: self.fill_sets(trainer, trainer.lightning_module, cut, [(split, features)])
            self.sets[split, cut] = features
        return self.sets[split, cut]

    def fill(self, trainer: Trainer, pl_module: LightningModule, splits: tuple[str, ...]) -> None:
        """Embed (or read) what this epoch's loaders serve, before its first batch; every rank calls it alike."""
        if not self.stats["used"]:
            return
        cut = self.cut_at(sampler_epoch(trainer))
        for key in [k for k in self.sets if k[1] != cut]:  # an earlier stage's features: never served again
            del self.sets[key]
        if cut is not None:
            splits = tuple(s for s in splits if s == "val" or self.train_views > 0)
            self.fill_sets(trainer, pl_module, cut, [(s, self.feature_set(trainer, s, cut)) for s in splits])

    def fill_sets(
        self, trainer: Trainer, pl_module: LightningModule, cut: int, targets: list[tuple[str, FeatureSet]]
    ) -> None:
        """Fill the empty ``targets`` (split, features through the first ``cut`` groups)."""
        targets = [(split, target) for split, target in targets if target.features is None]
        if not targets:
            return
        onnx = self.onnx_backbone(trainer, pl_module) if cut == len(self.groups) else None
        identity = frozen_identity(pl_module, str(trainer.precision), self.groups, cut)
        if onnx is not None:
            identity["engine"] = "onnxruntime"
        # DDP: rank zero embeds and writes; the others wait for it, then read the files (every rank holds
        # all features; Lightning's distributed sampler gives each its share of the indices)
        distributed = trainer.world_size > 1
        if distributed and not trainer.is_global_zero:
            trainer.strategy.barrier("feature_cache")
        for split, target in targets:
            if split == "val":
                target.fill(*self.features(trainer, pl_module, identity, split, None, cut))
                continue
            views = [self.features(trainer, pl_module, identity, split, k, cut) for k in range(self.train_views)]
            target.fill(Rows.cat([f for f, _ in views]), torch.cat([y for _, y in views]))
        if distributed and trainer.is_global_zero:
            trainer.strategy.barrier("feature_cache")

    # ------------------------------------------------------------------------------------------- cache

    def features(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        identity: dict[str, Any],
        split: str,
        view: int | None,
        cut: int,
    ) -> tuple[Rows, torch.Tensor]:
        """(features, labels N) of a split (and augmented view) through the first ``cut`` groups (all of them:
        pooled features): the images already in the cache are read, the others embedded and added."""
        dm = trainer.datamodule
        dataset = dm.datasets[split]
        prefix = None if cut == len(self.groups) else cut
        feats, labels, embedded, seconds = cached_features(
            EmbeddingStore(self.dir, feature_spec(identity, dataset, view, self.seed)),
            dataset,
            dm.digests,
            lambda subset: dm.image_loader(split, self.embed_batch_size, dataset=subset),
            lambda loader: embed_batches(
                pl_module, loader, trainer.precision_plugin.forward_context, trainer, prefix, self.onnx
            ),
            view_seed=None if view is None else (self.seed, view),
            write=trainer.is_global_zero,  # another rank computing it means rank zero's file is out of its reach
            chunk_mb=self.chunk_mb,
        )
        what = f"{split}{'' if view is None else f' view {view}'}" + (
            "" if prefix is None else f" up to {self.groups[cut - 1][0]}"
        )
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


def frozen_identity(
    pl_module: LightningModule, precision: str, groups: list[tuple[str, list[nn.Module]]], cut: int
) -> dict[str, Any]:
    """What the cached outputs of the first ``cut`` layer groups share: those groups' exact weights and the
    numerics (all groups: the whole backbone's, ``feature_identity``)."""
    if cut == len(groups):
        return feature_identity(pl_module, precision)
    state = {
        f"{name}.{i}.{key}": t
        for name, modules in groups[:cut]
        for i, m in enumerate(modules)
        for key, t in m.state_dict().items()
    }
    return {
        **feature_identity(pl_module, precision, state_sha256=tensors_digest(state)),
        "frozen_groups": [name for name, _ in groups[:cut]],
    }


def feature_identity(pl_module: LightningModule, precision: str, state_sha256: str | None = None) -> dict[str, Any]:
    """What every cached feature of a run shares: the backbone's exact weights (or ``state_sha256``, of the
    part that computes them) and numerics."""
    return {
        "backbone": pl_module.hparams.backbone["name"],
        "backbone_state_sha256": state_sha256 or tensors_digest(pl_module.backbone.state_dict()),
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
    embed_batches: Callable[[Any], Iterator[torch.Tensor]],
    view_seed: tuple[int, int] | None = None,
    write: bool = True,
    chunk_mb: float = 256.0,
) -> tuple[Rows, torch.Tensor, int, float]:
    """(features, labels, images embedded now, seconds spent) of every image of ``dataset``: the rows stored
    in ``store`` (memory-mapped), the rest embedded through ``embed_batches(loader_for(subset))`` and stored
    as they come, one shard per ``chunk_mb`` of features, so a pass over any number of images holds one
    chunk in memory (and a pass cut short keeps the chunks it wrote).

    ``view_seed`` (seed, view): an augmented view, each image transformed under a seed from (seed, view,
    its content), so the view is the same whichever run, split or fold embeds it.
    """
    keys = [digests[p] for p, _ in dataset.samples]
    labels = torch.tensor(dataset.targets, dtype=torch.long)
    sources, where = store.locate(keys)
    missing = [i for i, w in enumerate(where) if w is None]
    seconds = 0.0
    if missing:
        start = time.perf_counter()
        subset: Dataset = Subset(dataset, missing)
        if view_seed is not None:
            subset = KeySeededItems(subset, [mix(*view_seed, int(keys[i][:15], 16)) for i in missing])
        done, pending, pending_bytes = 0, [], 0

        def flush() -> None:
            nonlocal done, pending_bytes
            chunk = torch.cat(pending)
            pending.clear()
            pending_bytes = 0
            rows = missing[done : done + len(chunk)]
            source, placed = store_chunk(store, [keys[i] for i in rows], chunk, write, chunk_mb)
            for i, row in zip(rows, placed, strict=True):
                where[i] = (len(sources), row)
            sources.append(source)
            done += len(chunk)

        with torch.random.fork_rng(devices=[]):  # a cold cache must not shift the run's RNG (dropout, shuffling)
            for feats in embed_batches(loader_for(subset)):  # (a loader draws its workers' base seed from it)
                pending.append(feats)
                pending_bytes += feats.numel() * feats.element_size()
                if pending_bytes >= chunk_mb * 1e6:
                    flush()
            if pending:
                flush()
        seconds = time.perf_counter() - start
    return Rows(sources, torch.tensor(where, dtype=torch.long).reshape(-1, 2)), labels, len(missing), seconds


def store_chunk(
    store: EmbeddingStore, keys: list[str], chunk: torch.Tensor, write: bool, chunk_mb: float
) -> tuple[torch.Tensor, list[int]]:
    """Write one chunk of new features as a shard and read it back memory-mapped (the chunk's memory is then
    freed): (the shard's features, the row of each key). The chunk itself (rows in order) when the cache
    folder can't take it or the shard vanished at once."""
    in_memory = chunk, list(range(len(chunk)))
    if not write:  # another rank computing it means rank zero's file is out of its reach
        return in_memory
    try:
        path = store.add(keys, chunk, small_bytes=chunk_mb * 1e6 / 2)
    except (OSError, RuntimeError, UserError) as err:  # full or read-only cache folder: go on from memory
        log.warning("Could not write the feature cache %s (%s); going on from memory", store.folder, err)
        return in_memory
    shard = store.read(path)
    if shard is None:  # merged away by another process in between
        return in_memory
    stored, features = shard
    rows = {key.tobytes(): r for r, key in enumerate(stored.numpy())}
    return features, [rows[bytes.fromhex(k)] for k in keys]


def embed_batches(
    pl_module: LightningModule,
    loader: Any,
    forward_context: Any,
    trainer: Trainer | None = None,
    prefix: int | None = None,
    engine: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Run the frozen backbone (or its first ``prefix`` layer groups) over a loader at the run's precision, in
    eval mode (or ``engine``, the backbone under another runtime, for pooled features); each batch's features
    on the CPU, as they come.

    A SIGTERM stops it at the next batch (Lightning only checks between training batches)."""
    with torch.inference_mode(), forward_context(), eval_mode(pl_module.backbone):
        for x, _ in loader:
            if trainer is not None and trainer.received_sigterm:
                raise SIGTERMException(143)
            if engine is not None and prefix is None:  # stored as the run's precision would: bf16 half the size
                yield engine(x).to(
                    torch.bfloat16 if "bf16" in str(getattr(trainer, "precision", "")) else torch.float32
                )
                continue
            x = x.to(pl_module.device, non_blocking=True)
            yield (pl_module.features(x) if prefix is None else pl_module.frozen_prefix(x, prefix)).cpu()
