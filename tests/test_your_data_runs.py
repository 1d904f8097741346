"""End to end on unsplit data: training writes split.csv and records its held-out images, eval uses them,
the audit finds planted label errors and copies, and k-fold folds reuse one backbone pass."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_cfg, make_imagefolder, run_cli

pytestmark = pytest.mark.slow


def flat_data(root: Path, per_class: int = 10, classes=("ants", "bees", "wasps")) -> Path:
    """One folder of class folders (distinct colours plus noise)."""
    made = make_imagefolder(
        root.parent / f"{root.name}_made", classes=classes, per_split={"all": per_class}, size=(96, 72)
    )
    shutil.move(str(made / "all"), root)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    """lite0_fe, 2 epochs on a flat 3-class folder, imbalance options on, best checkpoint by macro-F1."""
    from src.train import train

    base = tmp_path_factory.mktemp("flat")
    data = flat_data(base / "data")
    out = base / "run"
    summary = train(
        compose_cfg(
            "train",
            out,
            "experiment=lite0_fe",
            f"data.root={data}",
            "trainer.max_epochs=2",
            "data.batch_size=4",
            "model.loss.class_weights=auto",
            "data.sampler=balanced",
            "callbacks.model_checkpoint.monitor=val/macro_f1",
            "callbacks.model_checkpoint.mode=max",
        )
    )
    return data, out, summary


def test_a_flat_folder_trains_with_split_csv_and_imbalance_scores(flat_run):
    data, out, summary = flat_run
    rows = read_csv(out / "split.csv")
    assert len(rows) == 30 and {r["split"] for r in rows} == {"train", "val"}
    assert sum(r["split"] == "val" for r in rows) == 6  # 20 % of 10 per class
    assert {r["path"].split("/")[0] for r in rows} == {"ants", "bees", "wasps"}
    best = max(summary["history"], key=lambda h: h["val/macro_f1"])  # the monitor picks the epoch
    assert summary["monitor"] == "val/macro_f1" and summary["best_epoch"] == best["epoch"]
    assert summary["best_val_macro_f1"] == best["val/macro_f1"]
    assert summary["best_val_balanced_acc"] == best["val/balanced_acc"]
    assert summary["split"]["layout"] == "flat"
    ckpt = torch.load(summary["best_checkpoint"], weights_only=True)
    assert ckpt["hyper_parameters"]["loss"]["class_weights"] == [1.0, 1.0, 1.0]  # balanced classes: all 1


def test_the_checkpoint_records_the_held_out_images_and_eval_uses_them(flat_run, tmp_path):
    from src.eval import main as eval_main
    from src.inference.checkpoint import load_trained

    data, out, summary = flat_run
    held = load_trained(summary["best_checkpoint"]).held_out
    val_rows = sorted((r["path"], r["label"]) for r in read_csv(out / "split.csv") if r["split"] == "val")
    assert sorted((h.path, h.label) for h in held["val"]) == val_rows and "test" not in held
    assert all(len(h.sha256) == 64 for h in held["val"])
    eval_out = tmp_path / "eval"
    accuracy = eval_main(compose_cfg("eval", eval_out, f"ckpt_path={summary['best_checkpoint']}"))
    metrics = json.loads((eval_out / "metrics.json").read_text())
    assert metrics["samples"] == 6 and metrics["split"] == "val" and metrics["accuracy"] == accuracy


def test_eval_finds_the_held_out_images_moved_and_refuses_changed_ones(flat_run, tmp_path):
    from src.eval import main as eval_main
    from src.utils.errors import DatasetError

    data, out, summary = flat_run
    copy = tmp_path / "moved"
    shutil.copytree(data, copy)
    ckpt = f"ckpt_path={summary['best_checkpoint']}"
    eval_main(compose_cfg("eval", tmp_path / "e1", ckpt, f"data.root={copy}"))
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["samples"] == 6
    val = next(r["path"] for r in read_csv(out / "split.csv") if r["split"] == "val")
    shutil.copy(next(p for p in sorted(copy.rglob("*.png")) if p.relative_to(copy).as_posix() != val), copy / val)
    with pytest.raises(DatasetError, match=r"1 of the held-out images differ"):
        eval_main.__wrapped__.__wrapped__(compose_cfg("eval", tmp_path / "e2", ckpt, f"data.root={copy}"))  # raw


def test_monitor_settings_are_checked_before_any_data_work(tmp_path):
    from src.train import train
    from src.utils.errors import ConfigError

    base = ["experiment=lite0_fe", f"data.root={tmp_path / 'nowhere'}"]
    with pytest.raises(ConfigError, match="monitor=val/macro_f1 is higher is better: set .*mode=max"):
        train(compose_cfg("train", tmp_path / "r1", *base, "callbacks.model_checkpoint.monitor=val/macro_f1"))
    with pytest.raises(ConfigError, match="'val/macro-f1' is not a metric the model logs"):
        train(compose_cfg("train", tmp_path / "r2", *base, "callbacks.model_checkpoint.monitor=val/macro-f1"))


def test_a_label_file_gives_the_same_kind_of_run(tmp_path):
    from src.inference.checkpoint import load_trained
    from src.train import train

    data = flat_data(tmp_path / "images", per_class=6, classes=("cats", "dogs"))
    with open(data / "labels.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "label", "split"])
        for i, f in enumerate(sorted(data.rglob("*.png"))):
            out.writerow(
                [
                    f.relative_to(data).as_posix(),
                    f.parent.name,
                    ("val", "test", "train", "train", "train", "train")[i % 6],
                ]
            )
    run = tmp_path / "run"
    summary = train(
        compose_cfg(
            "train", run, "experiment=lite0_fe", f"data.root={data}", "data.labels=labels.csv", "trainer.max_epochs=1"
        )
    )
    assert summary["split"]["layout"] == "csv" and summary["images"]["test"] == {"cats": 1, "dogs": 1}
    assert summary["test"]["samples"] == 2  # the given test rows, evaluated with the best checkpoint
    assert len(read_csv(run / "split.csv")) == 12
    assert sorted(load_trained(summary["best_checkpoint"]).held_out) == ["test", "val"]


def test_the_audit_ranks_planted_label_errors_first_and_lists_copies(tmp_path):
    from src.audit import audit

    data = flat_data(tmp_path / "data", per_class=12)
    planted = []
    for i, f in enumerate(sorted((data / "ants").iterdir())[:2]):  # ants filed as bees: wrong labels
        shutil.copy(f, data / "bees" / f"planted_{i}.png")
        planted.append(f"bees/planted_{i}.png")
    (data / "ants" / "notes.txt").write_text("not an image")
    overrides = [f"data.root={data}", "audit.folds=3"]
    summary = audit(compose_cfg("audit", tmp_path / "audit", *overrides))
    issues = read_csv(tmp_path / "audit" / "label_issues.csv")
    assert len(issues) == 38 and {r["path"] for r in issues[:2]} == set(planted)
    assert all(r["given_label"] == "bees" and r["suggested_label"] == "ants" for r in issues[:2])
    dups = read_csv(tmp_path / "audit" / "duplicates.csv")
    exact = sorted(sorted(Path(r[k]).name for k in ("path_a", "path_b")) for r in dups if r["kind"] == "exact")
    assert exact == [["ants_0.png", "planted_0.png"], ["ants_1.png", "planted_1.png"]]
    counts = read_csv(tmp_path / "audit" / "class_counts.csv")
    assert [(r["class"], r["total"]) for r in counts] == [("ants", "12"), ("bees", "14"), ("wasps", "12")]
    assert (tmp_path / "audit" / "label_issues.png").stat().st_size > 1000
    assert any("notes.txt" in r["path"] for r in read_csv(tmp_path / "audit" / "skipped_files.csv"))
    assert summary["embedded_images"] == 38
    again = audit(compose_cfg("audit", tmp_path / "audit2", *overrides))
    assert again["embedded_images"] == 0  # every image's features are in the cache


def test_kfold_sweep_partitions_and_costs_about_one_backbone_pass(tmp_path):
    data = flat_data(tmp_path / "data", per_class=10, classes=("ants", "bees"))
    sweep = tmp_path / "kfold"
    proc = run_cli(
        "-m",
        "experiment=lite0_fe",
        f"data.root={data}",
        "data.split.folds=4",
        "data.split.fold=0,1,2,3",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        scratch=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    vals = [{r["path"] for r in read_csv(sweep / str(j) / "split.csv") if r["split"] == "val"} for j in range(4)]
    assert sum(len(v) for v in vals) == 20 == len(set().union(*vals))
    caches = [json.loads((sweep / str(j) / "summary.json").read_text())["feature_cache"] for j in range(4)]
    # fold 0: all 20 images once (4 val + 16 train view); later folds only meet images in a new role
    assert caches[0]["embedded_images"] == 20
    assert sum(c["embedded_images"] for c in caches) == 40  # each image: one clean, one augmented pass
    kfold = json.loads((sweep / "kfold_summary.json").read_text())
    assert kfold[0]["folds"] == [0, 1, 2, 3] and set(kfold[0]["best_val_acc"]) == {"mean", "std"}
