"""Which checkpoint a run resumes from, checked before training starts."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from src.utils.errors import UserError

log = logging.getLogger(__name__)


def resume_checkpoint(ckpt_path: str | None, checkpoint_dir: Path, cleanup: bool = True) -> str | None:
    """The checkpoint to resume from, checked before training: never a silent start from scratch.

    ``last`` means this run folder's checkpoints/last.ckpt; ``auto`` the same when it exists, else a fresh
    start, said in the log (for jobs a cluster requeues with the same command). A missing or unreadable
    file is a UserError naming it and, for a corrupt one, the newest readable checkpoint beside it.
    ``cleanup`` removes temp files of checkpoint writes a kill cut short.
    """
    if ckpt_path is None:
        return None
    path = checkpoint_dir / "last.ckpt" if str(ckpt_path) in ("last", "auto") else Path(ckpt_path)
    if cleanup:
        for orphan in path.parent.glob(".*.ckpt.*.tmp"):  # a write cut short by a kill; the old file is whole
            log.info("Removing %s, a checkpoint write that was interrupted", orphan)
            orphan.unlink(missing_ok=True)
    if str(ckpt_path) == "auto" and not path.exists():
        log.info("ckpt_path=auto: no %s yet, starting from scratch", path)
        return None
    if not path.is_file():
        raise UserError(
            f"Cannot resume: {path} does not exist. Resume a run in its own folder: "
            "hydra.run.dir=logs/train/runs/<date_time> ckpt_path=last (with the run's other overrides)."
        )

    def readable(p: Path) -> bool:
        try:
            torch.load(p, map_location="cpu", weights_only=True)
            return True
        except Exception:
            return False

    if not readable(path):
        others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime)
        good = next((p for p in reversed(others) if readable(p)), None)
        hint = (
            f"The newest readable checkpoint there is {good}: resume with ckpt_path={good}"
            if good
            else ("No other readable checkpoint is there.")
        )
        raise UserError(f"Cannot resume: {path} is corrupt or truncated. {hint}")
    return str(path)
