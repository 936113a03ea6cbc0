"""Model registry: our small models by name, torchvision (``tv:``) and timm (``timm:``) models by prefix.

No weights are ever downloaded: torchvision/timm models are built with random initialisation; trained weights
come from lowbit checkpoints or a local ``--weights`` file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.resnet import MLP, ResNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


@register_model
def resnet8(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> nn.Module:
    """ResNet-8: 1 block per stage, ~78k parameters at width 1."""
    return ResNet(1, num_classes, in_channels, width)


@register_model
def resnet14(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> nn.Module:
    """ResNet-14: 2 blocks per stage, ~175k parameters at width 1."""
    return ResNet(2, num_classes, in_channels, width)


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> nn.Module:
    """ResNet-20: 3 blocks per stage, ~272k parameters at width 1."""
    return ResNet(3, num_classes, in_channels, width)


@register_model
def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 256) -> nn.Module:
    """Two hidden layers of 256 units."""
    return MLP(num_classes, in_channels, image_size, hidden)


def list_models(include_external: bool = True) -> list[str]:
    names = sorted(_REGISTRY)
    if include_external:
        try:
            import torchvision  # noqa: F401

            names.append("tv:<torchvision classification model>")
        except ImportError:
            pass
        try:
            import timm  # noqa: F401

            names.append("timm:<timm model>")
        except ImportError:
            pass
    return names


def model_help(name: str) -> str:
    fn = _REGISTRY[name]
    return (inspect.getdoc(fn) or "").splitlines()[0]


def create_model(name: str, num_classes: int = 10, **kw) -> nn.Module:
    """Build a model by registry name (``resnet8``), ``tv:<name>`` or ``timm:<name>``; random init."""
    if name.startswith("tv:"):
        return _torchvision_model(name[3:], num_classes, **kw)
    if name.startswith("timm:"):
        return _timm_model(name[5:], num_classes, **kw)
    if name not in _REGISTRY:
        raise LowbitError(f"unknown model {name!r}; choose one of {', '.join(sorted(_REGISTRY))} "
                          f"or tv:<torchvision name> / timm:<timm name>")
    fn = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kw) - set(params))
    if unknown:
        raise LowbitError(f"model {name!r} takes no option(s) {', '.join(unknown)}; "
                          f"it takes {', '.join(p for p in params if p != 'num_classes')}")
    return fn(num_classes=num_classes, **kw)


def _torchvision_model(arch: str, num_classes: int, in_channels: int = 3, **kw) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise LowbitError(f"model 'tv:{arch}' needs torchvision: pip install 'lowbit[vision]'") from None
    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise LowbitError(f"torchvision has no model {arch!r}; see torchvision.models.list_models()") from None
    model = builder(weights=None, num_classes=num_classes, **kw)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _timm_model(arch: str, num_classes: int, in_channels: int = 3, **kw) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise LowbitError(f"model 'timm:{arch}' needs timm: pip install 'lowbit[timm]'") from None
    if arch not in timm.list_models():
        raise LowbitError(f"timm has no model {arch!r}; see timm.list_models()")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d so a 3-channel torchvision model accepts ``in_channels`` inputs."""
    for parent in model.modules():
        for cname, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, cname, nn.Conv2d(in_channels, child.out_channels, child.kernel_size,
                                                 child.stride, child.padding, child.dilation, child.groups,
                                                 child.bias is not None))
                return
