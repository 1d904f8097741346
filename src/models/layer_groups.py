"""A backbone's layer groups, input to output: the units that fine-tuning unfreezes."""

from __future__ import annotations

from torch import nn

from src.utils.errors import ConfigError


def layer_groups(name: str, backbone: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(group name, modules) pairs from the input side to the output side.

    - torchvision ResNet family: stem (conv1, bn1), layer1 … layer4;
    - efficientnet_lite0 (timm): stem (conv_stem, bn1), blocks.0 … blocks.6, head_conv (conv_head, bn2);
    - other torchvision models with a ``features`` Sequential (EfficientNet, MobileNet, ConvNeXt, VGG):
      features.0 … features.N.
    """
    if all(hasattr(backbone, a) for a in ("conv1", "bn1", "layer1", "layer4")):
        groups = [("stem", [backbone.conv1, backbone.bn1])]
        return groups + [(f"layer{i}", [getattr(backbone, f"layer{i}")]) for i in range(1, 5)]
    if all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        groups = [("stem", [backbone.conv_stem, backbone.bn1])]
        groups += [(f"blocks.{i}", [block]) for i, block in enumerate(backbone.blocks)]
        return groups + [("head_conv", [backbone.conv_head, backbone.bn2])]
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Sequential):
        return [(f"features.{i}", [m]) for i, m in enumerate(features)]
    raise ConfigError(
        f"No layer groups known for backbone {name!r}: fine-tune a ResNet, efficientnet_lite0, or a "
        "torchvision model with a `features` Sequential."
    )
