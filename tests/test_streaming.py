"""data=streaming: a dataset written as LitData shards (python -m src.optimize) trains as its folder does,
shares its feature cache, streams image epochs through LitData's loader and resumes them exactly; a local
folder read as a bucket (``local:``) stands in for object storage."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from src.data.shards import METADATA
from src.utils.cli import user_error_in
from src.utils.errors import ConfigError, DatasetError, UserError
from tests.conftest import SMALL_IMAGES, assert_same_history, compose_cfg, make_imagefolder, train_in


def optimize_into(run: Path, *overrides: str) -> dict:
    from src.optimize import optimize

    return optimize(compose_cfg("optimize", run, *overrides))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, its shards): 16 train and 8 val images, written by two processes in ~10 KB chunks
    (several chunks per writer: the order across writers and chunks is what the table must follow)."""
    tmp = tmp_path_factory.mktemp("streaming")
    data = make_imagefolder(tmp / "data", per_split={"train": 8, "val": 4}, size=(96, 72))
    figures = optimize_into(
        tmp / "run", f"data.root={data}", f"output_dir={tmp / 'shards'}", "chunk_mb=0.01", "num_workers=2"
    )
    assert figures["images"] == {"train": 16, "val": 8}
    assert len(list((tmp / "shards" / "train").glob("chunk-*.bin"))) >= 4
    assert {p.name for p in (tmp / "run").iterdir()} >= {
        "split.csv",
        "skipped_files.csv",
        "duplicates.csv",
        "optimize.json",
    }
    return data, tmp / "shards"


def streaming_datamodule(location: str, cache: Path):
    from torchvision import transforms as T

    from src.data.streaming import StreamingDataModule

    steps = [T.Resize(72), T.CenterCrop(64)]
    return StreamingDataModule(
        location, cache, train_transforms=steps, eval_transforms=steps, mean=[0.5] * 3, std=[0.5] * 3, num_workers=0
    )


@pytest.mark.parametrize("prefix", ["", "local:"], ids=["folder", "as-a-bucket"])
def test_shards_hold_every_image_s_own_bytes_in_the_listing_s_order(shards, tmp_path, prefix):
    from src.data.datamodule import ImageFolderDataModule

    data, out = shards
    dm = streaming_datamodule(f"{prefix}{out}", tmp_path / "cache")
    dm.setup("fit")
    steps = dm.eval_transform.transforms[:-2]
    folder = ImageFolderDataModule(data, steps, steps, [0.5] * 3, [0.5] * 3, num_workers=0, preflight_cache_dir=None)
    folder.setup("fit")
    assert dm.classes == folder.classes and dm.split_rows() == folder.split_rows()
    assert dm.digests == folder.digests and dm.fingerprint == folder.fingerprint
    for split in ("train", "val"):
        streamed, listed = dm.datasets[split], folder.datasets[split]
        assert [s for s, _ in streamed.samples] == [s for s, _ in listed.samples]
        streamed.transform = listed.transform = dm.eval_transform  # the same pixels, not the same random crop
        for i in range(len(listed)):
            (a, ya), (b, yb) = streamed[i], listed[i]
            assert ya == yb and torch.equal(a, b), (split, i)
    if prefix:  # read the way a bucket is: every chunk came through the download cache
        assert len(list((tmp_path / "cache").rglob("chunk-*.bin"))) == len(list(out.rglob("chunk-*.bin")))


def test_a_streamed_run_is_its_folder_run_sharing_the_feature_cache(shards, tmp_path):
    data, out = shards
    common = [*SMALL_IMAGES, "experiment=lite0_fe", "trainer.max_epochs=2", "data.batch_size=4", "seed=3"]
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    folder = train_in(tmp_path / "folder", *common, f"data.root={data}", cache)
    streamed = train_in(tmp_path / "streamed", *common, "data=streaming", f"data.input_dir={out}", cache)
    assert streamed["feature_cache"]["embedded_images"] == 0  # every row from the folder run's cache
    assert streamed["feature_cache"]["hits"] >= 2
    assert_same_history(folder["history"], streamed["history"])
    for name in ("split.csv", "skipped_files.csv", "duplicates.csv"):
        assert (tmp_path / "streamed" / name).read_text() == (tmp_path / "folder" / name).read_text()


@pytest.mark.slow
def test_streamed_image_epochs_shuffle_per_epoch_and_resume_exactly_mid_epoch(shards, tmp_path):
    """No feature cache: every epoch streams images through LitData's loader (local: = through the download
    cache). A SIGTERM after the first step of epoch 2 and a resume end where the straight run ends."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    _, out = shards
    base = [
        *SMALL_IMAGES,
        "experiment=lite0_fe",
        "trainer.max_epochs=3",
        "data.batch_size=4",
        "seed=5",
        "model.cache.enabled=false",
        "data=streaming",
        f"data.input_dir=local:{out}",
        "data.num_workers=1",
    ]
    straight = train_in(tmp_path / "straight", *base)
    with pytest.raises(SIGTERMException):
        train_in(
            tmp_path / "resumed",
            *base,
            "+callbacks.sig._target_=tests.signals.SignalAt",
            "+callbacks.sig.epoch=1",
            "+callbacks.sig.batch=0",
            f"+callbacks.sig.signum={int(signal.SIGTERM)}",
        )
    resumed = train_in(tmp_path / "resumed", *base, "ckpt_path=last")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert_same_history(straight["history"], resumed["history"])


def test_the_streaming_loader_shuffles_by_the_run_s_epoch_whoever_holds_it(shards, tmp_path):
    from src.data.streaming import EpochStreamingLoader

    _, out = shards
    dm = streaming_datamodule(str(out), tmp_path / "cache")
    dm.setup("fit")
    epoch = {"now": 0}

    def order(loader) -> list[int]:
        return [round(float(t.sum()), 2) for t, _ in loader]  # an image's pixel sum identifies it

    def make() -> EpochStreamingLoader:
        stream = dm.datasets["train"].stream(shuffle=True, seed=9, drop_last=False)
        return EpochStreamingLoader(stream, lambda: epoch["now"], batch_size=1)

    kept = make()
    first = order(kept)
    epoch["now"] = 1
    second = order(kept)
    assert sorted(first) == sorted(second) and first != second  # every item once, reshuffled
    assert order(make()) == second  # a loader made again for epoch 1 is epoch 1's
    epoch["now"] = 0
    assert order(make()) == first


def test_streaming_refuses_what_it_cannot_do_with_a_clear_message(shards, tmp_path):
    data, out = shards
    with pytest.raises(DatasetError, match="data.input_dir is not set"):
        streaming_datamodule(None, tmp_path)
    with pytest.raises(DatasetError, match="holds no dataset.json"):
        streaming_datamodule(str(data), tmp_path).setup("fit")
    with pytest.raises(DatasetError, match="holds no dataset.json"):
        streaming_datamodule(f"local:{data}", tmp_path).setup("fit")
    cfg = [*SMALL_IMAGES, "experiment=lite0_fe", "data=streaming", f"data.input_dir={out}"]
    for extra, message in (
        (f"data.root={data}", "data.root and data.labels describe image folders"),
        ("data.sampler=balanced", "class_weights=auto"),
        ("data.split.folds=3", "k-fold"),
    ):
        with pytest.raises(Exception) as refused:  # Hydra wraps what the datamodule raises
            train_in(tmp_path / "refused", *cfg, extra)
        error = user_error_in(refused.value)
        assert isinstance(error, ConfigError) and message in str(error), refused.value


def test_tasks_that_read_folders_refuse_shards_by_name(shards, tmp_path):
    from src.audit import audit

    _, out = shards
    streaming = ["data=streaming", f"data.input_dir={out}"]
    with pytest.raises(ConfigError, match="src.audit reads image folders"):
        audit(compose_cfg("audit", tmp_path / "audit", *streaming))
    with pytest.raises(ConfigError, match="src.optimize reads image folders"):
        optimize_into(tmp_path / "optimize", *streaming, f"output_dir={tmp_path / 'again'}")


def copy_of(out: Path, tmp_path: Path) -> tuple[Path, dict]:
    import shutil

    shutil.copytree(out, tmp_path / "copy")
    return tmp_path / "copy", json.loads((tmp_path / "copy" / METADATA).read_text())


def test_shards_out_of_step_with_their_table_fail_loudly(shards, tmp_path):
    _, out = shards
    copy, meta = copy_of(out, tmp_path)
    rows = meta["items"]["val"]
    rows[0], rows[1] = rows[1], rows[0]  # the table says item 0 is what the shard holds at 1
    rows[2][1] = 1 - rows[2][1]  # and item 2 has the other class
    (copy / METADATA).write_text(json.dumps(meta))
    dm = streaming_datamodule(str(copy), tmp_path / "cache")
    dm.setup("fit")
    for i in (0, 2):
        with pytest.raises(DatasetError, match=f"item {i} .* is not what dataset.json lists"):
            dm.datasets["val"][i]
    meta["items"]["val"] = rows[:-1]  # one item fewer than the shards hold
    (copy / METADATA).write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="holds 8 items but dataset.json lists 7"):
        streaming_datamodule(str(copy), tmp_path / "cache").setup("fit")


def test_damaged_chunks_are_refused_not_trained_on_or_cached(shards, tmp_path):
    """Bytes flipped inside a chunk: the image may still decode (JPEG), but its SHA-256 no longer matches, so
    no run trains on it or stores its features under the clean image's key."""
    _, out = shards
    copy, _ = copy_of(out, tmp_path)
    chunk = sorted((copy / "val").glob("chunk-*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 10):
        data[k] ^= 0xFF
    chunk.write_bytes(bytes(data))
    dm = streaming_datamodule(str(copy), tmp_path / "cache")
    dm.setup("fit")
    errors = []
    for i in range(len(dm.datasets["val"])):
        try:
            dm.datasets["val"][i]
        except DatasetError as err:
            errors.append(str(err))
    assert errors and all("write them again with src.optimize" in e or "does not decode" in e for e in errors), errors
    (copy / "train" / "index.json").unlink()
    with pytest.raises(DatasetError, match="Could not open the shards at .*train"):
        streaming_datamodule(str(copy), tmp_path / "cache").setup("fit")
    with pytest.raises(DatasetError, match="is one split of a dataset: pass the folder above it"):
        streaming_datamodule(str(copy / "val"), tmp_path / "cache").setup("fit")


def test_a_file_changed_while_shards_are_written_stops_every_writer_with_its_name(tmp_path):
    from src.data.datamodule import ImageFolderDataModule
    from src.data.shards import write_shards
    from src.utils.processes import descendants

    data = make_imagefolder(tmp_path / "data", per_split={"train": 6, "val": 2}, size=(32, 24))
    source = ImageFolderDataModule(data, [], [], [0.5] * 3, [0.5] * 3, num_workers=0, preflight_cache_dir=None)
    source.setup("fit")
    changed = source.datasets["train"].samples[-1][0]
    Path(changed).write_bytes(Path(changed).read_bytes() + b"more")  # after the preflight hashed it
    before = set(descendants(os.getpid()))
    with pytest.raises(DatasetError, match=f"{changed} changed while the shards were being written"):
        write_shards(source, str(tmp_path / "shards"), 0.01, 2)
    assert set(descendants(os.getpid())) <= before  # LitData leaves its writers and their helpers running; none is left
    assert not (tmp_path / "shards" / METADATA).exists()  # readers refuse the half-written shards
    Path(changed).write_bytes(Path(changed).read_bytes()[: -len(b"more")])  # as the preflight saw it: written again
    assert write_shards(source, str(tmp_path / "shards"), 0.01, 2)["items"]["train"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [METADATA, "train", "val"]  # no write marker left


def test_optimize_refuses_a_folder_it_did_not_write_and_keeps_its_files(shards, tmp_path):
    data, _ = shards
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"holds what src.optimize did not write \(notes.txt\)"):
        optimize_into(tmp_path / "run", f"data.root={data}", f"output_dir={foreign}")
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="chunk_mb"):
        optimize_into(tmp_path / "run2", f"data.root={data}", f"output_dir={tmp_path / 'new'}", "chunk_mb=0")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        optimize_into(tmp_path / "run3", f"data.root={data}", f"output_dir={tmp_path / 'afile'}")


def test_optimize_knows_its_shards_by_their_format_not_by_a_file_name(shards, tmp_path):
    """A user's folder with train/, val/ and a dataset.json of their own is not shards: refused, untouched. Shards
    written before, or a write cut short (the marker is there, dataset.json not yet), are written again; an extra
    file inside their split folders makes them someone's folder again."""
    import shutil

    data, out = shards
    mine = tmp_path / "mine"
    make_imagefolder(mine, per_split={"train": 1, "val": 1})
    (mine / METADATA).write_text(json.dumps({"name": "my photo collection"}))
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    for metadata in ({"name": "my photo collection"}, {"format": "someone-else/1"}, "not json \xff"):
        (mine / METADATA).write_text(metadata if isinstance(metadata, str) else json.dumps(metadata))
        with pytest.raises(DatasetError, match="holds what src.optimize did not write"):
            optimize_into(tmp_path / "run", f"data.root={data}", f"output_dir={mine}")
    (mine / METADATA).write_text(json.dumps({"name": "my photo collection"}))
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before

    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "train" / "holiday.jpg").write_bytes(b"a photo")  # someone's file among the chunks
    with pytest.raises(DatasetError, match=r"\(train/holiday.jpg\)"):
        optimize_into(tmp_path / "run", f"data.root={data}", f"output_dir={again}")
    (again / "train" / "holiday.jpg").unlink()
    (again / METADATA).unlink()  # a write cut short by kill -9: the marker, an emptied split folder
    (again / ".src-optimize-writing.json").write_text(
        json.dumps({"format": "transfer-learning-template/litdata-shards/1"})
    )
    shutil.rmtree(again / "val")
    assert optimize_into(tmp_path / "run", f"data.root={data}", f"output_dir={again}")["images"] == {
        "train": 16,
        "val": 8,
    }
    assert sorted(p.name for p in again.iterdir()) == [METADATA, "train", "val"]


def test_shard_metadata_of_random_bytes_is_refused_by_name(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / METADATA).write_bytes(bytes(range(256)) * 16)
    with pytest.raises(DatasetError, match="dataset.json is not JSON text"):
        streaming_datamodule(str(tmp_path / "shards"), tmp_path / "cache").setup("fit")


def test_optimize_never_writes_where_the_images_are(shards, tmp_path):
    import shutil

    data, out = shards
    shutil.copytree(out, tmp_path / "shards")
    shutil.copytree(data, tmp_path / "shards" / "images")  # images inside an old shards folder
    before = sorted(p for p in (tmp_path / "shards").rglob("*"))
    for root, output in (
        (tmp_path / "shards" / "images", tmp_path / "shards"),
        (tmp_path / "shards", tmp_path / "shards"),
        (tmp_path / "shards", tmp_path / "shards" / "images" / "out"),
    ):
        with pytest.raises(ConfigError, match="overlap: write the shards to a folder outside"):
            optimize_into(tmp_path / "run", f"data.root={root}", f"output_dir={output}")
    assert sorted(p for p in (tmp_path / "shards").rglob("*")) == before


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: m["items"]["train"][0].__setitem__(1, 2), r"items.train\[0\] is not"),  # class 2 of 2
        (lambda m: m["items"]["val"][3].__setitem__(0, "/etc/passwd"), r"items.val\[3\] is not"),
        (lambda m: m.__setitem__("classes", []), "classes must be a list"),
        (lambda m: m["items"].__setitem__("holdout", []), "items must map splits"),
        (lambda m: m.pop("fingerprint"), "fingerprint must be text"),
    ],
    ids=["label-out-of-range", "absolute-path", "no-classes", "unknown-split", "no-fingerprint"],
)
def test_a_damaged_dataset_json_is_refused_before_anything_reads_it(shards, tmp_path, damage, message):
    import shutil

    _, out = shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = json.loads((copy / METADATA).read_text())
    damage(meta)
    (copy / METADATA).write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=f"dataset.json is damaged .*{message}"):
        streaming_datamodule(str(copy), tmp_path / "cache").setup("fit")
