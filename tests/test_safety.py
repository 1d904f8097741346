"""Hostile and damaged checkpoints run nothing and are named for what they are; config mistakes stop a run
before any data work, each with one message."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import pytest
import torch

from src.data.preprocessing import decode_eval_transforms, encode_eval_transforms, resolve_transform
from src.inference.checkpoint import UnsafeCheckpointError, load_trained
from src.models.classifier import TransferClassifier, check_optimizer
from src.utils.checkpoint_io import CorruptCheckpointError
from src.utils.config import check_trainer_settings
from src.utils.errors import ConfigError, UserError
from tests.conftest import REPO

RESIZE = {"transform": "torchvision.transforms.Resize", "size": 64}
CROP = {"transform": "torchvision.transforms.CenterCrop", "size": 56}
# names that start like a transform but resolve, attribute by attribute, to something that writes files
PAYLOADS = (
    "torchvision.transforms.transforms.torch.save",
    "torchvision.transforms.v2._utils.torch.save",
    "torchvision.transforms.transforms.torch.load",
    "torchvision.transforms.functional.torch.save",
    "torchvision.transforms.Lambda",
    "torchvision.transforms.transforms.os.system",
    "os.system",
    "builtins.eval",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """A plain checkpoint as training writes it: lite0 (random init, so no weights file), a 2-class head."""
    torch.manual_seed(0)
    hparams = {
        "class_names": ["ants", "bees"],
        "backbone": {"name": "efficientnet_lite0", "weights": None, "channels_last": False},
        "head": {"hidden_dim": 8, "dropout": 0.0},
        "optimizer": {"name": "SGD", "lr": 0.01, "momentum": 0.9},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "eval_transforms": [RESIZE, CROP]},
    }
    model = TransferClassifier(**hparams)
    return {"state_dict": model.state_dict(), "hyper_parameters": hparams}


def save(ckpt: dict, path: Path, **hparams_changes) -> Path:
    ckpt = copy.deepcopy(ckpt)
    ckpt["hyper_parameters"].update(hparams_changes)
    torch.save(ckpt, path)
    return path


def test_a_plain_checkpoint_loads_and_predicts(checkpoint, tmp_path):
    loaded = load_trained(save(checkpoint, tmp_path / "ok.ckpt"))
    assert loaded.classes == ["ants", "bees"]
    assert [type(t).__name__ for t in loaded.transform.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    with torch.inference_mode():
        assert loaded.model(torch.randn(2, 3, 56, 56)).exp().sum(1).allclose(torch.ones(2))


@pytest.mark.parametrize("target", PAYLOADS)
def test_a_payload_in_the_recorded_transforms_never_runs(checkpoint, tmp_path, target):
    sentinel = tmp_path / "pwned"
    evil = {"transform": target, "obj": 1, "f": str(sentinel)}
    path = save(
        checkpoint,
        tmp_path / "evil.ckpt",
        preprocessing={"mean": [0.5] * 3, "std": [0.5] * 3, "eval_transforms": [RESIZE, evil]},
    )
    with pytest.raises(UnsafeCheckpointError, match="not one of the allowed transforms"):
        load_trained(path)
    assert not sentinel.exists()


def test_transform_names_resolve_by_identity():
    from torchvision import transforms as T

    assert resolve_transform("torchvision.transforms.Resize") is T.Resize
    assert resolve_transform("torchvision.transforms.transforms.Resize") is T.Resize  # the defining module
    for name in (*PAYLOADS, "torchvision.transforms.Resize.__init__", "torchvision.transforms.__class__", "x y"):
        with pytest.raises(UserError):
            resolve_transform(name)


def test_options_must_be_plain_and_nothing_is_built_before_every_step_is_checked(tmp_path):
    with pytest.raises(UserError, match="plain"):
        decode_eval_transforms([{**RESIZE, "size": {"_target_": "os.system"}}], [0.5] * 3, [0.5] * 3)
    with pytest.raises(ConfigError, match="data.eval_transforms"):  # caught at training time, before data work
        encode_eval_transforms([{"_target_": "torchvision.transforms.Lambda", "lambd": "x"}])
    assert encode_eval_transforms([{"_target_": "torchvision.transforms.Resize", "size": 256}]) == [
        {"transform": "torchvision.transforms.Resize", "size": 256}
    ]


@pytest.mark.parametrize("damage", ["crc", "truncated", "random", "empty"])
def test_damaged_checkpoints_are_called_corrupt(checkpoint, tmp_path, damage):
    path = save(checkpoint, tmp_path / "x.ckpt")
    data = bytearray(path.read_bytes())
    if damage == "crc":  # zeros inside the largest tensor: the archive is whole, one member fails its CRC
        with zipfile.ZipFile(path) as z:
            info = max(z.infolist(), key=lambda i: i.file_size)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
        data[start : start + 64] = bytes(64)
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "random":
        data = bytearray(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="corrupt"):
        load_trained(path)


def test_non_finite_and_misshapen_weights_are_named(checkpoint, tmp_path):
    nan = copy.deepcopy(checkpoint)
    nan["state_dict"]["head.0.weight"] = torch.full_like(nan["state_dict"]["head.0.weight"], float("nan"))
    with pytest.raises(UserError, match=r"head\.0\.weight: holds NaN"):
        load_trained(save(nan, tmp_path / "nan.ckpt"))
    shape = copy.deepcopy(checkpoint)
    shape["state_dict"]["head.3.weight"] = torch.zeros(5, 8)
    with pytest.raises(UserError, match=r"head\.3\.weight: shape \(5, 8\) in the checkpoint, the model needs \(2, 8\)"):
        load_trained(save(shape, tmp_path / "shape.ckpt"))
    with pytest.raises(UserError, match="line break"):
        load_trained(save(checkpoint, tmp_path / "nl.ckpt", class_names=["ants", "b\nx"]))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_preset_is_valid_by_its_own_rules(name):
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "optimizer" / f"{name}.yaml"))
    check_optimizer(preset)
    assert getattr(torch.optim, preset["name"]).__name__.lower() == name


def test_optimizer_settings_are_checked_by_the_optimizer_they_belong_to():
    with pytest.raises(ConfigError, match=r"takes no model\.optimizer\.momentum.*model/optimizer=sgd\|adam"):
        check_optimizer({"name": "Adam", "lr": 0.01, "momentum": 0.9})
    with pytest.raises(ConfigError, match="momentum"):
        check_optimizer({"name": "SGD", "lr": 0.01, "momentum": -1})
    with pytest.raises(ConfigError, match="beta"):
        check_optimizer({"name": "AdamW", "lr": 0.01, "betas": [1.5, 0.9]})
    with pytest.raises(ConfigError, match="lr"):
        check_optimizer({"name": "SGD", "lr": 0})


@pytest.mark.parametrize("epochs", [0, -1, 1.5, None, True])
def test_max_epochs_must_be_at_least_one(epochs):
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        check_trainer_settings(OmegaConf.create({"max_epochs": epochs}))
    check_trainer_settings(OmegaConf.create({"max_epochs": 1}))


def test_float16_on_a_cpu_is_refused_and_more_processes_than_cores_said(caplog, monkeypatch):
    """trainer.precision=16-mixed on a CPU ran 138 s against 4-8 s with no word; devices=4 on 2 cores started 4."""
    import os

    from omegaconf import OmegaConf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("cpu", "auto"):
        with pytest.raises(ConfigError, match="float16 has no fast path there.*bf16-mixed"):
            check_trainer_settings(
                OmegaConf.create({"max_epochs": 1, "accelerator": accelerator, "precision": "16-mixed"})
            )
    check_trainer_settings(OmegaConf.create({"max_epochs": 1, "accelerator": "cpu", "precision": "bf16-mixed"}))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    check_trainer_settings(OmegaConf.create({"max_epochs": 1, "accelerator": "cpu", "devices": 2}))
    assert "processes will share them" not in caplog.text
    check_trainer_settings(OmegaConf.create({"max_epochs": 1, "accelerator": "cpu", "devices": 4}))
    assert "trainer.devices=4 on a CPU with 2 cores: 4 processes will share them" in caplog.text


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["hyper_parameters"]["preprocessing"].update(eval_transforms=5),
        lambda c: c["hyper_parameters"]["preprocessing"].update(mean=5),
        lambda c: c["hyper_parameters"].update(preprocessing=[1]),
        lambda c: c["hyper_parameters"].update(head="x"),
        lambda c: c["hyper_parameters"].pop("backbone"),
        lambda c: c["hyper_parameters"].update(evil=1),
        lambda c: c.update(state_dict=None),
        lambda c: c.update(backbone_ref="x"),
        lambda c: c["state_dict"].update({"head.3.bias": torch.zeros(2, dtype=torch.int64)}),
        lambda c: c["state_dict"].update({"head.3.bias": torch.zeros(2, device="meta")}),
    ],
    ids=[
        "transforms-int",
        "mean-int",
        "preprocessing-list",
        "head-str",
        "no-backbone",
        "extra-key",
        "state-none",
        "ref-str",
        "int-weights",
        "meta-weights",
    ],
)
def test_hand_edited_checkpoints_get_one_message(checkpoint, tmp_path, edit):
    ckpt = copy.deepcopy(checkpoint)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(UserError):
        load_trained(tmp_path / "edited.ckpt")


@pytest.mark.parametrize(
    "steps, mean, std, match",
    [
        ([{"transform": "torchvision.transforms.Grayscale", "num_output_channels": 1}], [0.5] * 3, [0.5] * 3, "fail"),
        ([{**RESIZE, "size": -5}], [0.5] * 3, [0.5] * 3, "fail|cannot be built"),
        ([{**RESIZE, "size": [40000, 40000]}], [0.5] * 3, [0.5] * 3, "more than 4096 pixels"),
        ([{"transform": "torchvision.transforms.Pad", "padding": 5000}], [0.5] * 3, [0.5] * 3, "more than 4096"),
        ([RESIZE], [0.5] * 3, [0.0] * 3, "positive standard deviations"),
        ([RESIZE], ["a", "b", "c"], [0.5] * 3, "finite means"),
        ([RESIZE], [0.5] * 3, [float("nan")] * 3, "finite"),
    ],
)
def test_recorded_preprocessing_is_run_once_on_a_small_image_and_bounded(steps, mean, std, match):
    with pytest.raises(UserError, match=match):
        decode_eval_transforms(steps, mean, std)


def test_a_file_with_bytes_before_its_archive_is_corrupt_not_hostile(checkpoint, tmp_path):
    path = save(checkpoint, tmp_path / "x.ckpt")
    path.write_bytes(bytes(1000) + path.read_bytes())
    with pytest.raises(CorruptCheckpointError, match="corrupt"):
        load_trained(path)


@pytest.mark.parametrize(
    "optimizer, scheduler, match",
    [
        ({"name": "SGD", "lr": float("nan")}, None, "finite"),
        ({"name": "SGD", "lr": float("inf")}, None, "finite"),
        ({"name": "SparseAdam", "lr": 0.01}, None, "dense gradients"),
        ({"name": "SGD", "lr": 0.01}, {"name": "one_cycle", "one_cycle": {"foo": 1}}, "takes no"),
        ({"name": "SGD", "lr": 0.01}, {"name": "warmup_cosine", "warmup_cosine": {"warmup_fraction": -5}}, r"\[0.0"),
    ],
)
def test_optimizer_and_schedule_values_are_checked_before_data_work(optimizer, scheduler, match):
    from src.models.classifier import check_model_config

    backbone, head = {"name": "efficientnet_lite0"}, {"hidden_dim": 8, "dropout": 0.0}
    with pytest.raises(ConfigError, match=match):
        check_model_config(backbone, head, optimizer, scheduler)
