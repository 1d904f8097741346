"""Head structure, freezing (BatchNorm included) and what the optimizer sees, on a real Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import transforms as T

from src.callbacks.finetuning import BackboneFinetuning
from src.models.classifier import TransferClassifier
from src.models.head import build_head
from src.utils.errors import ConfigError
from tests.factories import tiny_datamodule, tiny_model, tiny_trainer

RECIPE = dict(head={"hidden_dim": 256, "dropout": 0.4}, optimizer={"name": "SGD", "lr": 0.01, "momentum": 0.9})


def resnet18_classifier(classes=("ants", "bees")) -> TransferClassifier:
    return TransferClassifier(list(classes), backbone={"name": "resnet18", "weights": None}, **RECIPE)


def test_head_is_the_recipe():
    head = build_head(2048, 5, hidden_dim=256, dropout=0.4)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.LogSoftmax]
    assert (head[0].in_features, head[0].out_features) == (2048, 256)
    assert head[2].p == 0.4
    assert (head[3].in_features, head[3].out_features) == (256, 5)
    assert head[4].dim == 1
    out = head(torch.randn(3, 2048))
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)


def test_resnet_head_replaces_fc():
    model = resnet18_classifier(["a", "b", "c"])
    assert isinstance(model.backbone.fc, nn.Identity)
    assert model.head[0].in_features == 512 and model.head[3].out_features == 3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("bad", [{"dropout": 1.0}, {"dropout": -0.1}])
def test_bad_dropout_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="dropout"):
        build_head(16, 2, **{"hidden_dim": 8, **bad})


def test_bad_optimizer_settings_are_config_errors():
    with pytest.raises(ConfigError, match="lr"):
        TransferClassifier(["a", "b"], {"name": "resnet18", "weights": None}, RECIPE["head"], {"name": "SGD", "lr": 0})
    with pytest.raises(ConfigError, match="torch.optim"):
        TransferClassifier(["a", "b"], {"name": "resnet18", "weights": None}, RECIPE["head"], {"name": "Nope", "lr": 1})


class BatchNormModeProbe(L.Callback):
    """Records whether any backbone BatchNorm was in train mode during a training step."""

    def __init__(self) -> None:
        self.bn_training_seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.bn_training_seen.append(any(m.training for m in pl_module.backbone.modules() if isinstance(m, _BatchNorm)))
        assert pl_module.head.training  # the head itself trains (dropout active)


def test_training_epoch_changes_the_head_only(tiny_data, tmp_path):
    model = tiny_model(hidden_dim=256)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # params and BN buffers
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    dm = tiny_datamodule(tiny_data, [T.Resize(64), T.CenterCrop(64)], batch_size=4)
    probe = BatchNormModeProbe()
    trainer = tiny_trainer([BackboneFinetuning(), probe], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)

    opt_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert opt_params == {id(p) for p in model.head.parameters()}
    assert probe.bn_training_seen and not any(probe.bn_training_seen)
    after = model.backbone.state_dict()
    assert any("running_mean" in k for k in after)
    for key, before in backbone_before.items():
        assert torch.equal(before, after[key]), f"backbone {key} changed"
    head_after = model.head.state_dict()
    assert all(not torch.equal(head_before[k], head_after[k]) for k in head_before if k.endswith("weight"))
    assert model.parameter_counts()["trainable_params"] == sum(p.numel() for p in model.head.parameters())


def test_checkpoint_hparams_are_plain_values(tiny_data, tmp_path):
    model = resnet18_classifier()
    dm = tiny_datamodule(tiny_data, batch_size=4)
    trainer = tiny_trainer([BackboneFinetuning()], max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # raises on anything but plain values
    hp = ckpt["hyper_parameters"]
    assert hp["class_names"] == ["ants", "bees"]
    assert hp["backbone"] == {"name": "resnet18", "weights": None}
    restored = TransferClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), restored.eval()
    assert torch.equal(model(x), restored(x))
