"""Show and save the resolved run configuration."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.utils.errors import ConfigError
from src.utils.io import atomic_write

log = logging.getLogger(__name__)


def config_tree(cfg: DictConfig) -> str:
    """The resolved config as a tree: one branch per top-level group, its YAML indented below it."""
    lines = ["CONFIG"]
    keys = list(cfg.keys())
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        value = cfg[key]
        if isinstance(value, DictConfig):
            lines.append(f"{'└' if last else '├'}── {key}")
            body = OmegaConf.to_yaml(value, resolve=True).rstrip("\n").splitlines()
            lines += [f"{' ' if last else '│'}     {line}" for line in body]
        else:
            lines.append(f"{'└' if last else '├'}── {key}: {value}")
    return "\n".join(lines)


def save_config(cfg: DictConfig, output_dir: Path) -> str:
    """Write config_tree.txt and the resolved config.yaml into ``output_dir``; return the tree."""
    tree = config_tree(cfg)
    atomic_write(output_dir / "config_tree.txt", lambda f: f.write(tree + "\n"))
    atomic_write(output_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True)))
    return tree


RUN_RECORD = ".hydra"  # where Hydra keeps a run's composed config, its own settings and the command line's overrides


def run_record(cfg: DictConfig) -> dict[str, str]:
    """What Hydra writes into ``.hydra/`` (the task's config as composed, hydra.yaml, overrides.yaml), as texts.
    Taken at the start of a task, before it fills anything in; {} outside a Hydra run.

    Tasks that may be refused in a run folder that already holds a run (src.train's resume) set
    ``hydra.output_subdir: null`` and write this themselves once their checks passed: Hydra would rewrite it
    before the task starts, so a refused resume would leave another command's record beside the old run."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.instance().cfg
    if hydra is None or "hydra" not in hydra:
        return {}
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(hydra),
        "overrides.yaml": OmegaConf.to_yaml(hydra.hydra.overrides.task),
    }


def write_run_record(output_dir: Path, record: dict[str, str]) -> None:
    """``run_record``'s texts into ``output_dir/.hydra/``, each file atomically."""
    for name, text in record.items():
        atomic_write(output_dir / RUN_RECORD / name, lambda f, text=text: f.write(text))


def check_trainer_settings(trainer: DictConfig) -> None:
    """Raise ConfigError, before any data work, on trainer values that would run nothing or fail late."""
    epochs = trainer.get("max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be a whole number of at least 1, got {epochs!r}.")
    import torch

    on_cpu = str(trainer.get("accelerator")) == "cpu" or (
        str(trainer.get("accelerator")) == "auto" and not torch.cuda.is_available()
    )
    if on_cpu and str(trainer.get("precision")) in ("16", "16-mixed", "16-true"):
        raise ConfigError(
            f"trainer.precision={trainer.precision} on a CPU: float16 has no fast path there (a lite0_fe run took "
            "138 s against 4-8 s). Use bf16-mixed (fast on CPUs with AVX512-BF16 or AMX) or 32, or leave the default, "
            "which picks the faster one for this machine."
        )
    devices = trainer.get("devices")
    if on_cpu and isinstance(devices, int) and not isinstance(devices, bool) and devices > (os.cpu_count() or 1):
        log.warning(
            "trainer.devices=%d on a CPU with %d cores: %d processes will share them, each slower than one alone "
            "(DDP on a CPU is for testing the multi-process path; one process uses every core).",
            devices,
            os.cpu_count() or 1,
            devices,
        )


# keys of cfg.model that configure callbacks (conf/callbacks/default.yaml builds them), not the LightningModule
MODEL_CALLBACKS = ("finetune", "cache")


def module_config(model: DictConfig) -> DictConfig:
    """cfg.model without the keys that configure callbacks: what instantiates the LightningModule."""
    return OmegaConf.masked_copy(model, [k for k in model if k not in MODEL_CALLBACKS])


def instantiate_each(group: DictConfig | None) -> list[Any]:
    """One object per entry of a config group (callbacks, loggers); null entries are switched off."""
    from hydra.utils import instantiate

    return [instantiate(c, _convert_="all") for c in (group or {}).values() if c is not None]
