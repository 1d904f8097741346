"""Feature cache: hits, misses, invalidation, corrupt files, equality with a fresh pass, frozen-only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from src.callbacks.feature_cache import FeatureCache, cached_features
from src.callbacks.finetuning import BackboneFinetuning
from src.data.embedding_store import MERGE_AT, EmbeddingStore
from src.data.features import ViewSampler
from src.utils.errors import ConfigError
from tests.factories import tiny_datamodule, tiny_model, tiny_trainer

SMALL_TRAIN = [T.RandomResizedCrop(32, scale=(0.8, 1.0)), T.RandomHorizontalFlip(), T.CenterCrop(28)]
SMALL_EVAL = [T.Resize(32), T.CenterCrop(28)]


def fit(
    data: Path,
    cache_dir: Path,
    train_views: int = 2,
    freeze: bool = True,
    precision: str = "32",
    eval_tf=None,
    epochs: int = 2,
):
    """A short resnet18 (random init, seeded so every call builds the same weights) run with a cache."""
    model = tiny_model()
    dm = tiny_datamodule(data, SMALL_TRAIN, eval_tf or SMALL_EVAL, batch_size=4)
    cache = FeatureCache(
        enabled=True, dir=cache_dir, train_views=train_views, eval_batch_size=64, embed_batch_size=5, seed=7
    )
    callbacks = [cache] + ([BackboneFinetuning()] if freeze else [])
    trainer = tiny_trainer(callbacks, max_epochs=epochs, precision=precision)
    trainer.fit(model, datamodule=dm)
    return model, dm, cache


def cache_files(cache_dir: Path) -> list[str]:
    """Shard files as <spec folder>/<shard>: one folder per (backbone, transform, precision, view)."""
    return sorted(f"{p.parent.name}/{p.name}" for p in cache_dir.glob("*/shard-*.pt"))


def test_first_run_misses_then_a_second_run_hits(tiny_data, tmp_path):
    cache_dir = tmp_path / "cache"
    model, dm, cache = fit(tiny_data, cache_dir)
    assert cache.stats["used"] and cache.stats["misses"] == 3 and cache.stats["hits"] == 0  # val + 2 views
    assert cache.stats["embedded_images"] == 8 + 2 * 12
    assert set(dm.feature_sets) == {"train", "val"}  # the head trains and validates on cached features
    files = cache_files(cache_dir)
    assert len(files) == 3 and len({f.split("/")[0] for f in files}) == 3  # val, view 0, view 1
    _, _, again = fit(tiny_data, cache_dir)
    assert again.stats["hits"] == 3 and again.stats["misses"] == 0
    assert cache_files(cache_dir) == files


def test_cached_val_features_equal_a_fresh_pass(tiny_data, tmp_path):
    model, dm, cache = fit(tiny_data, tmp_path / "cache")
    cached = dm.features_for("val")[0]
    cached_feats, cached_labels = cached.features.tensor(), cached.labels
    model.eval()
    fresh = torch.cat([model.features(x) for x, _ in dm.image_loader("val", 3)])
    labels = torch.tensor([y for _, y in dm.datasets["val"].samples])
    assert torch.equal(cached_feats, fresh)
    assert torch.equal(cached_labels, labels)


def test_train_views_are_reproducible_and_distinct(tiny_data, tmp_path):
    _, dm_a, _ = fit(tiny_data, tmp_path / "a")
    _, dm_b, _ = fit(tiny_data, tmp_path / "b")  # a cold cache elsewhere: recomputed from scratch
    feats_a, labels_a = dm_a.features_for("train")[0].features.tensor(), dm_a.features_for("train")[0].labels
    feats_b = dm_b.features_for("train")[0].features.tensor()
    assert torch.equal(feats_a, feats_b)
    n = len(dm_a.datasets["train"])
    assert feats_a.shape[0] == 2 * n and torch.equal(labels_a[:n], labels_a[n:])
    assert not torch.equal(feats_a[:n], feats_a[n:])  # view 0 and view 1 are different augmentations


def test_an_edited_image_alone_is_embedded_again_and_a_moved_one_not_at_all(tiny_data, tmp_path):
    cache_dir = tmp_path / "cache"
    fit(tiny_data, cache_dir)
    victim = sorted((tiny_data / "val" / "ants").iterdir())[0]
    Image.new("RGB", (40, 40), (1, 2, 3)).save(victim)  # other bytes under the same name
    _, _, cache = fit(tiny_data, cache_dir)
    assert cache.stats["misses"] == 1 and cache.stats["hits"] == 2
    assert cache.stats["embedded_images"] == 1 and cache.stats["cached_images"] == 7  # the rest of val
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: still cached
    victim.rename(victim.with_name("renamed.png"))  # moved: found by its content
    _, _, again = fit(tiny_data, cache_dir)
    assert again.stats["hits"] == 3 and again.stats["embedded_images"] == 0


def test_changed_transform_or_precision_invalidates(tiny_data, tmp_path):
    cache_dir = tmp_path / "cache"
    fit(tiny_data, cache_dir, train_views=1)
    _, _, other_tf = fit(tiny_data, cache_dir, train_views=1, eval_tf=[T.Resize(30), T.CenterCrop(28)])
    assert other_tf.stats["misses"] == 1 and other_tf.stats["hits"] == 1
    _, _, bf16 = fit(tiny_data, cache_dir, train_views=1, precision="bf16-mixed", epochs=1)
    assert bf16.stats["misses"] == 2 and bf16.stats["hits"] == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_file_is_rebuilt_not_used(tiny_data, tmp_path, damage):
    cache_dir = tmp_path / "cache"
    _, dm, _ = fit(tiny_data, cache_dir, train_views=0)
    good = dm.features_for("val")[0].features.tensor().clone()
    (path,) = cache_dir.glob("*/shard-*.pt")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # a flipped bit inside the stored feature bytes: only the hash can tell
        feats = torch.load(path, weights_only=True)
        feats["tensors"]["features"][0, 0] += 1.0
        torch.save(feats, path)
    else:
        path.write_bytes(b"not a torch file")
    _, dm2, cache = fit(tiny_data, cache_dir, train_views=0)
    assert cache.stats["misses"] == 1 and cache.stats["hits"] == 0
    assert torch.equal(dm2.features_for("val")[0].features.tensor(), good)
    _, _, third = fit(tiny_data, cache_dir, train_views=0)  # the rebuilt file is whole again
    assert third.stats["hits"] == 1


def test_train_views_zero_caches_val_only(tiny_data, tmp_path):
    model, dm, cache = fit(tiny_data, tmp_path / "cache", train_views=0)
    assert set(dm.feature_sets) == {"val"}
    assert len(cache_files(tmp_path / "cache")) == 1  # val's features only


def test_no_cache_when_the_backbone_trains(tiny_data, tmp_path):
    model, dm, cache = fit(tiny_data, tmp_path / "cache", freeze=False)
    assert not cache.stats["used"] and dm.feature_sets == {}
    assert not (tmp_path / "cache").exists()


def test_view_sampler_draws_each_image_once_per_epoch():
    sampler = ViewSampler(num_images=10, num_views=3, seed=1)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        idx = list(sampler)
        assert sorted(i % 10 for i in idx) == list(range(10))
        assert all(0 <= i // 10 < 3 for i in idx)
        epochs.append(idx)
    assert epochs[0] != epochs[1]
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]  # replayable


@pytest.mark.slow
def test_head_trained_on_fp32_features_agrees_on_bf16_features(lite0_on_hymenoptera):
    """bf16 + channels_last features change ≤ 2% of a trained head's predictions (lite0, hymenoptera val: the
    head trains on the fp32 features of every other image and is judged on all of them)."""
    from src.models.head import build_head

    val32, val_y = lite0_on_hymenoptera["val"]
    val16 = lite0_on_hymenoptera["val_bf16"]
    train_x, train_y = val32[::2], val_y[::2]
    torch.manual_seed(0)
    head = build_head(train_x.shape[1], 2, hidden_dim=256, dropout=0.4)
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    for _ in range(10):
        for idx in torch.randperm(len(train_y)).split(32):
            opt.zero_grad()
            torch.nn.functional.nll_loss(head(train_x[idx]), train_y[idx]).backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        pred32, pred16 = head(val32).argmax(1), head(val16).argmax(1)
    assert (pred32 == val_y).float().mean() >= 0.9  # the head learned something real
    agreement = (pred32 == pred16).float().mean().item()
    print(f"fp32-vs-bf16 head agreement {agreement:.4f}, fp32 acc {(pred32 == val_y).float().mean():.4f}")
    assert agreement >= 0.98, agreement


class Numbered(torch.utils.data.Dataset):
    """n fake images: item i's "feature" is i repeated, its file digest derived from i."""

    def __init__(self, n: int) -> None:
        self.samples = [(f"img{i}.png", i % 2) for i in range(n)]
        self.targets = [c for _, c in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return torch.full((4,), float(i)), self.targets[i]


def run_cached(store, data: Numbered, fail_after: int | None = None, chunk_mb: float = 1e-5):
    """cached_features over ``data`` in batches of 2 (16-byte rows, so chunk_mb=1e-5 writes a shard per
    batch); ``fail_after``: the pass dies after that many batches."""
    digests = {p: f"{i:064x}" for i, (p, _) in enumerate(data.samples)}

    def embed(loader):
        for b, (x, _) in enumerate(loader):
            if fail_after is not None and b == fail_after:
                raise KeyboardInterrupt
            yield x

    loader_for = lambda subset: torch.utils.data.DataLoader(subset, batch_size=2)  # noqa: E731
    return cached_features(store, data, digests, loader_for, embed, chunk_mb=chunk_mb)


def test_embedding_is_written_in_chunks_read_back_memory_mapped_and_resumes_where_it_stopped(tmp_path):
    store = EmbeddingStore(tmp_path / "cache", {"spec": 1})
    data = Numbered(9)
    with pytest.raises(KeyboardInterrupt):
        run_cached(store, data, fail_after=3)
    assert len(store.shards()) == 3  # the three finished chunks stay on disk
    rows, labels, embedded, _ = run_cached(store, data)
    assert embedded == 3  # only the images the interrupted pass never reached
    assert torch.equal(rows.tensor(), torch.arange(9.0)[:, None].expand(9, 4))
    assert torch.equal(labels, torch.tensor(data.targets))
    maps = Path("/proc/self/maps").read_text()
    assert all(str(p) in maps for p in store.shards())  # the rows are read from the files in place
    again, _, embedded, _ = run_cached(store, data)
    assert embedded == 0 and torch.equal(again.tensor(), rows.tensor())


def test_only_small_shards_are_merged(tmp_path):
    store = EmbeddingStore(tmp_path / "cache", {"spec": 1})
    big = store.write([f"{i:064x}" for i in range(100, 300)], torch.zeros(200, 4))
    small_bytes = big.stat().st_size / 2  # a one-row shard is well under half of a 200-row one
    for i in range(MERGE_AT):
        store.add([f"{i:064x}"], torch.full((1, 4), float(i)), small_bytes=small_bytes)
    shards = store.shards()
    assert big in shards and len(shards) == 2  # the 8 one-row shards merged; the 200-row one left alone
    sources, where = store.locate([f"{i:064x}" for i in range(MERGE_AT)])
    assert [float(sources[s][r][0]) for s, r in where] == [float(i) for i in range(MERGE_AT)]


@pytest.mark.slow
def test_onnxruntime_engine_embeds_what_torch_does_and_auto_takes_it_only_for_large_sets(tiny_data, tmp_path):
    model, dm, cache = fit(tiny_data, tmp_path / "torch", epochs=1)
    model.eval()
    torch_val = dm.features_for("val")[0].features.tensor()

    def run(engine: str, min_images: int, folder: str) -> tuple[FeatureCache, torch.Tensor]:
        dm = tiny_datamodule(tiny_data, SMALL_TRAIN, SMALL_EVAL, batch_size=4)
        cache = FeatureCache(
            enabled=True,
            dir=tmp_path / folder,
            train_views=2,
            eval_batch_size=64,
            embed_batch_size=5,
            seed=7,
            engine=engine,
            onnx_min_images=min_images,
        )
        trainer = tiny_trainer([cache, BackboneFinetuning()], max_epochs=1, precision="32")
        trainer.fit(tiny_model(), datamodule=dm)
        return cache, dm.features_for("val")[0].features.tensor()

    onnx, onnx_val = run("onnxruntime", 2000, "onnx")
    assert onnx.stats["engine"] == "onnxruntime" and list((tmp_path / "onnx" / "onnx").glob("*.onnx"))
    assert torch.allclose(onnx_val, torch_val, atol=1e-4)  # fp32 both ways
    small, _ = run("auto", 2000, "auto_small")  # 8 val + 2 x 12 train features: below the threshold
    large, _ = run("auto", 10, "auto_large")
    assert small.stats["engine"] == "torch" and large.stats["engine"] == "onnxruntime"
    with pytest.raises(ConfigError, match="onnx_min_images must be a whole number"):
        FeatureCache(
            enabled=True, dir=tmp_path, train_views=1, eval_batch_size=4, embed_batch_size=4, onnx_min_images=-1
        )
    with pytest.raises(ConfigError, match="model.cache.engine must be one of"):
        FeatureCache(
            enabled=True, dir=tmp_path, train_views=1, eval_batch_size=4, embed_batch_size=4, engine="tensorrt"
        )


def test_another_engine_s_features_are_stored_at_the_run_s_precision():
    import contextlib

    from src.callbacks.feature_cache import embed_batches

    class Bf16Run:
        received_sigterm = False
        precision = "bf16-mixed"

    batches = [(torch.zeros(2, 3, 8, 8), torch.zeros(2))]
    out = list(
        embed_batches(tiny_model(), batches, contextlib.nullcontext, Bf16Run(), None, lambda x: torch.ones(2, 5))
    )
    assert out[0].dtype == torch.bfloat16 and out[0].shape == (2, 5)
