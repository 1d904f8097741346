"""A backbone's layer groups, input to output: the units that fine-tuning unfreezes.

A group is a name and the modules whose parameters it holds. Parameters that sit directly on a module with
children (ViT's class token and position embedding) are gathered into a ``ParameterSet``, a childless module
of their own, so Lightning's BaseFinetuning can freeze and unfreeze them like any layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from src.models.modes import eval_mode
from src.utils.errors import ConfigError


class ParameterSet(nn.Module):
    """Parameters of a module that also has children, as a childless module (they stay owned by the model:
    this only names them for BaseFinetuning's freeze/unfreeze)."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        for name, param in named:
            self.register_parameter(name.replace(".", "__"), param)


def layer_groups(name: str, backbone: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(group name, modules) pairs from the input side to the output side; every parameter in exactly one.

    - ResNet family (torchvision, timm): stem (conv1, bn1), layer1 … layer4;
    - timm EfficientNet family (efficientnet_lite0/2): stem, blocks.0 … blocks.N, head_conv (conv_head, bn2);
    - other timm models: timm's own ``group_matcher`` (fine-grained), named by the parameters' common prefix;
    - other torchvision models: their top-level layers in order, a Sequential/ModuleList (``features``,
      ``encoder.layers``) or a module holding most of the parameters opened into its parts.
    """
    if all(hasattr(backbone, a) for a in ("conv1", "bn1", "layer1", "layer4")):
        groups = [("stem", [backbone.conv1, backbone.bn1])]
        return groups + [(f"layer{i}", [getattr(backbone, f"layer{i}")]) for i in range(1, 5)]
    if all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        groups = [("stem", [backbone.conv_stem, backbone.bn1])]
        groups += [(f"blocks.{i}", [block]) for i, block in enumerate(backbone.blocks)]
        return groups + [("head_conv", [backbone.conv_head, backbone.bn2])]
    if hasattr(backbone, "group_matcher") and hasattr(backbone, "pretrained_cfg"):  # a timm model
        named = timm_parameter_groups(backbone)
    else:
        total = sum(p.numel() for p in backbone.parameters())
        named = split_into_parts(backbone, "", total)
    if not named:
        raise ConfigError(f"Backbone {name!r} has no parameters to group for fine-tuning.")
    return [(group, modules_holding(backbone, params)) for group, params in unique_names(named)]


Stage = Callable[[torch.Tensor], torch.Tensor]


def group_stages(backbone: nn.Module) -> list[Stage] | None:
    """The backbone's forward as one callable per layer group (the same groups as ``layer_groups``), then the
    pooling tail: composing them all is ``backbone(x)``. What runs below a fine-tuning stage's trainable
    groups can then be computed once (src.callbacks.feature_cache). None where the layout is not known (the
    caller checks the composition numerically anyway: ``stages_match``)."""
    b = backbone
    if all(hasattr(b, a) for a in ("conv1", "bn1", "maxpool", "layer1", "layer4")):
        act = getattr(b, "relu", None) or getattr(b, "act1", None)  # torchvision | timm
        if act is None:
            return None
        stages: list[Stage] = [lambda x: b.maxpool(act(b.bn1(b.conv1(x))))]
        stages += [getattr(b, f"layer{i}") for i in range(1, 5)]
        if hasattr(b, "forward_head"):  # timm: global pool, dropout, classifier (reset to identity)
            return [*stages, b.forward_head]
        return [*stages, lambda x: b.fc(torch.flatten(b.avgpool(x), 1))]
    if all(hasattr(b, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        stages = [lambda x: b.bn1(b.conv_stem(x)), *b.blocks]
        return [*stages, lambda x: b.bn2(b.conv_head(x)), b.forward_head]
    return None


def stages_match(backbone: nn.Module, stages: list[Stage], size: int = 64) -> bool:
    """True when the stages composed give the backbone's own output on a random image (eval mode, no grad;
    every module's mode put back)."""
    param = next(backbone.parameters())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    with eval_mode(backbone), torch.no_grad():
        expected = backbone(x)
        out = x
        for stage in stages:
            out = stage(out)
    return out.shape == expected.shape and torch.allclose(out, expected, rtol=1e-4, atol=1e-5)


def timm_parameter_groups(backbone: nn.Module) -> list[tuple[str, list[str]]]:
    """timm's fine-grained layer groups (``group_matcher(coarse=False)``), in order, as parameter names."""
    from timm.models import group_parameters

    grouped = group_parameters(backbone, backbone.group_matcher(coarse=False))
    return [(group_name(params), params) for params in grouped.values()]


def split_into_parts(
    module: nn.Module, prefix: str, total: int, in_container: bool = False
) -> list[tuple[str, list[str]]]:
    """Parameter names grouped by ``module``'s children in order. A container (Sequential, ModuleList) is
    opened into its elements, which stay whole (``features.3``, not its layers); a module holding more than
    half of the backbone's parameters (ViT's encoder) is opened too, unless it is a container's element. The
    module's own parameters join the next group."""
    groups: list[tuple[str, list[str]]] = []
    pending = [prefix + n for n, _ in module.named_parameters(recurse=False)]
    for child_name, child in module.named_children():
        count = sum(p.numel() for p in child.parameters())
        if count == 0:
            continue
        path = prefix + child_name
        container = isinstance(child, nn.Sequential | nn.ModuleList | nn.ModuleDict)
        if not in_container and (container or count > total / 2):
            parts = split_into_parts(child, path + ".", total, in_container=container)
        else:
            parts = [(path, [f"{path}.{n}" for n, _ in child.named_parameters()])]
        if pending and parts:
            parts[0] = (parts[0][0], pending + parts[0][1])
            pending = []
        groups += parts
    if pending:
        groups.append((prefix.rstrip(".") or "stem", pending))
    return groups


def modules_holding(backbone: nn.Module, params: list[str]) -> list[nn.Module]:
    """The childless modules that own ``params``; parameters of modules with children in a ParameterSet."""
    owners: dict[int, nn.Module] = {}
    loose: list[tuple[str, nn.Parameter]] = []
    for full in params:
        path, _, leaf = full.rpartition(".")
        owner = backbone.get_submodule(path) if path else backbone
        if next(owner.children(), None) is None:
            owners.setdefault(id(owner), owner)
        else:
            loose.append((full, getattr(owner, leaf)))
    return list(owners.values()) + ([ParameterSet(loose)] if loose else [])


def group_name(params: list[str]) -> str:
    """A group's name from its parameters: their common module path, per top-level part (``blocks.11+norm``);
    the whole path when the group is one module's."""
    parts: dict[str, list[str]] = {}
    for name in params:
        parts.setdefault(name.split(".")[0], []).append(name)
    return "+".join(common_prefix(names) or top for top, names in parts.items())


def common_prefix(names: list[str]) -> str:
    """The dotted path all ``names`` share, without the parameter's own name (``stages.1.blocks.0``)."""
    split = [n.split(".")[:-1] for n in names]
    shared: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        shared.append(parts[0])
    return ".".join(shared)


def unique_names(named: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Group names made unique (param groups are named after them) by a counter suffix."""
    seen: dict[str, int] = {}
    out = []
    for name, params in named:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", params))
    return out
