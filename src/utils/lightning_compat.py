"""Every private attribute of Lightning, LitData, LitServe, torchmetrics and Hydra this project touches, one small
function each.

Each function says why no public API does the job. tests/test_lightning_compat.py exercises every one of
them against the installed versions, so an upgrade that renames or removes one fails there, loudly, instead
of silently changing a resume or a SIGTERM save.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torchmetrics import Metric


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The trainer a module is attached to, or None.

    ``LightningModule.trainer`` raises when there is none; only the private ``_trainer`` answers "none" quietly."""
    return module._trainer


def set_sigterm_flag(trainer: Trainer, received: bool) -> None:
    """Set or clear Lightning's "SIGTERM received" flag.

    ``Trainer.received_sigterm`` is read-only; holding a SIGTERM until validation ends (so a resumed run keeps
    that epoch's metrics) needs the flag cleared and raised again on the signal connector that owns it."""
    trainer._signal_connector.received_sigterm = received


def last_saved_step(checkpoint: ModelCheckpoint) -> int:
    """The global step of ModelCheckpoint's latest save (0 before any).

    Public attributes give the paths saved, not when: a SIGTERM save must know whether last.ckpt is current."""
    return checkpoint._last_global_step_saved


def dump_checkpoint(trainer: Trainer) -> dict[str, Any]:
    """The full checkpoint dict the trainer would save, without saving it.

    ``Trainer.save_checkpoint`` also waits on every rank (a barrier); a DDP rank stopping alone on SIGTERM
    must write without waiting, and only the checkpoint connector builds the dict."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def batches_done_this_epoch(trainer: Trainer) -> int:
    """Training batches completed in the current epoch (restored on a mid-epoch resume).

    Lightning's loops keep their progress counters on ``fit_loop``, which has no public accessor for them."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


def sampler_epoch(trainer: Trainer | None) -> int:
    """The epoch Lightning's samplers are meant to see (what it passes to ``set_epoch``), 0 without a trainer.

    ``trainer.current_epoch`` lags by one when a run resumes from a checkpoint saved at an epoch's end; the
    loop's processed-epochs counter does not."""
    return trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0


def reload_loaders_every_epoch(trainer: Trainer) -> None:
    """Have the fit loop ask the datamodule for its loaders before every epoch.

    ``reload_dataloaders_every_n_epochs`` is a Trainer argument; a callback that learns at set-up that what the
    loaders serve changes between epochs (the feature cache in a fine-tuning schedule) can only set the
    attribute the data connector stored it in."""
    trainer.reload_dataloaders_every_n_epochs = 1


def restore_metric_updates(metric: Metric, update_count: int) -> None:
    """Mark a metric whose states were just put back as having seen ``update_count`` updates.

    torchmetrics restores tensor states through attributes (public), but its update counter and compute
    cache have no setter: without them ``compute`` warns it was never updated or returns a stale value."""
    metric._update_count = update_count
    metric._computed = None


def spawns_local_processes(trainer: Trainer) -> bool:
    """True when the trainer's launcher re-runs the command line to start more local processes (DDP).

    Lightning exposes no public flag for "this launcher re-executes the script"; its class says it."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = trainer.strategy.launcher
    return isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1


def job_exception(job_return: Any) -> BaseException | Any:
    """The exception a failed Hydra job raised.

    ``JobReturn.return_value`` re-raises it for a failed job; the stored value is only in ``_return_value``."""
    return job_return._return_value


def storage(location: str, storage_options: dict[str, Any] | None = None) -> Any:
    """LitData's client for the object storage at ``location`` (upload, exists, delete).

    LitData writes and reads its shards through these clients but exports only a private factory for them; a
    file beside the shards (dataset.json) goes through the same one, so it needs no credentials of its own."""
    from litdata.streaming.fs_provider import _get_fs_provider

    return _get_fs_provider(location, storage_options or {})


def download(location: str, remote: str, local: str, cache_dir: str, storage_options: dict[str, Any] | None) -> None:
    """Copy the file ``remote`` under ``location`` to ``local`` with LitData's downloader for that storage.

    ``get_downloader`` is public, but its clients are made for chunks listed in an index: an empty list of
    chunks and ``download_file`` fetch one named file."""
    from litdata.streaming.downloader import get_downloader

    get_downloader(location, cache_dir, [], storage_options or {}).download_file(remote, local)


def start_stream_epoch(loader: Any, epoch: int, resumed: bool) -> None:
    """Have a StreamingDataLoader's next pass be epoch ``epoch`` (its shuffle and its items' seeds), unless
    ``resumed`` (state loaded from a checkpoint since its last pass) and that state is mid-pass.

    The loader counts its own passes (``current_epoch``, one added as a pass starts), and its ``restore`` flag,
    set by ``load_state_dict``, is cleared only when a pass runs to exhaustion, which Lightning's loop does not
    do (it stops at the epoch's known length): left set, the next epoch would replay the finished one's end,
    i.e. nothing. A loader made again for a later epoch, or skipped in epochs served from cached features,
    would also start from its own count, not the run's."""
    if resumed and loader.restore:
        return
    loader.restore = False
    loader.current_epoch = epoch


def stream_items(dataset: Any) -> int:
    """Every item of a StreamingDataset's shards, whatever this process's rank.

    ``len()`` is this rank's share under DDP; the items per chunk the dataset reads (after ``subsample``) are
    only in its ``region_of_interest``."""
    return sum(end - start for start, end in dataset.region_of_interest)


def reading_request_handler(api: Any, server: Any, read: Callable[[Any], Awaitable[Any]]) -> Any:
    """LitServe's handler of a (non-streaming) endpoint whose request is read by ``read(request)`` -> the payload
    ``decode_request`` gets, and an ``authorize`` dependency for its route (LitServe's own, or none).

    LitServe reads a request with the private ``RegularRequestHandler._prepare_request`` (``request.form()`` with
    no limits, no timeout: a malformed form is a 500 with a traceback, a slow body waits forever) and offers no
    public way to read it otherwise before the request joins a batch."""
    from litserve.server import RegularRequestHandler

    class Handler(RegularRequestHandler):
        async def _prepare_request(self, request: Any, request_type: Any) -> Any:
            return await read(request)

    return Handler(api, server), server.setup_auth(api)
