"""Entry-point helpers: user errors become one clear message and exit status 1, not a traceback."""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from src.utils.errors import UserError
from src.utils.precision import fastest_precision
from src.utils.processes import stop_on_sigterm

log = logging.getLogger("src")
SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The UserError behind ``exc``, unwrapping Hydra's InstantiationException; None if there is none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(err: UserError) -> str:
    """The error's own message. Raised in a DataLoader worker, torch re-raises it in the main process with the
    worker's traceback as its text ("Caught DatasetError in DataLoader worker process 0. Original Traceback ...");
    a user needs the last line, not the frames."""
    text = str(err)
    starts = list(re.finditer(rf"\n(?:[\w.]+\.)?{type(err).__name__}: ", text)) if WORKER_TRACEBACK in text else []
    return f"{text[starts[-1].end() :].strip()} (in a data-loading worker)" if starts else text


def unique_dir(base: str) -> str:
    """``base`` plus a short random suffix, created here atomically (retrying on a clash): runs started in
    the same second never share a folder. Hydra's config cache resolves it once per run or sweep."""
    while True:
        path = f"{base}_{secrets.token_hex(2)}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue


# hydra.run.dir / hydra.sweep.dir: ${unique_dir:.../${now:...}} (conf/hydra/default.yaml)
OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)
# trainer.precision: ${fastest_precision:} picks bf16 where the CPU or GPU computes it natively
OmegaConf.register_new_resolver("fastest_precision", fastest_precision, replace=True)


def report_user_errors(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a Hydra task: a UserError is logged alone and exits 1 (in a sweep, only that job fails).

    Training stopped by SIGTERM exits 143. A fatal signal (SIGSEGV, SIGBUS: e.g. a memory-mapped cache file
    truncated by another program while this run reads it) prints the Python stack before the process dies.
    """

    @functools.wraps(task)
    def wrapper(cfg: Any) -> Any:
        faulthandler.enable()
        stop_on_sigterm()  # data preparation, evaluation, prediction: SIGTERM ends them through the path below
        try:
            return task(cfg)
        except SIGTERMException:
            # Lightning stopped training on SIGTERM (a checkpoint was saved), or it came in another phase
            log.error("Stopped by SIGTERM; exit status %d.", SIGTERM_EXIT)
            sys.exit(SIGTERM_EXIT)
        except Exception as exc:
            err = user_error_in(exc)
            if err is None:
                raise
            log.error("%s", user_message(err))
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise err from None  # the sweep records this job as failed and goes on with the others
            sys.exit(1)

    return wrapper


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; or a torch device string (``cpu``, ``cuda``, ``cuda:1``),
    checked here: a GPU asked for where torch sees none is a UserError, not a traceback from deep inside torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"device={name!r} is not a device: use auto, cpu or cuda (cuda:N for GPU N).") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device={name}, but torch sees no GPU on this machine: use device=auto or device=cpu.")
        if device.index is not None and device.index >= count:
            raise UserError(f"device={name}, but torch sees {count} GPU(s) here (cuda:0 to cuda:{count - 1}).")
    elif device.type not in ("cpu",):
        raise UserError(f"device={name}: this project runs on cpu or cuda; use device=auto, cpu or cuda.")
    return device
