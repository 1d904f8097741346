"""Audit a dataset before (or without) training: ``python -m src.audit data.root=... [data.labels=...]``.

Lists the images (any layout), decodes each once (the preflight: unusable files, SHA-256, perceptual
hash), embeds each once with the frozen backbone (the training feature cache: shared both ways), then
writes into its run folder:

- label_issues.csv: every image, most likely mislabelled first (out-of-fold heads + cleanlab), and
  label_issues.png, the top suspects drawn with "given -> suggested";
- duplicates.csv: exact and near copies, within and across splits;
- class_counts.csv, skipped_files.csv, split.csv and audit.json (the figures).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.callbacks.feature_cache import cached_features, embed_batches, feature_identity, feature_spec
from src.data.audit import check_audit_config, rank_label_issues, suspects_grid
from src.data.datamodule import format_counts
from src.data.duplicates import COLUMNS as DUPLICATE_COLUMNS
from src.data.duplicates import feature_pairs, find_duplicates
from src.data.embedding_store import EmbeddingStore
from src.data.listing import ImageList, relative
from src.data.shards import refuse_shards
from src.models.classifier import check_model_config
from src.train import instantiate_datamodule
from src.utils.cli import report_user_errors
from src.utils.config import module_config
from src.utils.errors import ConfigError
from src.utils.io import write_csv, write_json

log = logging.getLogger("src.audit")


def audit(cfg: DictConfig) -> dict[str, Any]:
    """Run the audit; return its figures (also in audit.json)."""
    out = Path(cfg.paths.output_dir)
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    check_model_config(settings["backbone"], settings["head"], settings["optimizer"], settings.get("scheduler"))
    a = cfg.audit
    check_audit_config(a.folds, a.C, a.max_iter, a.near_cosine, a.grid_size)
    unknown = sorted(set(a) - {"folds", "C", "max_iter", "near_cosine", "grid_size"})
    if unknown:
        raise ConfigError(f"audit takes folds, C, max_iter, near_cosine and grid_size; not {', '.join(unknown)}.")
    refuse_shards(cfg.data, "src.audit")
    seed = 0 if cfg.get("seed") is None else int(cfg.seed)
    start = time.perf_counter()
    dm = instantiate_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    scan_s = time.perf_counter() - start
    items = [(split, path, label) for split, ds in dm.datasets.items() for path, label in ds.samples]
    everything = ImageList(str(dm.root), [(p, c) for _, p, c in items], dm.classes, dm.eval_transform, dm.loader)

    # every image once, eval transform: the same cache rows as training's validation features
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False)
    model_cfg = module_config(cfg.model)
    model = instantiate(model_cfg, class_names=dm.classes, _convert_="all")
    model = model.to(trainer.strategy.root_device).eval()
    identity = feature_identity(model, str(trainer.precision))
    store = EmbeddingStore(cfg.model.cache.dir, feature_spec(identity, everything, None, 0))
    feats, labels, embedded, embed_s = cached_features(
        store,
        everything,
        dm.digests,
        lambda subset: dm.image_loader("val", cfg.model.cache.embed_batch_size, dataset=subset),
        lambda loader: embed_batches(model, loader, trainer.precision_plugin.forward_context),
    )
    feats = feats.tensor()
    log.info("Features of %d images: %d embedded in %.1f s, the rest from the cache", len(labels), embedded, embed_s)

    rank_start = time.perf_counter()
    ranking = rank_label_issues(feats, labels, a.folds, seed, float(a.C), a.max_iter)
    order = ranking.quality.argsort(kind="stable")
    rows = [
        (
            relative(dm.root, items[i][1]),
            items[i][0],
            dm.classes[items[i][2]],
            dm.classes[ranking.suggested[i]],
            round(1.0 - float(ranking.quality[i]), 6),
            bool(ranking.flagged[i]),
        )
        for i in order
    ]
    write_csv(out / "label_issues.csv", ["path", "split", "given_label", "suggested_label", "score", "flagged"], rows)
    top = [int(i) for i in order[: int(a.grid_size)]]
    suspects_grid(
        [items[i][1] for i in top],
        [dm.classes[items[i][2]] for i in top],
        [dm.classes[ranking.suggested[i]] for i in top],
        out / "label_issues.png",
    )
    rank_s = time.perf_counter() - rank_start

    files = {s: [p for p, _ in ds.samples] for s, ds in dm.datasets.items()}
    pairs = find_duplicates(files, dm.digests, dm.signatures, dm.near_rule, within=True)
    if a.near_cosine is not None:
        found = {(q.path_a, q.path_b) for q in pairs}
        pairs += feature_pairs([(s, p) for s, p, _ in items], feats, float(a.near_cosine), True, found)
    write_csv(out / "duplicates.csv", DUPLICATE_COLUMNS, [q.row() for q in pairs])
    write_csv(out / "skipped_files.csv", ["split", "path", "reason"], dm.skipped)
    write_csv(out / "split.csv", ["path", "label", "split"], dm.split_rows())
    counts = dm.class_counts
    write_csv(
        out / "class_counts.csv",
        ["class", *counts, "total"],
        [(c, *(counts[s][c] for s in counts), sum(counts[s][c] for s in counts)) for c in dm.classes],
    )
    summary = {
        "images": len(labels),
        "classes": dm.classes,
        "class_counts": counts,
        "skipped_files": len(dm.skipped),
        "label_issues_flagged": int(ranking.flagged.sum()),
        "out_of_fold_accuracy": round(ranking.oof_accuracy, 4),
        "folds": ranking.folds,
        "duplicates": {kind: sum(q.kind == kind for q in pairs) for kind in ("exact", "near")},
        "embedded_images": embedded,
        "scan_s": round(scan_s, 3),
        "embed_s": round(embed_s, 3),
        "rank_s": round(rank_s, 3),
        "wall_s": round(time.perf_counter() - start, 3),
    }
    write_json(out / "audit.json", summary)
    log.info(
        "Audit of %d images (%d classes):\n%s\n%d flagged as likely mislabelled (out-of-fold accuracy %.3f); "
        "%d exact and %d near duplicate pairs; %d files skipped. Outputs in %s",
        len(labels),
        len(dm.classes),
        format_counts(counts),
        summary["label_issues_flagged"],
        ranking.oof_accuracy,
        summary["duplicates"]["exact"],
        summary["duplicates"]["near"],
        len(dm.skipped),
        out,
    )
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="audit")
@report_user_errors
def main(cfg: DictConfig) -> None:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed)
    audit(cfg)


if __name__ == "__main__":
    main()
