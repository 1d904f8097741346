"""Fine-tuning: layer groups, scheduled unfreezing with discriminative LRs, BatchNorm policy, resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import transforms as T

from src.callbacks.epoch_summary import EpochSummary
from src.callbacks.feature_cache import FeatureCache
from src.callbacks.finetuning import BackboneFinetuning
from src.models.backbones import build_backbone
from src.models.layer_groups import layer_groups
from src.models.schedules import WarmupCosine
from src.utils.errors import ConfigError
from tests.conftest import make_imagefolder, run_cli
from tests.factories import tiny_datamodule, tiny_model, tiny_trainer

SMALL = [T.Resize(32), T.CenterCrop(32)]
SCHEDULE = [{"epoch": 1, "groups": 1}, {"epoch": 2, "groups": "all"}]
GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_layer_groups_of_supported_backbones():
    assert [n for n, _ in layer_groups("resnet18", build_backbone("resnet18", None).module)] == GROUPS
    lite0 = [n for n, _ in layer_groups("efficientnet_lite0", build_backbone("efficientnet_lite0", None).module)]
    assert lite0 == ["stem"] + [f"blocks.{i}" for i in range(7)] + ["head_conv"]
    # every other family: tests/test_model_zoo.py


class Probe(L.Callback):
    """Snapshots the backbone and the optimizer's groups at the end of every epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.groups: list[list[tuple[str, float]]] = []
        self.bn_training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.bn_training.append(
                any(
                    m.training
                    for m in pl_module.backbone.modules()
                    if isinstance(m, _BatchNorm) and m.weight.requires_grad
                )
            )

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()})
        self.groups.append([(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups])


def make_run(data: Path, root: Path, schedule=SCHEDULE, bn="train", max_epochs=3, scheduler=None, extra=()):
    model = tiny_model(dropout=0.0, lr=0.05, scheduler=scheduler)
    dm = tiny_datamodule(data, SMALL, batch_size=4)
    probe = Probe()
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_on_train_epoch_end=True)
    callbacks = [BackboneFinetuning(schedule, backbone_lr_factor=0.1, bn=bn), EpochSummary(), probe, ckpt, *extra]
    trainer = tiny_trainer(callbacks, max_epochs=max_epochs, default_root_dir=root, enable_checkpointing=True)
    return model, dm, trainer, probe


def group_state(state: dict[str, torch.Tensor], group: str) -> dict[str, torch.Tensor]:
    prefixes = ("conv1.", "bn1.") if group == "stem" else (f"{group}.",)
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_groups_stay_bit_identical_until_their_epoch_then_train_at_the_lr_fraction(tiny_data, tmp_path):
    model, dm, trainer, probe = make_run(tiny_data, tmp_path)
    initial = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer.fit(model, datamodule=dm)
    s0, s1, s2 = probe.states
    assert same(s0, initial)  # epoch 0: head only
    assert not same(group_state(s1, "layer4"), group_state(initial, "layer4"))  # epoch 1: the last group
    assert any("running_mean" in k for k in group_state(s1, "layer4"))
    for g in GROUPS[:-1]:
        assert same(group_state(s1, g), group_state(initial, g)), g  # weights and BN buffers untouched
    for g in GROUPS[:-1]:
        assert not same(group_state(s2, g), group_state(s1, g)), g  # epoch 2: everything
    names = [n for n, _ in probe.groups[-1]]
    assert names == [
        "head",
        "backbone.layer4",
        "backbone.stem",
        "backbone.layer1",
        "backbone.layer2",
        "backbone.layer3",
    ]
    lrs = dict(probe.groups[-1])
    assert all(lrs[n] == pytest.approx(0.1 * lrs["head"]) for n in names[1:])
    assert probe.groups[0] == [("head", 0.05)]
    assert probe.bn_training == [False, True, True]  # bn=train: unfrozen BatchNorm normalises with batch stats


def test_frozen_bn_policy_keeps_statistics_and_affine(tiny_data, tmp_path):
    model, dm, trainer, probe = make_run(
        tiny_data, tmp_path, schedule=[{"epoch": 0, "groups": "all"}], bn="frozen", max_epochs=1
    )
    initial = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    seen_bn_train = []
    model.on_train_batch_start = lambda batch, idx: seen_bn_train.append(
        any(m.training for m in model.backbone.modules() if isinstance(m, _BatchNorm))
    )
    trainer.fit(model, datamodule=dm)
    final = probe.states[-1]
    bn_keys = [k for k in final if ".bn" in k or k.startswith("bn1") or "downsample.1" in k]
    conv_keys = [k for k in final if "conv" in k and k.endswith("weight")]
    assert bn_keys and all(torch.equal(final[k], initial[k]) for k in bn_keys)
    assert conv_keys and all(not torch.equal(final[k], initial[k]) for k in conv_keys)
    assert seen_bn_train and not any(seen_bn_train)


class BatchKinds(L.Callback):
    """What the first training and validation batch of every epoch held: (items, tensor dims, first group)."""

    def __init__(self) -> None:
        self.train: list[tuple] = []
        self.val: list[tuple] = []

    @staticmethod
    def kind(batch) -> tuple:
        return len(batch), batch[0].ndim, int(batch[2][0]) if len(batch) == 3 else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.train.append(self.kind(batch))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.val.append(self.kind(batch))


def test_each_fine_tuning_stage_trains_on_what_stays_frozen_in_it(tiny_data, tmp_path):
    cache = FeatureCache(enabled=True, dir=tmp_path / "cache", train_views=2, eval_batch_size=64, embed_batch_size=4)
    kinds = BatchKinds()
    model, dm, trainer, probe = make_run(tiny_data, tmp_path, extra=[cache, kinds])
    initial = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer.fit(model, datamodule=dm)
    # epoch 0 (head only): pooled features; epoch 1 (layer4 trains): the outputs of stem..layer3, from which
    # the model runs group 4 on; epoch 2 (every group): images
    assert kinds.train == [(2, 2, None), (3, 4, 4), (2, 4, None)]
    assert kinds.val == kinds.train
    served = [s["served_from"] for s in cache.stats["stages"]]
    assert served[0] == "pooled features" and served[1].startswith("outputs of stem..layer3")
    assert served[2].startswith("images")
    # 2 views of 12 train images + 8 val, for each of the two cached stages
    assert cache.stats["embedded_images"] == 2 * (2 * 12 + 8)
    s0, s1, _ = probe.states
    assert same(s0, initial)
    assert not same(group_state(s1, "layer4"), group_state(initial, "layer4"))  # trained on cached inputs
    for g in GROUPS[:-1]:
        assert same(group_state(s1, g), group_state(initial, g)), g
    # a second run finds both stages' features on disk
    again = FeatureCache(enabled=True, dir=tmp_path / "cache", train_views=2, eval_batch_size=64, embed_batch_size=4)
    model, dm, trainer, _ = make_run(tiny_data, tmp_path / "again", extra=[again])
    trainer.fit(model, datamodule=dm)
    assert again.stats["embedded_images"] == 0 and again.stats["hits"] == 6


def test_the_rest_of_the_backbone_from_a_prefix_equals_the_whole_forward():
    model = tiny_model(dropout=0.0, lr=0.05).eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        whole = model(x)
        for cut in range(1, 5):
            assert torch.allclose(model.head(model.features_from(model.frozen_prefix(x, cut), cut)), whole, atol=1e-5)


def test_a_stage_whose_frozen_outputs_exceed_the_memory_cap_runs_on_images(tiny_data, tmp_path):
    cache = FeatureCache(
        enabled=True, dir=tmp_path / "cache", train_views=1, eval_batch_size=64, embed_batch_size=4, prefix_max_gb=0
    )
    kinds = BatchKinds()
    model, dm, trainer, _ = make_run(tiny_data, tmp_path, max_epochs=2, extra=[cache, kinds])
    trainer.fit(model, datamodule=dm)
    assert kinds.train == [(2, 2, None), (2, 4, None)]
    assert "model.cache.prefix_max_gb" in cache.stats["stages"][1]["served_from"]


def resume(data: Path, root: Path, first_epochs: int, total: int):
    model, dm, trainer, _ = make_run(data, root, max_epochs=first_epochs)
    trainer.fit(model, datamodule=dm)
    model, dm, trainer, probe = make_run(data, root, max_epochs=total)
    trainer.fit(model, datamodule=dm, ckpt_path=str(root / "checkpoints" / "last.ckpt"))
    return model, trainer, probe


@pytest.fixture(scope="module")
def straight_groups(tmp_path_factory) -> tuple[Path, list]:
    """(data, the optimizer's final param groups) of an uninterrupted 5-epoch fine-tuning run."""
    root = tmp_path_factory.mktemp("straight")
    data = make_imagefolder(root / "tiny")
    model, dm, trainer, probe = make_run(data, root / "run", max_epochs=5)
    trainer.fit(model, datamodule=dm)
    return data, probe.groups[-1]


@pytest.mark.parametrize("stop_after", [2, 3])  # after the first unfreeze (epoch 1), after the second (epoch 2)
def test_resume_rebuilds_param_groups_by_name_with_their_state(straight_groups, tmp_path, stop_after):
    data, straight = straight_groups
    resumed_model, resumed, rprobe = resume(data, tmp_path / "resumed", stop_after, 5)
    assert len(rprobe.groups) == 5 - stop_after  # goes on from the next epoch, none repeated
    assert rprobe.groups[-1] == straight  # same names, same order, same learning rates
    opt = resumed.optimizers[0]
    by_name = {g["name"]: g for g in opt.param_groups}
    named = dict(resumed_model.named_parameters())
    assert any(p is named["backbone.layer4.0.conv1.weight"] for p in by_name["backbone.layer4"]["params"])
    assert all("momentum_buffer" in opt.state[p] for p in by_name["backbone.layer4"]["params"])
    history = next(c for c in resumed.callbacks if isinstance(c, EpochSummary)).history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]


def test_warmup_cosine_scales_groups_added_later():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "name": "head"}], lr=1.0)
    sched = WarmupCosine(opt, total_steps=10, warmup_fraction=0.2, min_factor=0.0)
    lrs = [opt.param_groups[0]["lr"]]
    for step in range(1, 10):
        if step == 5:
            v = torch.nn.Parameter(torch.zeros(1))
            opt.add_param_group({"params": [v], "lr": 0.1, "initial_lr": 0.1, "name": "backbone.x"})
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        if step >= 5:
            assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # 2 warm-up steps
    assert lrs[2] > lrs[5] > lrs[9] > 0 and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)


def test_schedule_asking_for_more_groups_than_exist_fails_before_training(tiny_data, tmp_path):
    model, dm, trainer, _ = make_run(tiny_data, tmp_path, schedule=[{"epoch": 1, "groups": 6}])
    with pytest.raises(ConfigError, match="has 5"):
        trainer.fit(model, datamodule=dm)


@pytest.mark.slow
def test_lite0_ft_reaches_093_on_hymenoptera(hymenoptera, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=lite0_ft",
        f"data.root={hymenoptera}",
        # a head-only epoch, then two with the last 2 groups training: 0.9477 measured (the whole-backbone stage
        # is covered on small images in test_resume.py; the acceptance check runs the experiment's own schedule)
        "trainer.max_epochs=3",
        "model.finetune.schedule=[{epoch: 1, groups: 2}]",
        f"hydra.run.dir={run_dir}",
        scratch=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_acc"] >= 0.93, summary["history"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    names = [g["name"] for g in ckpt["optimizer_states"][0]["param_groups"]]
    assert names == ["head", "backbone.blocks.6", "backbone.head_conv"]
