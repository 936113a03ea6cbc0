"""Measure each conv/linear layer's MACs by tracing one example through the model.

Counting by tracing rather than by reading the architecture means any model works: a layer applied to a
sequence counts every token, and a layer called twice counts both calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowbit.data.protocol import call_model, first_tensor, target_hint
from lowbit.errors import LowbitError, one_line


@dataclass(frozen=True)
class LayerInfo:
    """One nn.Conv2d / nn.Linear module as seen during one forward pass.

    Attributes:
        name: fully-qualified module name, as in ``model.named_modules()``.
        kind: ``"conv"`` or ``"linear"``.
        macs: multiply-accumulates per example, summed over every call (0 if the layer was never called).
        params: weight elements (bias excluded).
        in_shape: input shape of the first call (batch dimension included), None if never called.
        out_shape: output shape of the first call, None if never called.
        groups: conv groups (1 for linear).
        calls: how many times the layer ran in the traced forward pass.
    """

    name: str
    kind: str
    macs: int
    params: int
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    groups: int = 1
    calls: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerInfo:
        shapes = {k: None if d.get(k) is None else tuple(d[k]) for k in ("in_shape", "out_shape")}
        return cls(**{**d, **shapes})


def _macs_per_output_element(module: nn.Module) -> int:
    """MACs behind one output element: the length of the dot product that produces it.

    Conv2d: (C_in / groups) * k_h * k_w; Linear: in_features. Multiplying by the number of output
    elements gives the standard counts: conv out_h*out_w*C_out*(C_in/groups)*k_h*k_w per example, linear
    (tokens)*in_features*out_features.
    """
    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        return module.in_channels // module.groups * k_h * k_w
    return module.in_features


def profile_layers(model: nn.Module, example_input: Any) -> list[LayerInfo]:
    """Trace ``example_input`` through ``model`` and return one :class:`LayerInfo` per conv/linear module.

    Args:
        model: any module; every nn.Conv2d and nn.Linear (quantized subclasses included) is profiled.
        example_input: a tensor, a tuple of positional tensors, or a dict of keyword tensors. Its first
            tensor's leading dimension is the batch size; use batch 1 (a larger batch is divided out).

    Returns:
        Layers in the order of their first call, then never-called layers (``calls=0``, ``macs=0``) in
        ``named_modules()`` order, so that a plan built from ``named_modules()`` always matches.

    The pass runs in eval mode under ``torch.no_grad()``; every module's train/eval flag is restored.
    """
    first = first_tensor(example_input)
    if first is None or first.dim() == 0:
        raise LowbitError("example_input must contain a tensor with a leading batch dimension")
    batch = first.shape[0]
    if batch < 1:
        raise LowbitError("example_input has an empty batch; pass one example (batch size 1)")

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise LowbitError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to profile")
    total_macs: dict[str, int] = {}
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    call_order: list[str] = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name not in calls:
                call_order.append(name)
                shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))
                calls[name], total_macs[name] = 0, 0
            calls[name] += 1
            total_macs[name] += output.numel() * _macs_per_output_element(module)

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers]
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_input)
    except LowbitError:
        raise
    except Exception as e:  # the user's model and data do not fit together: one line, not a traceback
        raise LowbitError(f"the model cannot run its example input: {one_line(e)}{target_hint(example_input)}"
                          ) from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training

    by_name = dict(layers)
    out = []
    for name in call_order + [n for n, _ in layers if n not in calls]:
        m = by_name[name]
        macs, rem = divmod(total_macs.get(name, 0), batch)
        if rem:
            raise LowbitError(f"layer {name!r}: MACs are not divisible by the batch size {batch}; "
                              "pass a batch-1 example input")
        in_shape, out_shape = shapes.get(name, (None, None))
        out.append(LayerInfo(
            name=name, kind="conv" if isinstance(m, nn.Conv2d) else "linear", macs=macs,
            params=m.weight.numel(), in_shape=in_shape, out_shape=out_shape,
            groups=m.groups if isinstance(m, nn.Conv2d) else 1, calls=calls.get(name, 0),
        ))
    return out
