"""Evaluate a checkpoint: ``python -m src.eval ckpt_path=... [data.root=...] [split=test|val]``.

On the data it was trained on, the images its run held out (recorded in the checkpoint: any layout, any
split it made); on another data.root, that root's test/ or val/ folder.

Writes metrics.json, confusion_matrix.csv/.png, misclassified.csv/.png and TensorBoard figures into its
output folder (logs/eval/runs/<date_time>/ unless hydra.run.dir says otherwise). Files training would skip
(unreadable, truncated, not regular files) are skipped the same way and listed in skipped_files.csv.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from src.data.datamodule import default_num_workers
from src.data.images import RGBLoader
from src.data.listing import ImageList, folder_samples
from src.data.preflight import Scan, drop_samples, ignored_files, scan
from src.inference.classifier import Classifier
from src.inference.evaluate import evaluate_split, write_reports
from src.inference.model_card import write_model_card
from src.inference.tta import check_tta
from src.utils.cli import report_user_errors
from src.utils.errors import DatasetError
from src.utils.io import write_csv

log = logging.getLogger("src.eval")


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@report_user_errors
def main(cfg: DictConfig) -> float:
    check_tta(cfg.get("tta"))
    classifier = Classifier.from_checkpoint(cfg.ckpt_path, cfg.device, cfg.data.decode_min_side)
    device, trained = classifier.device, classifier.trained
    hparams, classes = trained.hparams, trained.classes
    trained_root = hparams.get("data_root")
    root = Path(cfg.data.root or trained_root or "").expanduser()
    if not str(root) or not root.is_dir():
        raise DatasetError(f"Dataset root {root} not found: pass data.root=/path/to/dataset.")
    loader = RGBLoader(cfg.data.decode_min_side)
    held = trained.held_out or {}
    split = cfg.split or ("test" if "test" in held else "val")
    same_data = trained_root is not None and root.resolve() == Path(trained_root).resolve()
    # another root is evaluated by its own val/ or test/ folder when it has one (as always); without one, it
    # may be the run's data moved elsewhere: the held-out images, found by path and checked by hash below
    folder_split = cfg.split or ("test" if (root / "test").is_dir() else "val")
    own_folder = (root / folder_split).is_dir()
    moved = bool(held.get(split)) and all((root / row.path).is_file() for row in held[split])
    expected: dict[str, str] = {}  # path -> SHA-256 the run saw
    if held and (same_data or (moved and not own_folder)):
        # the run's own held-out images, as its checkpoint recorded them: exact whatever the layout
        if not held.get(split):
            raise DatasetError(f"The checkpoint's run held out no {split} images (it has: {sorted(held)}).")
        index = {c: i for i, c in enumerate(classes)}
        samples = [(str(root / row.path), index[row.label]) for row in held[split]]
        expected = {str(root / row.path): row.sha256 for row in held[split] if row.sha256}
        dataset = ImageList(str(root), samples, classes, trained.transform, loader)
        ignored: list[tuple[str, str]] = []
        log.info("Evaluating the %d %s images the checkpoint's run held out of %s", len(samples), split, root)
    else:
        split = folder_split  # another dataset's own folders
        folder = root / split
        if not folder.is_dir():
            raise DatasetError(
                f"{folder} does not exist: {root} holds neither the images this checkpoint's run held out nor a "
                f"{split}/ folder of class folders. Choose split=val or split=test, or point data.root at them."
            )
        found, samples = folder_samples(folder)
        if found != classes:
            raise DatasetError(f"{folder} has classes {found}; the checkpoint was trained on {classes}.")
        dataset = ImageList(str(folder), samples, classes, trained.transform, loader)
        ignored = ignored_files(folder)
    workers = default_num_workers() if cfg.data.num_workers is None else int(cfg.data.num_workers)
    out_dir = Path(cfg.paths.output_dir)
    result = skip_unusable(
        dataset, split, max(1, workers), cfg.data.preflight_cache_dir, out_dir, ignored, cfg.data.max_bad_fraction
    )
    changed = [p for p, sha in expected.items() if result.digests.get(p, sha) != sha]
    if changed:
        listing = "\n".join(f"  {p}" for p in changed[:20])
        raise DatasetError(
            f"{len(changed)} of the held-out images differ from the files the checkpoint's run held out (other "
            f"content under the same name): its scores would not be that run's.\n{listing}"
        )
    model = trained.model
    tta = cfg.get("tta")
    metrics, log_probs, labels = evaluate_split(model, dataset, classes, cfg.data.batch_size, workers, device, tta)
    metrics.update(checkpoint=str(cfg.ckpt_path), data_root=str(root), split=split, tta=tta)
    pre = hparams["preprocessing"]
    write_reports(out_dir, metrics, log_probs, labels, dataset, classes, pre["mean"], pre["std"], cfg.grid_size)
    # the card refreshed with this evaluation's scores, per class included
    write_model_card(
        out_dir,
        hparams,
        None,
        {"evaluated with": f"src.eval split={split} tta={tta}"},
        {f"{split} ({root})": metrics},
        str(cfg.ckpt_path),
    )
    return metrics["accuracy"]


def skip_unusable(
    dataset: ImageList,
    split: str,
    workers: int,
    cache_dir: str | None,
    out_dir: Path,
    ignored: list[tuple[str, str]],
    max_bad_fraction: float,
) -> Scan:
    """Leave out the files training would skip (the same preflight), listed in skipped_files.csv with the
    ``ignored`` (path, reason) ones; stop when more than ``max_bad_fraction`` of them are unusable."""
    paths = [p for p, _ in dataset.samples]
    result = scan(paths, workers, cache_dir)
    bad = result.bad
    rows = [(split, p, why) for p, why in ignored] + [(split, p, bad[p]) for p in paths if p in bad]
    write_csv(out_dir / "skipped_files.csv", ["split", "path", "reason"], rows)
    if not bad:
        return result
    listing = "\n".join(f"  {p}: {r}" for p, r in list(bad.items())[:20])
    if len(bad) > max_bad_fraction * len(paths):
        raise DatasetError(
            f"{len(bad)} of {len(paths)} {split} images are unusable, above data.max_bad_fraction="
            f"{max_bad_fraction:.0%}: scores on the rest would not be the split's (listed in skipped_files.csv):\n"
            f"{listing}"
        )
    drop_samples(dataset, bad)
    log.warning("Skipping %d unusable image files (listed in skipped_files.csv):\n%s", len(bad), listing)
    return result


if __name__ == "__main__":
    main()
