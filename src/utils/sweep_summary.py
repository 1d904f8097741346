"""Hydra callback: one sweep_summary.csv at a multirun's root, one row per job, best first."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from src.utils.io import write_csv, write_json

SUMMARY = "summary.json"
SWEEP_SUMMARY = "sweep_summary.csv"
FAILURE = "job_failure.json"
log = logging.getLogger(__name__)
COLUMNS = ["job", "status", "best_val_loss", "best_val_acc", "epochs", "wall_s", "overrides", "reason"]


class SweepSummary(Callback):
    """Rewrites sweep_summary.csv after every job, so it is current even if the sweep is cut short."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            err = job_return._return_value  # the exception; .return_value would re-raise it
            write_json(job_dir / FAILURE, {"status": "failed", "reason": f"{type(err).__name__}: {err}"})
        write_sweep_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        out = Path(config.hydra.sweep.dir) / SWEEP_SUMMARY
        rows = write_sweep_summary(Path(config.hydra.sweep.dir))
        failed = [r for r in rows if r.get("status") != "ok"]
        if failed:  # sweepers that carry on past failures (Optuna with max_failure_rate) still end non-zero
            log.error("%d of %d sweep jobs failed; their reasons are in %s", len(failed), len(rows), out)
            sys.exit(1)


def job_row(job_dir: Path) -> dict[str, Any]:
    """The summary row of one job folder (one with a .hydra/overrides.yaml)."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides)}
    if (job_dir / SUMMARY).is_file():
        summary = json.loads((job_dir / SUMMARY).read_text())
        row.update({k: summary.get(k) for k in ("status", "best_val_loss", "best_val_acc", "epochs", "wall_s")})
    elif (job_dir / FAILURE).is_file():
        row.update(json.loads((job_dir / FAILURE).read_text()))
    else:
        row.update(status="incomplete", reason="no summary.json (still running, or killed)")
    return row


def write_sweep_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Collect every job's row under ``sweep_dir`` into sweep_summary.csv, ok jobs by best_val_loss first;
    return the rows."""
    rows = [job_row(p.parent.parent) for p in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"))]

    def key(row: dict[str, Any]) -> tuple[int, float]:
        loss = row.get("best_val_loss")
        ok = row.get("status") == "ok" and isinstance(loss, int | float) and math.isfinite(loss)
        return (0, loss) if ok else (1, math.inf)

    rows.sort(key=key)
    write_csv(sweep_dir / SWEEP_SUMMARY, COLUMNS, ([row.get(c) for c in COLUMNS] for row in rows))
    return rows
