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
from omegaconf import DictConfig, OmegaConf

from src.utils.config import RUN_RECORD, write_run_record
from src.utils.io import write_csv, write_json
from src.utils.lightning_compat import job_exception

SUMMARY = "summary.json"
SWEEP_SUMMARY = "sweep_summary.csv"
FAILURE = "job_failure.json"
log = logging.getLogger(__name__)
COLUMNS = [
    "job",
    "status",
    "best_val_loss",
    "best_val_acc",
    "best_val_macro_f1",
    "epochs",
    "wall_s",
    "overrides",
    "reason",
]
KFOLD_SUMMARY = "kfold_summary.json"
FOLD_METRICS = ("best_val_acc", "best_val_macro_f1", "best_val_balanced_acc", "best_val_loss")


class SweepSummary(Callback):
    """Rewrites sweep_summary.csv after every job, so it is current even if the sweep is cut short."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if not (job_dir / RUN_RECORD / "overrides.yaml").is_file():  # a job refused before it wrote its record
            write_run_record(job_dir, {"overrides.yaml": OmegaConf.to_yaml(config.hydra.overrides.task)})
        if job_return.status == JobStatus.FAILED:
            err = job_exception(job_return)
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
        keys = ("status", "best_val_loss", "best_val_acc", "best_val_macro_f1", "best_val_balanced_acc", "epochs")
        row.update({k: summary.get(k) for k in (*keys, "wall_s")})
        row["fold"] = (summary.get("split") or {}).get("fold")
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
    write_kfold_summary(sweep_dir, rows)
    return rows


def write_kfold_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """k-fold sweeps: mean ± std of the best-epoch metrics over the folds of each setting (the jobs whose
    overrides differ only in data.split.fold), in kfold_summary.json and the log."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("fold") is not None:
            setting = " ".join(o for o in row["overrides"].split() if not o.startswith("data.split.fold="))
            groups.setdefault(setting, []).append(row)
    if not groups:
        return
    out = []
    for setting, members in groups.items():
        entry: dict[str, Any] = {"overrides": setting, "folds": sorted(r["fold"] for r in members)}
        for metric in FOLD_METRICS:
            values = [float(r[metric]) for r in members if isinstance(r.get(metric), int | float)]
            if values:
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                entry[metric] = {"mean": round(mean, 6), "std": round(std, 6)}
        out.append(entry)
        parts = [f"{m} {entry[m]['mean']:.4f} ± {entry[m]['std']:.4f}" for m in FOLD_METRICS[:2] if m in entry]
        log.info("%d folds%s: %s", len(members), f" ({setting})" if setting else "", ", ".join(parts))
    write_json(sweep_dir / KFOLD_SUMMARY, out)
