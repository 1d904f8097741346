"""Data as it comes: unsplit folders, label files, imbalance, near-duplicates, label errors, k-fold."""

from __future__ import annotations

import csv
import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

from src.data.audit import rank_label_issues
from src.data.datamodule import ImageFolderDataModule
from src.data.duplicates import NearRule, feature_pairs, find_duplicates
from src.data.listing import SplitOptions, assign_splits
from src.data.preflight import scan
from src.data.seeding import EpochSampler
from src.models.classifier import TransferClassifier, inverse_frequency_weights
from src.utils.errors import ConfigError, DatasetError
from tests.conftest import make_imagefolder

SMALL = [T.Resize(32), T.CenterCrop(32)]


def datamodule(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(root, SMALL, SMALL, mean=[0.5] * 3, std=[0.5] * 3, num_workers=0, seed=42, **kwargs)


def flat_folder(root: Path, counts: dict[str, int]) -> Path:
    """Class folders straight under root (no split), ``counts`` images each."""
    for k, (name, n) in enumerate(counts.items()):
        staging = root.parent / f"staging_{name}"
        make_imagefolder(staging, classes=(name,), per_split={"all": n}, seed=k)
        root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / "all" / name), root / name)
        shutil.rmtree(staging)
    return root


def small_model(classes: list[str], **kwargs) -> TransferClassifier:
    """A resnet18 (random init) with a tiny head: enough to check losses and metrics."""
    head = {"hidden_dim": 8, "dropout": 0.0}
    return TransferClassifier(
        classes, {"name": "resnet18", "weights": None}, head, {"name": "SGD", "lr": 0.1}, **kwargs
    )


def splits_of(dm: ImageFolderDataModule) -> dict[str, str]:
    return {path: split for path, _, split in dm.split_rows()}


# ----------------------------------------------------------------------------------------------- layouts


def test_a_flat_folder_splits_stratified_the_same_way_twice(tmp_path):
    root = flat_folder(tmp_path / "flat", {"ants": 30, "bees": 10})
    (root / ".hydra").mkdir()  # a run folder written into the data: not a class
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.ckpt").write_bytes(b"x")
    dm = datamodule(root)
    dm.setup("fit")
    assert dm.layout == "flat" and dm.classes == ["ants", "bees"]
    assert dm.class_counts == {"train": {"ants": 24, "bees": 8}, "val": {"ants": 6, "bees": 2}}
    again = datamodule(root)
    again.setup("fit")
    assert again.split_rows() == dm.split_rows()
    other_seed = datamodule(root, split={"seed": 7})
    other_seed.setup("fit")
    assert splits_of(other_seed) != splits_of(dm)


def test_adding_an_image_moves_at_most_one_other(tmp_path):
    root = flat_folder(tmp_path / "flat", {"ants": 23, "bees": 17})
    before = datamodule(root)
    before.setup("fit")
    for k in range(6):  # one at a time: each addition moves at most one existing image
        Image.new("RGB", (20, 20), (k, 9, 9)).save(root / "ants" / f"new_{k}.png")
        after = datamodule(root)
        after.setup("fit")
        old, new = splits_of(before), splits_of(after)
        moved = [p for p in old if old[p] != new[p]]
        assert len(moved) <= 1, moved
        before = after


def test_split_does_not_depend_on_listing_order():
    pool = [(f"/r/c{c}/img{i}.png", c) for c in range(3) for i in range(20)]
    options = SplitOptions(seed=3, val=0.25)
    forward = dict(zip(pool, assign_splits(pool, lambda p: p[3:], options), strict=True))
    backward = dict(zip(pool[::-1], assign_splits(pool[::-1], lambda p: p[3:], options), strict=True))
    assert forward == backward
    assert Counter((c, s) for (_, c), s in forward.items() if s == "val") == {
        (0, "val"): 5,
        (1, "val"): 5,
        (2, "val"): 5,
    }


def test_train_without_val_splits_val_off_train_and_keeps_test(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_split={"train": 10, "test": 2})
    dm = datamodule(root)
    dm.setup("fit")
    assert dm.class_counts["val"] == {"ants": 2, "bees": 2} and dm.class_counts["train"] == {"ants": 8, "bees": 8}
    assert dm.class_counts["test"] == {"ants": 2, "bees": 2}  # the given test folder, untouched
    assert "val split off train" in dm.how


def test_folds_partition_the_data(tmp_path):
    root = flat_folder(tmp_path / "flat", {"ants": 13, "bees": 9})
    vals, trains = [], []
    for fold in range(5):
        dm = datamodule(root, split={"folds": 5, "fold": fold})
        dm.setup("fit")
        rows = splits_of(dm)
        vals.append({p for p, s in rows.items() if s == "val"})
        trains.append({p for p, s in rows.items() if s == "train"})
        assert vals[-1] | trains[-1] == set(rows) and not vals[-1] & trains[-1]
    assert sum(len(v) for v in vals) == 22 == len(set().union(*vals))
    assert all(Counter(p.split("/")[0] for p in v)["ants"] in (2, 3) for v in vals)  # stratified
    with pytest.raises(ConfigError, match="data.split.fold must be one of 0..4"):
        datamodule(root, split={"folds": 5, "fold": 5})


# ------------------------------------------------------------------------------------------- label files


def write_labels(root: Path, rows: list[list[str]], header=("path", "label")) -> None:
    with open(root / "labels.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        out.writerows(rows)


def test_a_label_file_with_a_split_column_is_used_as_given(tmp_path):
    src = make_imagefolder(tmp_path / "src", per_split={"all": 4})
    root = tmp_path / "csvdata"
    (root / "img").mkdir(parents=True)
    rows = []
    for i, f in enumerate(sorted((src / "all").rglob("*.png"))):
        shutil.copy(f, root / "img" / f"{i}.png")
        rows.append([f"img/{i}.png", f.parent.name, "val" if i % 4 == 0 else "train"])
    write_labels(root, rows, header=("path", "label", "split"))
    dm = datamodule(root, labels="labels.csv")
    dm.setup("fit")
    assert dm.layout == "csv" and dm.classes == ["ants", "bees"]
    assert sorted(dm.split_rows()) == sorted((p, label, split) for p, label, split in rows)
    unsplit = tmp_path / "unsplit"
    shutil.copytree(root, unsplit)
    write_labels(unsplit, [r[:2] for r in rows])  # no split column: split for you
    dm2 = datamodule(unsplit, labels=str(unsplit / "labels.csv"))  # absolute works too
    dm2.setup("fit")
    assert dm2.class_counts["val"] == {"ants": 1, "bees": 1}


@pytest.mark.parametrize(
    "header, rows, message",
    [
        (("path", "label", "notes"), [["img/0.png", "ants", "x"]], r"unknown: \['notes'\]"),
        (("path",), [["img/0.png"]], r"missing: \['label'\]"),
        (("path", "label"), [["img/0.png", ""]], r"line 2: img/0.png: empty label"),
        (("path", "label"), [["img/0.png", "ants"], ["img/9.png", "bees"]], r"line 3: img/9.png: no such file"),
        (
            ("path", "label"),
            [["img/0.png", "ants"], ["img/1.png", "bees"], ["img/0.png", "bees"]],
            r"line 4: img/0.png is listed twice with different labels: 'ants' \(line 2\) and 'bees'",
        ),
        (("path", "label", "split"), [["img/0.png", "ants", "holdout"]], r"split 'holdout' is not one of"),
        (("path", "label"), [["../outside.png", "ants"]], r"must lie under data.root"),
    ],
)
def test_every_label_file_problem_is_named_with_its_row(tmp_path, header, rows, message):
    root = tmp_path / "csvdata"
    (root / "img").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(root / "img" / f"{i}.png")
    write_labels(root, rows, header=header)
    with pytest.raises(DatasetError, match=message):
        datamodule(root, labels="labels.csv").setup("fit")
    with pytest.raises(DatasetError, match="does not exist"):
        datamodule(root, labels="nope.csv").setup("fit")


# ----------------------------------------------------------------------------------------------- imbalance


def test_class_weights_change_the_loss_as_computed_by_hand():
    assert inverse_frequency_weights([30, 10]) == [pytest.approx(40 / 60), pytest.approx(40 / 20)]
    model = small_model(["a", "b"], loss={"class_weights": [0.5, 2.0]})
    log_probs = torch.log(torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1]]))
    y = torch.tensor([0, 1, 1])
    by_hand = -(0.5 * np.log(0.8) + 2.0 * np.log(0.6) + 2.0 * np.log(0.1)) / (0.5 + 2.0 + 2.0)
    assert model.criterion(log_probs, y).item() == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ConfigError, match="2 positive numbers"):
        small_model(["a", "b"], loss={"class_weights": [1.0]})


def test_the_balanced_sampler_draws_classes_equally_and_replays_an_epoch(tmp_path):
    root = flat_folder(tmp_path / "flat", {"ants": 40, "bees": 10})
    dm = datamodule(root, sampler="balanced", split={"val": 0.2})
    dm.setup("fit")
    targets = dm.datasets["train"].targets  # 32 ants, 8 bees
    sampler = EpochSampler(len(targets), 42, weights=dm.sample_weights())
    counts = Counter(targets[i] for epoch in range(20) for i, _ in (sampler.set_epoch(epoch) or sampler))
    assert abs(counts[0] - counts[1]) / (counts[0] + counts[1]) < 0.08  # about half each (random: 80/20)
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler)  # seeded: a resumed epoch replays the same draws
    with pytest.raises(ConfigError, match="data.sampler must be random or balanced"):
        datamodule(root, sampler="oversample")


def test_macro_f1_and_balanced_accuracy_match_hand_values():
    model = small_model(["a", "b", "c"])
    # confusion (rows true, columns predicted): a: 4 0 0 | b: 1 2 1 | c: 0 0 2
    y = torch.tensor([0] * 4 + [1] * 4 + [2] * 2)
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    scores = torch.nn.functional.one_hot(pred, 3).float()
    model.val_scores.update(scores, y)
    recall = [4 / 4, 2 / 4, 2 / 2]
    precision = [4 / 5, 2 / 2, 2 / 3]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    computed = {k: v.item() for k, v in model.val_scores.compute().items()}
    assert computed["val/balanced_acc"] == pytest.approx(sum(recall) / 3)
    assert computed["val/macro_f1"] == pytest.approx(sum(f1) / 3)
    assert computed["val/acc"] == pytest.approx(8 / 10)


def test_imbalance_is_warned_with_the_options(tmp_path, caplog):
    root = flat_folder(tmp_path / "flat", {"ants": 40, "bees": 10})
    datamodule(root).setup("fit")
    assert "Classes are imbalanced in train (largest/smallest: 4.0x)" in caplog.text
    assert "model.loss.class_weights=auto" in caplog.text and "data.sampler=balanced" in caplog.text


# ---------------------------------------------------------------------------------------------- leakage


def photo(seed: int, size=(160, 120)) -> Image.Image:
    """A smooth random 'photo': low-frequency structure, as real photos have (pHash reads that)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def test_a_resized_reencoded_copy_is_a_near_duplicate_and_different_images_are_not(tmp_path):
    for i in range(6):
        photo(i).save(tmp_path / f"train_{i}.jpg", quality=90)
    source = photo(3)
    buf = io.BytesIO()
    source.resize((112, 84)).save(buf, "JPEG", quality=60)  # 70 %, quality 60
    (tmp_path / "val_copy.jpg").write_bytes(buf.getvalue())
    photo(99).save(tmp_path / "val_other.jpg")
    files = {"train": [str(tmp_path / f"train_{i}.jpg") for i in range(6)]}
    files["val"] = [str(tmp_path / "val_copy.jpg"), str(tmp_path / "val_other.jpg")]
    result = scan(files["train"] + files["val"], 1, None)
    pairs = find_duplicates(files, result.digests, result.signatures, NearRule())
    assert [(q.kind, Path(q.path_a).name, Path(q.path_b).name) for q in pairs] == [
        ("near", "train_3.jpg", "val_copy.jpg")
    ]
    assert pairs[0].similarity >= 1 - 8 / 64
    assert find_duplicates(files, result.digests, result.signatures, NearRule(None)) == []  # exact only


def test_the_same_shape_in_other_colours_is_not_a_copy(tmp_path):
    paths = []
    for i, (ground, ink) in enumerate((((220, 205, 180), (120, 0, 110)), ((200, 240, 200), (210, 70, 210)))):
        im = Image.new("RGB", (96, 96), ground)
        draw = ImageDraw.Draw(im)
        draw.rectangle((10, 35, 60, 55), fill=ink)
        draw.rectangle((25, 20, 45, 70), fill=ink)
        paths.append(str(tmp_path / f"cross_{i}.png"))
        im.save(paths[-1])
    result = scan(paths, 1, None)
    a, b = (int(result.signatures[p][:16], 16) for p in paths)
    assert (a ^ b).bit_count() <= 8  # alike by structure alone ...
    files = {"train": paths[:1], "val": paths[1:]}
    assert find_duplicates(files, result.digests, result.signatures, NearRule()) == []  # ... not by colour
    assert len(find_duplicates(files, result.digests, result.signatures, NearRule(8, None))) == 1


def test_feature_pairs_use_centred_cosine():
    base = torch.randn(6, 16) + 5.0  # a shared component makes every raw cosine high
    base[5] = base[2] + 0.01 * torch.randn(16)
    items = [("train", f"t{i}") for i in range(5)] + [("val", "copy")]
    pairs = feature_pairs(items, base, 0.95, within=False, skip=set())
    assert [(q.path_a, q.path_b) for q in pairs] == [("t2", "copy")]


# ------------------------------------------------------------------------------------------ label issues


def test_label_issues_rank_planted_wrong_labels_first():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (3, 32))
    labels = np.repeat(np.arange(3), 40)
    features = centres[labels] + rng.normal(0, 1, (120, 32))
    planted = [5, 47, 90, 100, 119]
    given = labels.copy()
    given[planted] = (labels[planted] + 1) % 3
    ranking = rank_label_issues(torch.tensor(features), torch.tensor(given), folds=5, seed=0, c=0.1, max_iter=2000)
    top = set(ranking.quality.argsort()[:5].tolist())
    assert top == set(planted)
    assert (ranking.suggested[planted] == labels[planted]).all() and ranking.flagged[planted].all()


def test_label_issues_take_a_class_with_one_image():
    """Six ants and one bee: the fold without the bee in its training part has one class (sklearn refuses to fit
    that); the bee is scored by heads that never saw its class, and the others still get out-of-fold scores."""
    rng = np.random.default_rng(1)
    given = np.array([0] * 6 + [1])
    features = rng.normal(0, 1, (7, 16)) + given[:, None] * 3
    ranking = rank_label_issues(torch.tensor(features), torch.tensor(given), folds=5, seed=0, c=0.1, max_iter=2000)
    assert ranking.folds == 2 and len(ranking.quality) == 7
    assert ranking.quality[6] == 0.0 and ranking.suggested[6] == 0  # its class never seen out of fold
    assert np.isfinite(ranking.quality).all() and (ranking.quality[:6] > 0.5).all()


# ------------------------------------------------------------------------------------ careless-user inputs


def test_label_file_encoding_folders_and_split_conflicts_are_named(tmp_path):
    root = tmp_path / "csvdata"
    (root / "img" / "sub").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(root / "img" / f"{i}.png")
    (root / "labels.csv").write_bytes("path,label\nimg/0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="is not UTF-8 text .* save it as CSV UTF-8"):
        datamodule(root, labels="labels.csv").setup("fit")
    write_labels(
        root,
        [["img/sub", "ants", "train"], ["img/0.png", "ants", "train"], ["img/0.png", "ants", "val"]],
        header=("path", "label", "split"),
    )
    with pytest.raises(DatasetError, match=r"(?s)line 2: img/sub: a folder.*listed twice with different splits"):
        datamodule(root, labels="labels.csv").setup("fit")
    with pytest.raises(DatasetError, match="is a folder, not a CSV file"):
        datamodule(root, labels="img").setup("fit")


def test_split_settings_that_would_be_ignored_are_refused(tmp_path):
    root = flat_folder(tmp_path / "flat", {"ants": 6, "bees": 6})
    with pytest.raises(ConfigError, match="data.split.fold=2 needs data.split.folds"):
        datamodule(root, split={"fold": 2})
    with pytest.raises(ConfigError, match="data.split.seed must be a whole number"):
        datamodule(root, split={"seed": "abc"})
    with pytest.raises(ConfigError, match="data.split takes seed, val, test, folds and fold; not vals"):
        datamodule(root, split={"vals": 0.3})


def test_classes_left_without_training_images_stop_the_run(tmp_path):
    root = flat_folder(tmp_path / "flat", {"ants": 8, "bees": 8, "wasps": 1})
    with pytest.raises(DatasetError, match=r"no training image: \['wasps'\] \(fewer images than data.split.folds=3"):
        datamodule(root, split={"folds": 3, "fold": 1}).setup("fit")
    for f in (root / "wasps").iterdir():
        f.write_bytes(b"")  # every wasp unusable
    with pytest.raises(DatasetError, match=r"no training image: \['wasps'\] \(every one of their files was unusable"):
        datamodule(root, max_bad_fraction=0.5).setup("fit")


def test_a_run_folder_kept_in_the_data_is_not_a_class(tmp_path):
    root = flat_folder(tmp_path / "flat", {"ants": 5, "bees": 5})
    (root / "audit_out" / ".hydra").mkdir(parents=True)
    photo(0).save(root / "audit_out" / "label_issues.png")
    dm = datamodule(root)
    dm.setup("fit")
    assert dm.classes == ["ants", "bees"]


def test_class_weights_are_not_part_of_the_weights():
    model = small_model(["a", "b"], loss={"class_weights": [1.0, 3.0]})
    assert "criterion.weight" not in model.state_dict()  # a resume may change them
    assert torch.equal(model.criterion.weight, torch.tensor([1.0, 3.0]))


def test_held_out_records_must_stay_plain_and_inside_the_root():
    from src.inference.checkpoint import held_out_row

    good = ["ants/a.jpg", "ants", "0" * 64]
    assert held_out_row(good, ["ants"]) and held_out_row(["ants/a.jpg", "ants", ""], ["ants"])
    for bad in ("", ".", "./", "/etc/x.jpg", "../x.jpg", "a/../../x.jpg", "a\0b.jpg"):
        assert not held_out_row([bad, "ants", ""], ["ants"]), bad
    assert not held_out_row(["a.jpg", "wasps", ""], ["ants"]) and not held_out_row(["a.jpg", "ants", "xyz"], ["ants"])


def test_audit_settings_are_checked():
    from src.data.audit import check_audit_config

    check_audit_config(5, 0.1, 100, 0.8, 16)
    for args, message in [
        ((1, 0.1, 100, 0.8, 16), "audit.folds must be a whole number of at least 2"),
        ((5, -1, 100, 0.8, 16), "audit.C must be a positive number"),
        ((5, 0.1, 100, "abc", 16), r"audit.near_cosine must be a cosine in \[-1, 1\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_audit_config(*args)


@pytest.mark.parametrize("within", [False, True])
def test_near_pairs_equal_a_brute_force_comparison_of_every_pair(within, monkeypatch):
    """The chunked, split-ordered search finds exactly the pairs a check of every pair finds (clustered hashes
    so that many pairs are near; blocks of rows spanning split boundaries: chunks of 128 rows)."""
    from src.data import duplicates
    from src.data.duplicates import NearRule, near_pairs

    monkeypatch.setattr(duplicates, "CHUNK", 128)
    monkeypatch.setattr(duplicates, "CANDIDATES", 37)  # colour checks in batches that cut through blocks
    rng = np.random.default_rng(0)
    n = 600
    centres = rng.integers(0, 256, (12, 8), dtype=np.uint8)
    flips = (rng.random((n, 8)) < 0.05).astype(np.uint8) << rng.integers(0, 8, (n, 8)).astype(np.uint8)
    hashes = centres[rng.integers(0, 12, n)] ^ flips
    thumbs = rng.integers(0, 20, (n, 192), dtype=np.uint8)
    items = [("train" if i < 350 else "val" if i < 530 else "test", f"img{i}") for i in range(n)]
    signatures = {p: (hashes[i].tobytes() + thumbs[i].tobytes()).hex() for i, (_, p) in enumerate(items)}
    rule = NearRule(max_hash_distance=6, max_colour_difference=8.0)
    found = {(q.path_a, q.path_b, q.similarity) for q in near_pairs(items, signatures, rule, within)}

    want = set()
    words = [int.from_bytes(h.tobytes(), "little") for h in hashes]
    for i in range(n):
        for j in range(i + 1, n):
            bits = (words[i] ^ words[j]).bit_count()
            if bits > 6 or (not within and items[i][0] == items[j][0]):
                continue
            if np.abs(thumbs[i].astype(np.float32) - thumbs[j]).mean() <= 8.0:
                want.add((items[i][1], items[j][1], 1 - bits / 64))
    assert len(want) > 100 and found == want


def test_the_duplicate_search_is_kept_for_an_unchanged_dataset_and_redone_on_any_change(tmp_path, monkeypatch):
    from src.data import duplicates
    from src.data.duplicates import NearRule, cached_duplicates

    files = {"train": ["a", "b"], "val": ["c"]}
    digests = {"a": "1" * 64, "b": "2" * 64, "c": "1" * 64}  # a = c: exact copies
    signatures = {p: "00" * 200 for p in files["train"] + files["val"]}  # all alike: near copies
    rule = NearRule(max_hash_distance=4, max_colour_difference=2.0)
    first = cached_duplicates(files, digests, signatures, rule, tmp_path)
    assert [(q.kind, q.path_a, q.path_b) for q in first] == [("exact", "a", "c"), ("near", "b", "c")]
    searches = []
    real = duplicates.find_duplicates
    monkeypatch.setattr(duplicates, "find_duplicates", lambda *a: searches.append(a) or real(*a))
    assert cached_duplicates(files, digests, signatures, rule, tmp_path) == first and not searches
    signatures["b"] = "ff" * 8 + "00" * 192  # b's structure changed: no longer near c
    assert [q.path_b for q in cached_duplicates(files, digests, signatures, rule, tmp_path)] == ["c"]
    assert len(searches) == 1
    cached_duplicates(files, digests, signatures, NearRule(max_hash_distance=2), tmp_path)  # another rule
    cached_duplicates({"train": ["a"], "val": ["b", "c"]}, digests, signatures, rule, tmp_path)  # another split
    assert len(searches) == 3
