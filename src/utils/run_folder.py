"""Hydra callback: a run or sweep folder that cannot be written stops the command with one line, before Hydra
sets up logging into it (which would end in a 10-frame traceback: "Unable to configure handler 'file'")."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def unwritable(folder: Path, log_file: Path | None = None) -> str | None:
    """Why ``folder`` (created if missing) cannot hold a run's files, or None. A file is created and removed to
    know: permission bits do not tell (a read-only mount, root, ACLs)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or type(err).__name__
    if log_file is not None and log_file.exists() and (log_file.is_dir() or not os.access(log_file, os.W_OK)):
        return f"its log file {log_file.name} cannot be written"
    return None


def refuse(folder: Any, reason: str, key: str) -> None:
    print(
        f"Cannot write the run folder {folder}: {reason}. Choose a folder this user can write with {key}=... (or "
        "paths.log_dir=...); nothing was run.",
        file=sys.stderr,
    )
    sys.exit(1)


class RunFolderCheck(Callback):
    """Checks ``hydra.run.dir`` (``hydra.sweep.dir`` for -m) before Hydra writes anything into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config, "hydra.sweep.dir")

    @staticmethod
    def check(config: DictConfig, key: str) -> None:
        try:  # resolving the default makes the folder (src.utils.cli.unique_dir): that may fail too
            folder = Path(str(config.hydra.run.dir if key == "hydra.run.dir" else config.hydra.sweep.dir))
        except Exception as err:  # noqa: BLE001 - an OSError from inside OmegaConf's resolver
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            refuse(f"under {config.paths.log_dir}", cause.strerror or type(cause).__name__, key)
            return
        log_name = f"{config.task_name}.log" if key == "hydra.run.dir" else None
        reason = unwritable(folder, folder / log_name if log_name else None)
        if reason:
            refuse(folder, reason, key)
