"""Model registry: our small models by name, torchvision (``tv:``) and timm (``timm:``) models by prefix.

No weights are ever downloaded: torchvision/timm models are built with random initialisation; trained weights
come from lowbit checkpoints or a local ``--weights`` file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.resnet import MLP, ResNet
from lowbit.plugins import call_factory, is_import_path

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


def check_model_name(name: str) -> str:
    """``name`` if it names a model at all; checked before the data-dependent options are worked out."""
    if not (is_import_path(name) or name.startswith(("tv:", "timm:")) or name in _REGISTRY):
        raise LowbitError(f"unknown model {name!r}; choose one of {', '.join(sorted(_REGISTRY))}, "
                          f"tv:<torchvision name>, timm:<timm name> or your own package.module:factory")
    return name


def create_model(name: str, num_classes: int | None = 10, **kw) -> nn.Module:
    """Build a model by registry name (``resnet8``), ``tv:<name>``, ``timm:<name>`` or the user's own factory.

    A factory is ``package.module:function`` or ``file.py:function`` (any callable returning an nn.Module,
    a class too) and is called with ``kw`` only: it knows its own classes and inputs. Registry, torchvision
    and timm models start from random init.
    """
    if is_import_path(name):
        return user_model(name, kw)
    if name.startswith("tv:"):
        return _prefers_channels_last(_torchvision_model(name[3:], num_classes, **kw))
    if name.startswith("timm:"):
        return _prefers_channels_last(_timm_model(name[5:], num_classes, **kw))
    fn = _REGISTRY[check_model_name(name)]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kw) - set(params))
    if unknown:
        raise LowbitError(f"model {name!r} takes no option(s) {', '.join(unknown)}; "
                          f"it takes {', '.join(p for p in params if p != 'num_classes')}")
    return fn(num_classes=num_classes, **kw)


def user_model(path: str, kwargs: dict | None = None) -> nn.Module:
    """``factory(**kwargs)`` from the user's code; anything but an nn.Module is one error line."""
    model = call_factory(path, "model factory", kwargs)
    if not isinstance(model, nn.Module):
        raise LowbitError(f"model factory {path!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _prefers_channels_last(model: nn.Module) -> nn.Module:
    model.prefers_channels_last = True  # CNNs built by name: NHWC convs are faster on CPU
    return model


def _torchvision_model(arch: str, num_classes: int, in_channels: int = 3, **kw) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise LowbitError(f"model 'tv:{arch}' needs torchvision: pip install 'lowbit[vision]'") from None
    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise LowbitError(f"torchvision has no model {arch!r}; see torchvision.models.list_models()") from None
    try:
        model = builder(weights=None, num_classes=num_classes, **kw)
    except (TypeError, ValueError) as e:  # an option the builder does not take (e.g. --width)
        raise LowbitError(f"torchvision model {arch!r} rejects option(s) {', '.join(kw) or 'given'}: "
                          f"{str(e).splitlines()[0]}") from None
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _timm_model(arch: str, num_classes: int, in_channels: int = 3, **kw) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise LowbitError(f"model 'timm:{arch}' needs timm: pip install 'lowbit[timm]'") from None
    if not timm.is_model(arch):
        raise LowbitError(f"timm has no model {arch!r}; see timm.list_models()")
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)
    except TypeError as e:
        raise LowbitError(f"timm model {arch!r} rejects option(s) {', '.join(kw) or 'given'}: "
                          f"{str(e).splitlines()[0]}") from None


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give a 3-channel model's stem conv ``in_channels`` inputs (e.g. 1 for Fashion-MNIST).

    The stem is the first Conv2d in module order. Its kernel is folded the way timm adapts pretrained stems
    (summed over RGB for one channel, else RGB cycled and scaled by 3/in_channels), which keeps the
    initialisation's output scale.
    """
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.groups != 1:
        raise LowbitError(f"cannot adapt the model to {in_channels} input channels: its first layer is not a "
                          f"plain Conv2d; use 3-channel data")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        w = conv.weight  # out, 3, kh, kw
        if in_channels == 1:
            new.weight.copy_(w.sum(1, keepdim=True))
        else:
            reps = -(-in_channels // w.shape[1])
            new.weight.copy_(w.repeat(1, reps, 1, 1)[:, :in_channels] * (w.shape[1] / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
