"""Predict new images: ``python -m src.predict ckpt_path=... input=<image file or folder>``.

Writes predictions.csv (path, predicted class, probability, top-k, error) into its output folder and prints
a short table. Unreadable files get a row with their error; the others go on.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from src.data.datamodule import default_num_workers
from src.data.images import load_rgb
from src.data.preflight import not_a_regular_file
from src.inference.classifier import Classifier
from src.inference.tta import check_tta
from src.utils.cli import report_user_errors
from src.utils.errors import ConfigError, UserError
from src.utils.io import write_csv

log = logging.getLogger("src.predict")


def image_files(path: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(``path`` itself or every image file under it, sorted; (path, reason) of the other files under it). Folders
    are walked as training walks them: symlinked subfolders followed (a loop refused), files of types training
    does not read (GIF, text) listed with the reason, never dropped without a word."""
    from src.data.preflight import ignored_reason, symlink_loops

    if path.is_file():
        return [path], []
    if not path.is_dir():
        problem = not_a_regular_file(str(path)) if os.path.lexists(path) else None
        raise UserError(f"input {path}: {problem}." if problem else f"input {path} does not exist.")
    loops = symlink_loops(path)
    if loops:
        link, target = loops[0]
        raise UserError(f"input {path}: the folder link {link} leads back to {target} (a loop); remove it.")
    files, ignored = [], []
    for folder, subfolders, names in os.walk(path, followlinks=True):
        subfolders.sort()
        for name in names:
            reason = ignored_reason(name)
            if reason:
                ignored.append((Path(folder) / name, reason))
            else:
                files.append(Path(folder) / name)
    if not files:
        raise UserError(f"No image files ({', '.join(IMG_EXTENSIONS)}) under {path}.")
    return sorted(files), sorted(ignored)


class ImageFiles(Dataset):
    """Files decoded and preprocessed in DataLoader workers: (index, tensor, error); an unreadable file gives
    an empty tensor and its error, and the others go on. It holds the classifier's transform and decode size
    (``Classifier.tensor``'s two steps), not the classifier: a spawned worker would be sent the model too."""

    def __init__(self, files: list[Path], classifier: Classifier) -> None:
        self.files, self.transform, self.min_side = files, classifier.trained.transform, classifier.decode_min_side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        path = self.files[i]
        problem = not_a_regular_file(str(path))  # a FIFO would block the read forever
        if problem:
            return i, torch.empty(0), problem
        try:
            return i, self.transform(load_rgb(path, self.min_side)), ""
        except Exception as err:  # unreadable, truncated, not an image: report it and go on
            return i, torch.empty(0), f"{type(err).__name__}: {err}"


def collate_readable(items: list[tuple[int, torch.Tensor, str]]) -> tuple[list[int], torch.Tensor | None, list]:
    """(indices of the decoded images, their batch, (index, error) of the others)."""
    good = [(i, x) for i, x, err in items if not err]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, [(i, err) for i, _, err in items if err]


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@report_user_errors
def main(cfg: DictConfig) -> None:
    for key in ("top_k", "batch_size"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}.")
    check_tta(cfg.get("tta"))
    classifier = Classifier.from_checkpoint(cfg.ckpt_path, cfg.device, cfg.decode_min_side)
    files, ignored = image_files(Path(cfg.input))
    workers = default_num_workers() if cfg.get("num_workers") is None else int(cfg.num_workers)
    loader = DataLoader(
        ImageFiles(files, classifier), batch_size=int(cfg.batch_size), num_workers=workers, collate_fn=collate_readable
    )
    rows: list[dict[str, str]] = [{"path": str(p), "error": reason} for p, reason in ignored]
    start = time.perf_counter()
    for indices, batch, errors in loader:
        rows += [{"path": str(files[i]), "error": err} for i, err in errors]
        if batch is None:
            continue
        for i, result in zip(
            indices, classifier.results(classifier.probabilities(batch, cfg.get("tta")), cfg.top_k), strict=True
        ):
            rows.append(
                {
                    "path": str(files[i]),
                    "predicted": result["class"],
                    "probability": f"{result['probability']:.6f}",
                    "top_k": "; ".join(f"{r['class']}:{r['probability']:.6f}" for r in result["top_k"]),
                    "error": "",
                }
            )
    seconds = time.perf_counter() - start
    log.info(
        "%d images in %.2f s (%.1f images/s, %d decoding workers)",
        len(files),
        seconds,
        len(files) / max(seconds, 1e-9),
        workers,
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
