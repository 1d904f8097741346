"""One test per private framework access in src/utils/lightning_compat.py: an upgrade that renames or drops
one fails here, by name, instead of silently breaking a resume or a SIGTERM save."""

from __future__ import annotations

import warnings

import pytest
import torch
from hydra.core.utils import JobReturn, JobStatus
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from torchmetrics import MeanMetric

from src.utils import lightning_compat as compat


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, ModelCheckpoint, BoringModel]:
    """A BoringModel fitted for 2 epochs of 3 batches, with a ModelCheckpoint."""
    folder = tmp_path_factory.mktemp("boring")
    ckpt = ModelCheckpoint(dirpath=folder, save_last=True)
    trainer = Trainer(
        default_root_dir=folder,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        callbacks=[ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = BoringModel()
    trainer.fit(model)
    return trainer, ckpt, model


def test_attached_trainer(fitted: tuple[Trainer, ModelCheckpoint, BoringModel]) -> None:
    trainer, _, model = fitted
    assert compat.attached_trainer(model) is trainer
    assert compat.attached_trainer(BoringModel()) is None


def test_set_sigterm_flag() -> None:
    trainer = Trainer(logger=False, enable_progress_bar=False)
    compat.set_sigterm_flag(trainer, True)
    assert trainer.received_sigterm is True
    compat.set_sigterm_flag(trainer, False)
    assert trainer.received_sigterm is False


def test_last_saved_step(fitted: tuple[Trainer, ModelCheckpoint, BoringModel]) -> None:
    trainer, ckpt, _ = fitted
    assert trainer.global_step == 6 and compat.last_saved_step(ckpt) == 6


def test_dump_checkpoint(fitted: tuple[Trainer, ModelCheckpoint, BoringModel]) -> None:
    trainer, _, model = fitted
    checkpoint = compat.dump_checkpoint(trainer)
    assert checkpoint["global_step"] == 6 and checkpoint["epoch"] == trainer.current_epoch
    assert set(checkpoint["state_dict"]) == set(model.state_dict())
    assert {"loops", "callbacks", "optimizer_states"} <= set(checkpoint)


def test_loop_progress_counters(fitted: tuple[Trainer, ModelCheckpoint, BoringModel]) -> None:
    trainer, _, _ = fitted
    assert compat.batches_done_this_epoch(trainer) == 3  # the last epoch's 3 batches
    assert compat.sampler_epoch(trainer) == 2 and compat.sampler_epoch(None) == 0


def test_reload_loaders_every_epoch(tmp_path) -> None:
    """Set from a callback's setup, the fit loop asks for fresh train and val loaders before every epoch."""
    calls = {"train": 0, "val": 0}

    class Counting(BoringModel):
        def train_dataloader(self):
            calls["train"] += 1
            return super().train_dataloader()

        def val_dataloader(self):
            calls["val"] += 1
            return super().val_dataloader()

    class Reload(Callback):
        def setup(self, trainer, pl_module, stage):
            compat.reload_loaders_every_epoch(trainer)

    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[Reload()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Counting())
    assert calls == {"train": 3, "val": 3}


def test_restore_metric_updates() -> None:
    source, target = MeanMetric(), MeanMetric()
    for value in (1.0, 2.0, 6.0):
        source.update(torch.tensor(value))
    for key, value in source.metric_state.items():
        setattr(target, key, value.clone())
    compat.restore_metric_updates(target, source.update_count)
    assert target.update_count == 3 and target.update_called
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "compute called before update" would be a warning
        assert target.compute().item() == pytest.approx(3.0)


def test_spawns_local_processes() -> None:
    assert not compat.spawns_local_processes(Trainer(accelerator="cpu", devices=1, logger=False))
    ddp = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert compat.spawns_local_processes(ddp)


def test_job_exception() -> None:
    err = ValueError("bad lr")
    failed = JobReturn(status=JobStatus.FAILED, _return_value=err)
    assert compat.job_exception(failed) is err
    with pytest.raises(ValueError):
        failed.return_value  # noqa: B018  (the public accessor re-raises: why the private one is needed)


def _item(i: int) -> dict:
    return {"index": i}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """12 items (their index) as one LitData dataset."""
    from litdata import optimize

    out = str(tmp_path_factory.mktemp("litdata") / "shards")
    optimize(
        fn=_item,
        inputs=list(range(12)),
        output_dir=out,
        chunk_size=4,
        num_workers=1,
        start_method="fork",
        verbose=False,
    )
    return out


def test_storage() -> None:
    fs = compat.storage("s3://bucket/prefix", {})  # made without touching the network
    assert all(callable(getattr(fs, name)) for name in ("upload_file", "exists", "delete_file_or_directory"))


def test_download(tmp_path) -> None:
    (tmp_path / "there").mkdir()
    (tmp_path / "there" / "dataset.json").write_text("{}")
    location = f"local:{tmp_path / 'there'}"
    compat.download(location, f"{location}/dataset.json", str(tmp_path / "here.json"), str(tmp_path), None)
    assert (tmp_path / "here.json").read_text() == "{}"


def test_start_stream_epoch(tiny_shards: str) -> None:
    from litdata import StreamingDataLoader, StreamingDataset

    def loader() -> StreamingDataLoader:
        return StreamingDataLoader(StreamingDataset(tiny_shards, shuffle=True, seed=1), batch_size=2)

    stopped = loader()
    next(iter(stopped))
    state = stopped.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    compat.start_stream_epoch(resumed, 7, resumed=True)  # mid-pass state: kept
    assert resumed.restore and resumed.current_epoch == state["current_epoch"]
    assert len([x for batch in resumed for x in batch["index"]]) == 10  # the rest of that pass
    compat.start_stream_epoch(resumed, 7, resumed=False)
    assert not resumed.restore and resumed.current_epoch == 7
    assert sorted(int(x) for batch in resumed for x in batch["index"]) == list(range(12))
    assert resumed.current_epoch == 8  # the loader adds one as the pass starts


def test_stream_items(tiny_shards: str) -> None:
    from litdata import StreamingDataset

    assert compat.stream_items(StreamingDataset(tiny_shards)) == 12


def test_reading_request_handler() -> None:
    """LitServe's handler calls the reader given for every request before anything else (it reads the request
    with the private _prepare_request); what the reader refuses reaches the client as it is."""
    import asyncio

    import litserve as ls
    from fastapi import HTTPException

    class Echo(ls.LitAPI):
        def setup(self, device: str) -> None: ...

        def predict(self, x: object) -> object:
            return x

    seen = []

    async def read(request: object) -> dict:
        seen.append(request)
        raise HTTPException(418, "refused by the reader")

    api = Echo()
    handler, authorize = compat.reading_request_handler(api, ls.LitServer(api, accelerator="cpu"), read)
    with pytest.raises(HTTPException) as refused:
        asyncio.run(handler.handle_request("the request", object))
    assert seen == ["the request"] and refused.value.status_code == 418 and callable(authorize)
