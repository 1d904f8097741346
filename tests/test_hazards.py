"""What real folders, disks and process tables throw at a run: each gets one clear message or is listed and
skipped; nothing hangs, nothing is left running, files follow the umask, runs never share a folder."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from src.data.datamodule import ImageFolderDataModule
from src.utils.cli import unique_dir
from src.utils.errors import DatasetError
from src.utils.io import DiskFullError, atomic_write, write_csv
from src.utils.log_files import ResilientFileHandler
from tests import forkrun
from tests.conftest import REPO, make_imagefolder

SMALL = {"train_transforms": [], "eval_transforms": [], "mean": [0.5] * 3, "std": [0.5] * 3}


def datamodule(root: Path, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root, **SMALL, num_workers=0, preflight_cache_dir=None, **kwargs)
    dm.setup("fit")
    return dm


def test_links_fifos_odd_names_and_gifs_are_used_or_listed_never_opened_blindly(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 4, "val": 2})
    ants = root / "train" / "ants"
    os.symlink(tmp_path / "nowhere.jpg", ants / "dangling.jpg")
    os.mkfifo(ants / "pipe.jpg")  # opening it for reading would block forever
    (ants / "folder.jpg").mkdir()
    odd = os.path.join(os.fsencode(ants), b"caf\xe9.png")  # not UTF-8
    Image.new("RGB", (32, 32), (200, 0, 0)).save(odd.decode("utf-8", "surrogateescape"), format="PNG")
    frames = [Image.new("RGB", (32, 32), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(ants / "anim.gif", save_all=True, append_images=frames[1:])
    (ants / "notes.txt").write_text("not an image")
    dm = datamodule(root, max_bad_fraction=0.5)
    reasons = {Path(p).name: r for _, p, r in dm.skipped}
    assert reasons.pop("dangling.jpg") == "dangling symlink (its target does not exist)"
    assert reasons.pop("pipe.jpg") == "not a regular file (a FIFO)"
    # what torchvision's ImageFolder (and so the seed recipe) passes over is listed, not dropped without a word
    assert sorted(reasons) == ["anim.gif", "notes.txt"] and all(r.startswith("ignored: .") for r in reasons.values())
    used = {Path(p).name for p, _ in dm.datasets["train"].samples}
    assert "caf\udce9.png" in used and dm.class_counts["train"]["ants"] == 4 + 1
    out = tmp_path / "skipped.csv"
    write_csv(out, ["split", "path"], [("train", p) for p, _ in dm.datasets["train"].samples])
    assert b"caf\xe9.png" in out.read_bytes()  # the file's own bytes, not a crash


def test_class_names_that_would_break_labels_are_refused(tmp_path):
    root = make_imagefolder(tmp_path / "nl", per_split={"train": 2, "val": 1})
    for split in ("train", "val"):
        (root / split / "bees").rename(root / split / "b\nx")
    with pytest.raises(DatasetError, match="line breaks"):
        datamodule(root)
    root = make_imagefolder(tmp_path / "nfc", classes=("caf\u00e9", "tea"), per_split={"train": 2, "val": 1})
    (root / "val" / "caf\u00e9").rename(root / "val" / "cafe\u0301")  # NFD, as macOS writes it
    with pytest.raises(DatasetError, match="different Unicode forms"):
        datamodule(root)


def test_class_names_that_differ_only_in_case_are_said(tmp_path, caplog):
    root = make_imagefolder(tmp_path / "case", classes=("bees", "Bees", "ants", "wasp_nest", "Wasp Nest"))
    datamodule(root)
    assert "differ only in case, spaces or punctuation" in caplog.text
    assert (
        "'Bees' / 'bees'" in caplog.text and "'Wasp Nest' / 'wasp_nest'" in caplog.text and "'ants'" not in caplog.text
    )


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        atomic_write(tmp_path / "a.txt", lambda f: f.write("x"))
        os.umask(0o077)
        atomic_write(tmp_path / "b.txt", lambda f: f.write("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600


def test_a_full_disk_is_one_message_and_leaves_nothing_partial(tmp_path):
    def fill(f):
        f.write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"No space left on the disk holding {tmp_path}"):
        atomic_write(tmp_path / "x.json", fill)
    assert list(tmp_path.iterdir()) == []


def test_the_log_file_survives_odd_names_and_stops_once_on_a_full_disk(tmp_path, capsys):
    handler = ResilientFileHandler(str(tmp_path / "run.log"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("t", logging.INFO, "", 0, "file %s", ("caf\udce9.jpg",), None)
    handler.emit(record)
    handler.flush()
    assert "caf\\udce9.jpg" in (tmp_path / "run.log").read_text()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    handler.stream.write = full
    for _ in range(3):
        handler.emit(record)
    err = capsys.readouterr().err
    assert err.count("stopped: No space left on device") == 1 and "Traceback" not in err
    handler.close()


# src.predict where the operating system refuses every write into one folder (a read-only mount; the suite runs as
# root, which writes through permission bits)
READ_ONLY = textwrap.dedent(
    """
    import errno, os, runpy, sys, tempfile
    refused, make = sys.argv.pop(), tempfile.mkstemp
    def mkstemp(*args, dir=None, **kwargs):
        if str(dir).startswith(refused):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))
        return make(*args, dir=dir, **kwargs)
    tempfile.mkstemp = mkstemp
    runpy.run_module("src.predict", run_name="__main__", alter_sys=True)
    """
)


def test_a_run_folder_that_cannot_be_written_is_one_line_before_anything_runs(tmp_path):
    (tmp_path / "afile").write_text("in the way")
    (tmp_path / "read-only").mkdir()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cases = {
        "a file in the path": ("src.predict", [f"hydra.run.dir={tmp_path / 'afile' / 'run'}"], "Not a directory"),
        "its log file a folder": ("src.predict", [f"hydra.run.dir={tmp_path}"], "its log file predict.log"),
        "log_dir under a file": ("src.predict", [f"paths.log_dir={tmp_path / 'afile'}"], "Not a directory"),
        "read-only": (
            f"-c:{READ_ONLY}",
            [f"hydra.run.dir={tmp_path / 'read-only'}", str(tmp_path / "read-only")],
            "Read-only file system",
        ),
    }
    (tmp_path / "predict.log").mkdir()
    for case, (module, where, reason) in cases.items():
        proc = forkrun.run(module, "ckpt_path=x.ckpt", "input=nowhere", *where, cwd=REPO, env=env, timeout=120)
        assert proc.returncode == 1, (case, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "Cannot write the run folder" in proc.stderr, (case, proc.stderr)
        assert reason in proc.stderr and "nothing was run" in proc.stderr, (case, proc.stderr)
    assert list((tmp_path / "read-only").iterdir()) == []


def test_runs_started_together_get_their_own_folders(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    base = str(tmp_path / "runs" / "2026-01-01_00-00-00")
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: unique_dir(base), range(64)))
    assert len(set(dirs)) == 64 and all(Path(d).is_dir() and d.startswith(base + "_") for d in dirs)


# a scan whose every file takes 0.2 s, in a process that reports its pool workers and then waits for a signal
SCAN = textwrap.dedent(
    """
    import os, sys, time
    import src.data.preflight as preflight
    from src.utils.cli import report_user_errors

    def slow(path):
        time.sleep(0.2)
        return None, "0" * 64

    preflight.check_file = slow
    paths = [sys.argv[1]] * 400

    @report_user_errors
    def main(cfg):
        preflight.scan(paths, workers=2, cache_dir=None)

    main(None)
    """
)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_run_stopped_during_preflight_leaves_no_worker_behind(tmp_path, signum):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    log = tmp_path / "scan.log"
    proc = forkrun.start(f"-c:{SCAN}", str(image), cwd=REPO, log=log)  # its own process, imports already done
    deadline = time.monotonic() + 60
    while len(workers := children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) >= 2, "the scan started no pool workers"
    time.sleep(0.5)
    os.kill(proc.pid, signum)
    proc.wait(60)
    err = log.read_text(errors="replace")
    assert proc.returncode == (143 if signum == signal.SIGTERM else -signal.SIGKILL), err[-2000:]
    if signum == signal.SIGTERM:
        assert "Stopped by SIGTERM" in err and "Traceback" not in err
    time.sleep(1.0)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text()]
    assert alive == [], f"workers outlived the run: {alive}"


def test_a_link_to_itself_is_listed_not_a_crash(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 4, "val": 2})
    os.symlink("selfloop.png", root / "train" / "ants" / "selfloop.png")
    dm = datamodule(root, max_bad_fraction=0.5)
    assert [(Path(p).name, r) for _, p, r in dm.skipped] == [
        ("selfloop.png", "unreadable: Too many levels of symbolic links")
    ]


def test_a_rewrite_that_keeps_size_and_mtime_is_scanned_again(tmp_path):
    from src.data.preflight import scan

    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(image)
    assert scan([str(image)], 1, tmp_path / "cache")[0] == {}
    st = image.stat()
    image.write_bytes(bytes(st.st_size))  # same size, not an image any more
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert str(image) in scan([str(image)], 1, tmp_path / "cache")[0]


def test_the_generated_synthetic_set_follows_the_umask(tmp_path):
    from src.data.synthetic import make_shapes_dataset

    old = os.umask(0o002)
    try:
        make_shapes_dataset(tmp_path / "shapes", ["circle", "cross"], 1, 1, 16, seed=0)
    finally:
        os.umask(old)
    assert (tmp_path / "shapes").stat().st_mode & 0o777 == 0o775


def _idle_worker() -> None:
    from src.utils.processes import start_worker

    start_worker()
    time.sleep(60)


def test_a_worker_takes_sigterm_even_when_its_parent_only_notes_it():
    """Pool.terminate (the end of every ``with Pool()``) must end a worker blocked on the task queue: a
    worker that inherited a handler which only notes SIGTERM kept the preflight's parent in join forever."""
    import multiprocessing

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # like a handler that defers to Lightning
    try:
        worker = multiprocessing.get_context("fork").Process(target=_idle_worker)
        worker.start()
        time.sleep(1.0)  # past start_worker
        worker.terminate()
        worker.join(timeout=10)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        if worker.is_alive():
            worker.kill()


def test_a_device_this_machine_lacks_is_one_message(monkeypatch):
    """src.predict/src.eval device=cuda on a CPU-only machine: a UserError naming the choices (it was an 11-frame
    torch traceback from inside the checkpoint loader)."""
    import torch

    from src.utils.cli import pick_device
    from src.utils.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for name, message in (
        ("cuda", "torch sees no GPU on this machine: use device=auto or device=cpu"),
        ("cuda:1", "torch sees no GPU"),
        ("gpu0", "is not a device"),
        ("meta", "runs on cpu or cuda"),
    ):
        with pytest.raises(UserError, match=message):
            pick_device(name)
    assert pick_device("auto") == pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"sees 1 GPU\(s\) here \(cuda:0 to cuda:0\)"):
        pick_device("cuda:1")


class FailingItems:
    """A dataset whose every item fails as a damaged shard does: a DatasetError raised in a loader worker."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        raise DatasetError(f"shards: item {i} (a/b.jpg) is not what dataset.json lists;\nwrite them again.")


def test_an_error_in_a_loader_worker_is_reported_by_its_own_message(caplog):
    """torch re-raises a worker's error with the worker's traceback as its text: the run's one message must be the
    error itself (it was a traceback inside the message)."""
    from torch.utils.data import DataLoader

    from src.utils.cli import user_error_in, user_message

    with pytest.raises(DatasetError) as caught:
        list(DataLoader(FailingItems(), num_workers=1))
    assert "Original Traceback" in str(caught.value)
    message = user_message(user_error_in(caught.value))
    assert (
        message
        == "shards: item 0 (a/b.jpg) is not what dataset.json lists;\nwrite them again. (in a data-loading worker)"
    )
    assert user_message(DatasetError("plain")) == "plain"
