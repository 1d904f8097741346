"""Runs killed (SIGKILL, also mid checkpoint write) or preempted (SIGTERM) and resumed end where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from src.data.resumable import ResumableLoader, ShardedSampler
from src.data.seeding import EpochSampler
from src.utils.errors import UserError
from tests import forkrun
from tests.conftest import REPO, SMALL_IMAGES, assert_same_history, make_imagefolder, run_cli, train_in

# 32 training images in batches of 4 = 8 steps per epoch; fresh augmentation every epoch (no train cache),
# so shuffling, augmentation and dropout must all replay; full checkpoints (16 MB) so writes take a while
ARGS = [
    "experiment=lite0_fe",
    "trainer.max_epochs=5",
    "seed=7",
    "data.batch_size=4",
    "model.cache.train_views=0",
    "model.slim_checkpoint=false",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, run dir) of the uninterrupted run everything here is compared with."""
    tmp = tmp_path_factory.mktemp("reference")
    data = make_imagefolder(tmp / "data", per_split={"train": 16, "val": 6}, size=(96, 72))
    proc = run_cli(*ARGS, f"data.root={data}", f"hydra.run.dir={tmp / 'run'}", scratch=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, tmp / "run"


def assert_same_run(a: Path, b: Path) -> None:
    """Same per-epoch losses (1e-6) and the same final head weights."""
    ha = json.loads((a / "summary.json").read_text())["history"]
    hb = json.loads((b / "summary.json").read_text())["history"]
    assert [h["epoch"] for h in hb] == [h["epoch"] for h in ha] == [1, 2, 3, 4, 5]
    assert_same_history(ha, hb, ("train/loss", "train/acc", "val/loss", "val/acc"))
    wa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def assert_one_set_of_outputs(run_dir: Path) -> None:
    """Resuming wrote into the run's own folders: no version_N folder, no -vN checkpoint copies."""
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in names and all(n == "last.ckpt" or n.startswith("epoch_") for n in names), names
    assert not any("-v" in n for n in names), names
    assert not list(run_dir.rglob("version_*")), list(run_dir.rglob("version_*"))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # one per process, one folder


def start_run(data: Path, run_dir: Path, scratch: Path, log: Path, *extra: str) -> forkrun.ForkedRun:
    """``python -m src.train`` in a process of its own (tests/forkrun.py), output in ``log``."""
    args = [*ARGS, f"data.root={data}", f"hydra.run.dir={run_dir}", f"paths.cache_dir={scratch / 'cache'}", *extra]
    return forkrun.start("src.train", *args, cwd=REPO, log=log)


def wait_for(condition, proc: forkrun.ForkedRun, poll: float, timeout: float = 300) -> bool:
    """Poll ``condition`` until it holds (True) or the process ends or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def writing(folder: Path) -> bool:
    """A checkpoint write is under way: its temp file (.<name>.tmp, src.utils.checkpoint_io) is there."""
    try:
        return any(e.name.startswith(".") and e.name.endswith(".tmp") for e in os.scandir(folder))
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_kills_at_random_moments_and_mid_checkpoint_write_then_resume_matches(reference, tmp_path):
    data, straight = reference
    run_dir, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    rng = random.Random(2026)
    landed = []
    for k in range(6):  # three kills at random moments of training, three during a checkpoint write
        # a kill during the very first save can leave epoch_000.ckpt without last.ckpt: resume from it, as the
        # "Cannot resume" message tells a user to
        whole = sorted(ckpts.glob("epoch_*.ckpt"))
        resume = ["ckpt_path=last"] if (ckpts / "last.ckpt").exists() else [f"ckpt_path={whole[-1]}"] if whole else []
        log = tmp_path / f"attempt{k}.log"
        proc = start_run(data, run_dir, tmp_path, log, *resume)
        if k % 2:  # during a checkpoint write: the moment a temp file appears beside last.ckpt
            # (a 2 ms poll catches a write of 16 MB with fsync; a tighter one takes a core from the run)
            hit = wait_for(lambda: writing(ckpts), proc, poll=0.002)
            where = "checkpoint write"
        else:  # during training: a random moment after the first training step of this attempt
            # once training runs and a checkpoint exists: a kill before the first save only restarts the run
            def training(log=log) -> bool:
                return "Epoch " in log.read_text(errors="replace") and (ckpts / "last.ckpt").exists()

            hit = wait_for(training, proc, poll=0.01)
            time.sleep(rng.uniform(0.0, 1.5))
            where = "training"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert hit and proc.returncode == -signal.SIGKILL, f"attempt {k}: the run ended before the kill"
        landed.append(where)
    assert not (run_dir / "summary.json").exists()
    assert landed.count("checkpoint write") == 3 and landed.count("training") == 3

    final = run_cli(*ARGS, f"data.root={data}", f"hydra.run.dir={run_dir}", "ckpt_path=last", scratch=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_run(straight, run_dir)
    assert not list(ckpts.glob(".*.tmp")), "interrupted writes are cleaned up on resume"
    assert_one_set_of_outputs(run_dir)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_mid_epoch_and_the_resumed_run_matches(reference, tmp_path):
    data, straight = reference
    run_dir = tmp_path / "preempted"
    # a real SIGTERM to the training process after step 3 of 8 in epoch 2 (tests/signals.py)
    signal_at = ["+callbacks.signal_at._target_=tests.signals.SignalAt", "+callbacks.signal_at.epoch=1"]
    signal_at.append("+callbacks.signal_at.batch=2")
    args = [*ARGS, f"data.root={data}", f"hydra.run.dir={run_dir}"]
    stopped = run_cli(*args, *signal_at, scratch=tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM: saved" in stopped.stdout + stopped.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    fit = ckpt["loops"]["fit_loop"]
    assert fit["epoch_progress"]["current"]["completed"] == 1  # one epoch done ...
    assert fit["epoch_loop.batch_progress"]["current"]["completed"] == 3  # ... and 3 steps of the next
    assert fit["state_dict"]["combined_loader"] == [{"epoch": 1, "samples_done": 12}]
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)  # flushed
    assert not (run_dir / "summary.json").exists()

    resumed = run_cli(*args, "ckpt_path=last", scratch=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(straight, run_dir)
    assert_one_set_of_outputs(run_dir)


def test_sharded_sampler_splits_pads_and_resumes_an_epoch_where_it_stopped():
    epoch = {"now": 2}
    inner = EpochSampler(10, seed=3, epoch_source=lambda: epoch["now"])
    full = [i for i, _ in inner]

    def shard(rank: int, world: int, pad: bool = True) -> ShardedSampler:
        return ShardedSampler(inner, lambda: epoch["now"], lambda: (rank, world), pad=pad)

    one = shard(0, 1)
    loader = ResumableLoader(list(range(10)), batch_size=3, sampler=one, progress=lambda: (2, 6), resume=one.skip)
    assert loader.state_dict() == {"epoch": 2, "samples_done": 6}
    loader.load_state_dict({"epoch": 2, "samples_done": 6})
    assert [i for i, _ in loader.sampler] == full[6:]  # the epoch's last 4 items, once
    assert [i for i, _ in loader.sampler] == full
    loader.load_state_dict({"epoch": 1, "samples_done": 6})  # saved in another epoch: nothing to skip
    assert [i for i, _ in loader.sampler] == full

    # 3 ranks: 10 items padded to 12 by repeating the head; together they cover the single-process order
    parts = [[i for i, _ in shard(r, 3)] for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4] == [len(shard(r, 3)) for r in range(3)]
    assert [parts[k % 3][k // 3] for k in range(12)] == full + full[:2]
    resumed = shard(1, 3)
    resumed.skip(2, 6)  # two steps of batch 1 on each of 3 ranks were done
    assert [i for i, _ in resumed] == parts[1][2:]
    # evaluation: no padding, shares differ by at most one
    assert [len(list(shard(r, 3, pad=False))) for r in range(3)] == [4, 3, 3]


def test_epoch_sampler_follows_its_epoch_source():
    epoch = {"now": 3}
    sampler = EpochSampler(10, seed=1, epoch_source=lambda: epoch["now"])
    first = list(sampler)
    assert {e for _, e in first} == {3} and sorted(i for i, _ in first) == list(range(10))
    assert list(sampler) == first
    epoch["now"] = 4
    assert list(sampler) != first


@pytest.mark.slow
def test_resume_from_a_corrupt_or_missing_last_ckpt_is_a_clear_error(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_split={"train": 8, "val": 4})
    run_dir = tmp_path / "run"
    args = ["experiment=lite0_fe", f"data.root={data}", f"hydra.run.dir={run_dir}"]
    missing = run_cli(*args, "ckpt_path=last", scratch=tmp_path)
    assert missing.returncode == 1 and "Cannot resume" in missing.stdout + missing.stderr
    assert not (run_dir / "summary.json").exists()  # no silent start from scratch
    first = run_cli(*args, "trainer.max_epochs=2", scratch=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    proc = run_cli(*args, "trainer.max_epochs=3", "ckpt_path=last", scratch=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert f"{last} is corrupt" in out and "epoch_" in out and "Traceback" not in out


# ------------------------------------------------------------------------------ in-process resume checks


def stop_after(epoch: int) -> list[str]:
    return ["+callbacks.stop._target_=tests.signals.StopAfter", f"+callbacks.stop.epoch={epoch}"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("small") / "data", per_split={"train": 8, "val": 4}, size=(96, 72))


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """The summary of an uninterrupted run with these overrides, trained once per module."""
    done: dict[tuple[str, ...], dict] = {}

    def straight(*overrides: str) -> dict:
        if overrides not in done:
            done[overrides] = train_in(tmp_path_factory.mktemp("straight"), *overrides)
        return done[overrides]

    return straight


FE = [*SMALL_IMAGES, "experiment=lite0_fe", "data.batch_size=4"]
FT = [
    *SMALL_IMAGES,
    "experiment=lite0_ft",
    "trainer.max_epochs=3",
    "model.finetune.schedule=[{epoch: 1, groups: 1},{epoch: 2, groups: all}]",
    "data.batch_size=4",
]


def interrupt(kind: str, epoch: int) -> list[str]:
    """Overrides that end a run after epoch ``epoch`` (1-based, ``stop``) or with a real SIGTERM after the
    first training step of that epoch (``sigterm``: last.ckpt written mid-epoch)."""
    if kind == "stop":
        return stop_after(epoch)
    return [
        "+callbacks.sig._target_=tests.signals.SignalAt",
        f"+callbacks.sig.epoch={epoch - 1}",
        "+callbacks.sig.batch=0",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, interruptions",
    [
        ([*FE, "trainer.max_epochs=3"], [("stop", 1)]),  # default cache K=1
        ([*FE, "trainer.max_epochs=3"], [("sigterm", 2)]),
        (FT, [("stop", 1), ("stop", 2)]),  # fine-tuning, resumed before each unfreeze stage
        (FT, [("sigterm", 2)]),  # fine-tuning, mid-epoch in the first unfrozen stage
    ],
    ids=["fe-default-cache", "fe-default-cache-mid-epoch", "finetune-every-stage", "finetune-mid-epoch"],
)
def test_resume_is_exact_with_the_default_cache_and_at_every_fine_tuning_stage(
    small_data, straight_runs, tmp_path, args, interruptions
):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    base = [*args, f"data.root={small_data}", "seed=11"]
    straight = straight_runs(*base)
    for i, (kind, epoch) in enumerate(interruptions):
        resume = ["ckpt_path=last"] if i else []
        if kind == "stop":
            part = train_in(tmp_path / "resumed", *base, *resume, *interrupt(kind, epoch))
            assert [h["epoch"] for h in part["history"]] == list(range(1, epoch + 1))
        else:
            with pytest.raises(SIGTERMException):
                train_in(tmp_path / "resumed", *base, *resume, *interrupt(kind, epoch))
    resumed = train_in(tmp_path / "resumed", *base, "ckpt_path=last")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert_same_history(straight["history"], resumed["history"])


def test_last_ckpt_is_written_every_epoch_even_when_val_loss_does_not_improve(small_data, tmp_path):
    # an LR of 1e-12 leaves val/loss where it was: no new best checkpoint after the first epoch
    summary = train_in(
        tmp_path / "run", *FE, f"data.root={small_data}", "trainer.max_epochs=3", "model.optimizer.lr=1e-12"
    )
    assert len({round(h["val/loss"], 6) for h in summary["history"]}) == 1
    last = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    assert Path(summary["last_checkpoint"]).name == "last.ckpt" and last["epoch"] == 2  # the third epoch, 0-based
    assert Path(summary["best_checkpoint"]).name == "epoch_000.ckpt"


def test_resume_refuses_other_preprocessing(small_data, tmp_path):
    train_in(tmp_path / "run", *FE, f"data.root={small_data}", "trainer.max_epochs=1")
    with pytest.raises(UserError, match=r"trained with the preprocessing(.|\n)*Normalize\(mean=\[0.4"):
        train_in(
            tmp_path / "run",
            *FE,
            f"data.root={small_data}",
            "trainer.max_epochs=2",
            "ckpt_path=last",
            "data.mean=[0.4,0.4,0.4]",
        )
    assert not (tmp_path / "run" / "summary.json").read_text().count('"epochs": 2')


@pytest.mark.slow
def test_resume_refuses_another_dataset_unless_asked(small_data, tmp_path):
    base = [*FE, "trainer.max_epochs=2"]
    train_in(tmp_path / "run", *base, f"data.root={small_data}", *stop_after(1))
    before = folder_contents(tmp_path / "run")
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "config.yaml", "split.csv"} <= set(before)
    cats = make_imagefolder(tmp_path / "cats", classes=("cats", "dogs"), per_split={"train": 8, "val": 4})
    with pytest.raises(UserError, match=r"trained on the classes \['ants', 'bees'\].*has \['cats', 'dogs'\]"):
        train_in(tmp_path / "run", *base, f"data.root={cats}", "ckpt_path=last")
    other = make_imagefolder(tmp_path / "other", per_split={"train": 8, "val": 4}, seed=5)  # same classes
    with pytest.raises(UserError, match="not the ones it was trained on.*allow_new_data=true"):
        train_in(tmp_path / "run", *base, f"data.root={other}", "ckpt_path=last")
    assert folder_contents(tmp_path / "run") == before  # refused: config, split.csv, records as they were
    continued = train_in(
        tmp_path / "run",
        *base,
        f"data.root={other}",
        "ckpt_path=last",
        "allow_new_data=true",
        "model.loss.label_smoothing=0.1",
    )
    assert [h["epoch"] for h in continued["history"]] == [1, 2]
    changed = continued["resumed"]["changed_settings"]  # allowed, never silent
    assert changed["data.root"] == [str(small_data), str(other)] and changed["model.loss.label_smoothing"][1] == 0.1
    assert "trainer.max_epochs" not in changed and "ckpt_path" not in changed
    train_in(tmp_path / "run2", *base, f"data.root={small_data}", *stop_after(1))
    moved = tmp_path / "moved"
    small_data.rename(moved)  # the same files in another place are the same data
    try:
        assert len(train_in(tmp_path / "run2", *base, f"data.root={moved}", "ckpt_path=last")["history"]) == 2
    finally:
        moved.rename(small_data)


def folder_contents(folder: Path) -> dict[str, bytes]:
    """Every file under a run folder but its log and TensorBoard events, by path: what a refused run must not change."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix != ".log" and "tensorboard" not in p.parts
    }


def test_last_means_where_the_run_stopped_even_when_last_ckpt_was_never_written(tmp_path):
    from src.utils.resume import remove_interrupted_writes, resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    with pytest.raises(UserError, match="Cannot resume.*last.ckpt does not exist"):
        resume_checkpoint("last", ckpts)
    assert resume_checkpoint("auto", ckpts) is None  # nothing yet: a fresh start
    # killed between Lightning's two saves of an epoch's end: epoch_000.ckpt holds the state last.ckpt would
    torch.save({"hyper_parameters": {"class_names": ["a", "b"]}}, ckpts / "epoch_000.ckpt")
    (ckpts / ".last.ckpt.x1.tmp").write_bytes(b"partial")
    for how in ("last", "auto"):
        resume = resume_checkpoint(how, ckpts)
        assert resume.path == str(ckpts / "epoch_000.ckpt") and resume.hparams["class_names"] == ["a", "b"]
    remove_interrupted_writes(ckpts)  # src.train, once every check has passed
    assert not (ckpts / ".last.ckpt.x1.tmp").exists() and (ckpts / "epoch_000.ckpt").exists()
    (ckpts / "last.ckpt").write_bytes(b"torn")  # a damaged last.ckpt is an error, never skipped over
    with pytest.raises(UserError, match="last.ckpt is corrupt.*epoch_000.ckpt"):
        resume_checkpoint("last", ckpts)


def test_a_fresh_run_in_an_old_run_folder_starts_from_scratch(small_data, tmp_path):
    """ckpt_path=null means a fresh run even where last.ckpt exists: resuming is asked for, and then checked."""
    other = make_imagefolder(tmp_path / "other", per_split={"train": 8, "val": 4}, size=(96, 72), seed=5)
    base = [*FE, "trainer.max_epochs=2"]
    train_in(tmp_path / "run", *base, f"data.root={small_data}")
    # other images, same classes, same folder: Lightning resumes an OnExceptionCheckpoint's file here, unchecked
    again = train_in(tmp_path / "run", *base, f"data.root={other}")
    fresh = train_in(tmp_path / "elsewhere", *base, f"data.root={other}")
    assert [h["epoch"] for h in again["history"]] == [1, 2]
    for a, b in zip(fresh["history"], again["history"], strict=True):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6 and abs(a["val/loss"] - b["val/loss"]) <= 1e-6


def test_a_sigterm_in_the_first_epoch_leaves_one_last_ckpt_after_the_resume(small_data, tmp_path):
    """The SIGTERM save writes last.ckpt before ModelCheckpoint ever did: the resumed run overwrites it (no
    last-v1.ckpt beside a stale last.ckpt that a later ckpt_path=last would pick; with ModelCheckpoint's
    enable_version_counter=true this fails: checked)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    base = [*FE, f"data.root={small_data}", "trainer.max_epochs=2", "model.cache.train_views=0"]
    with pytest.raises(SIGTERMException):
        train_in(tmp_path / "run", *base, *interrupt("sigterm", 1))
    train_in(tmp_path / "run", *base, "ckpt_path=last")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert not any("-v" in n for n in names), names
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 8  # 2 epochs of 16 images in 4 batches: the finished run
