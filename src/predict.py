"""Predict new images: ``python -m src.predict ckpt_path=... input=<image file or folder>``.

Writes predictions.csv (path, predicted class, probability, top-k, error) into its output folder and prints
a short table. Unreadable files get a row with their error; the others go on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.datasets.folder import IMG_EXTENSIONS

from src.data.images import load_rgb
from src.data.preflight import not_a_regular_file
from src.inference.checkpoint import load_trained
from src.inference.tta import check_tta, predict_log_probs
from src.utils.cli import pick_device, report_user_errors
from src.utils.errors import ConfigError, UserError
from src.utils.io import write_csv

log = logging.getLogger("src.predict")


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or every file under it with an image extension, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        problem = not_a_regular_file(str(path)) if os.path.lexists(path) else None
        raise UserError(f"input {path}: {problem}." if problem else f"input {path} does not exist.")
    files = sorted(p for p in path.rglob("*") if p.name.lower().endswith(IMG_EXTENSIONS) and not p.is_dir())
    if not files:
        raise UserError(f"No image files ({', '.join(IMG_EXTENSIONS)}) under {path}.")
    return files


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@report_user_errors
def main(cfg: DictConfig) -> None:
    for key in ("top_k", "batch_size"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}.")
    check_tta(cfg.get("tta"))
    device = pick_device(cfg.device)
    trained = load_trained(cfg.ckpt_path, device)
    model, classes, transform = trained.model, trained.classes, trained.transform
    k = min(int(cfg.top_k), len(classes))
    rows: list[dict[str, str]] = []
    files = image_files(Path(cfg.input))
    for start in range(0, len(files), int(cfg.batch_size)):
        batch, paths = [], []
        for path in files[start : start + int(cfg.batch_size)]:
            problem = not_a_regular_file(str(path))  # a FIFO would block the read forever
            if problem:
                rows.append({"path": str(path), "error": problem})
                continue
            try:
                batch.append(transform(load_rgb(path, cfg.decode_min_side)))
                paths.append(path)
            except Exception as err:  # unreadable, truncated, not an image: report it and go on
                rows.append({"path": str(path), "error": f"{type(err).__name__}: {err}"})
        if not batch:
            continue
        with torch.inference_mode():
            # LogSoftmax out: exp sums to 1
            probs = predict_log_probs(model, torch.stack(batch).to(device), cfg.get("tta")).exp().cpu()
        top_p, top_i = probs.topk(k, dim=1)
        for path, p, i in zip(paths, top_p, top_i, strict=True):
            rows.append(
                {
                    "path": str(path),
                    "predicted": classes[int(i[0])],
                    "probability": f"{float(p[0]):.6f}",
                    "top_k": "; ".join(f"{classes[int(c)]}:{float(q):.6f}" for q, c in zip(p, i, strict=True)),
                    "error": "",
                }
            )
    rows.sort(key=lambda r: r["path"])
    out = Path(cfg.paths.output_dir) / "predictions.csv"
    columns = ["path", "predicted", "probability", "top_k", "error"]
    write_csv(out, columns, ([r.get(c, "") for c in columns] for r in rows))
    errors = sum(1 for r in rows if r.get("error"))
    table = [f"{'file':40} {'predicted':16} {'prob':>7}"]
    for r in rows[: int(cfg.print_rows)]:
        name = Path(r["path"]).name[:40]
        table.append(
            f"{name:40} {'ERROR: ' + r['error'][:60]}"
            if r.get("error")
            else f"{name:40} {r['predicted'][:16]:16} {float(r['probability']):7.3f}"
        )
    log.info("Predictions (%d images, %d unreadable) -> %s\n%s", len(rows), errors, out, "\n".join(table))


if __name__ == "__main__":
    main()
