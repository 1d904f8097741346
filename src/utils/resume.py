"""Which checkpoint a run resumes from, and whether it may: checked before training starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from src.utils.checkpoint_io import CorruptCheckpointError, newest_readable_checkpoint, verify_checkpoint_file
from src.utils.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Resume:
    """A checked checkpoint to resume from, with the hyperparameters it was trained with."""

    path: str
    hparams: dict[str, Any] = field(default_factory=dict)


def remove_interrupted_writes(checkpoint_dir: Path) -> None:
    """Remove temp files of checkpoint writes a kill cut short (the old file beside each is whole)."""
    for orphan in checkpoint_dir.glob(".*.ckpt.*.tmp"):
        log.info("Removing %s, a checkpoint write that was interrupted", orphan)
        orphan.unlink(missing_ok=True)


def resume_checkpoint(ckpt_path: str | None, checkpoint_dir: Path) -> Resume | None:
    """The checkpoint to resume from, checked before training: never a silent start from scratch.

    ``last`` means this run folder's checkpoints/last.ckpt (or, when a kill came before it was written, the
    newest whole checkpoint there, said in the log); ``auto`` the same when there is one, else a fresh
    start, said in the log (for jobs a cluster requeues with the same command). A missing or corrupt file
    is a UserError naming it and the newest whole checkpoint beside it. Nothing in the folder is changed: a
    refused resume leaves the run as it was.
    """
    if ckpt_path is None:
        return None
    path = checkpoint_dir / "last.ckpt" if str(ckpt_path) in ("last", "auto") else Path(ckpt_path)
    if str(ckpt_path) == "auto" and not any(path.parent.glob("*.ckpt")):
        log.info("ckpt_path=auto: no checkpoint in %s yet, starting from scratch", path.parent)
        return None

    def refuse(problem: str) -> UserError:
        good = newest_readable_checkpoint(path.parent, exclude=path) if path.parent.is_dir() else None
        hint = f"The newest whole checkpoint there is {good}: resume with ckpt_path={good}" if good else ""
        if not good:
            hint = "Resume a run in its own folder: hydra.run.dir=logs/train/runs/<run> ckpt_path=last."
        return UserError(f"Cannot resume: {problem} {hint}")

    if str(ckpt_path) in ("last", "auto") and not path.exists():
        # a kill between Lightning's two saves of an epoch's end (epoch_NNN.ckpt, then last.ckpt) leaves the
        # same state under the other name: that is where this run stopped
        newest = newest_readable_checkpoint(path.parent) if path.parent.is_dir() else None
        if newest is not None:
            log.warning(
                "%s was never written (the run stopped before it); resuming from %s, its newest whole checkpoint",
                path.name,
                newest,
            )
            path = newest
    if not path.is_file():
        raise refuse(f"{path} does not exist.")
    try:
        verify_checkpoint_file(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except CorruptCheckpointError as err:
        raise refuse(f"{err}") from None
    except Exception as err:
        raise refuse(f"{path} is corrupt or not a plain checkpoint ({type(err).__name__}).") from None
    return Resume(str(path), dict(ckpt.get("hyper_parameters") or {}))


def check_same_data(resume: Resume, classes: list[str], fingerprint: str | None, allow_new_data: bool) -> None:
    """Refuse to continue a run on another dataset: other classes always, other files unless allowed.

    Lightning would load the head happily when the class count matches, train on relabelled images and
    keep the old class names in the checkpoint.
    """
    saved = list(resume.hparams.get("class_names") or [])
    if saved and saved != list(classes):
        raise UserError(
            f"Cannot resume {resume.path}: it was trained on the classes {saved}, but this dataset has "
            f"{list(classes)}. Resume with the dataset it was trained on (data.root=...), or start a new run."
        )
    before = resume.hparams.get("data_fingerprint")
    if before and fingerprint and before != fingerprint:
        if allow_new_data:
            log.warning("Resuming %s on data other than it was trained on (allow_new_data=true)", resume.path)
            return
        raise UserError(
            f"Cannot resume {resume.path}: the images under data.root, or their split into train/val/test (data.split, "
            f"a k-fold's data.split.fold), are not the ones it was trained on (same classes, other files, contents or "
            f"split: data fingerprint {fingerprint[:12]}… vs {before[:12]}…). Point data.root and data.split at what "
            "it was trained on, or continue on the new data on purpose with allow_new_data=true."
        )


# what a resume may change without notice: how long it trains, where things are, how it runs and is logged
RESUME_MAY_CHANGE = ("ckpt_path", "allow_new_data", "paths.", "trainer.max_epochs", "data.num_workers", "logger.")


def changed_settings(resume: Resume, cfg: Any) -> dict[str, list[Any]]:
    """The settings this resume changes against the run that wrote the checkpoint (its run folder's config.yaml),
    ``{key: [before, now]}``; each is said in the log. A resume may change how the run goes on (augmentation,
    label smoothing, learning rate): that is allowed, but never silent, and summary.json records it."""
    from omegaconf import OmegaConf

    saved = Path(resume.path).parent.parent / "config.yaml"
    if not saved.is_file():
        return {}
    try:
        before = flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    except Exception:  # noqa: BLE001 - a hand-edited or damaged record: nothing to compare against
        log.warning("Could not read %s to compare this resume's settings with the run's", saved)
        return {}
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = {
        key: [before.get(key), now.get(key)]
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key) and not key.startswith(RESUME_MAY_CHANGE)
    }
    if changed:
        log.warning(
            "Resuming %s with settings other than its run's (the checkpoint goes on under the new ones; "
            "summary.json records them as resumed.changed_settings):\n%s",
            resume.path,
            "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changed.items()),
        )
    return changed


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": value}``; lists are values."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out
