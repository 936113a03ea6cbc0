"""Graph capture: the eval-mode quantized model as a small dataflow graph of exportable float ops.

``torch.fx`` traces the model symbolically with quantized layers, batch norms, ReLUs and pools as leaf
modules, and every fx node is mapped to one :class:`FNode` kind. Batch norms and ReLUs that directly follow
a quantized conv/linear are folded into it (a per-channel affine ``g_c * y + h_c`` and a ``relu`` flag), so
that a producer's output is ``relu?(g_c * (s_x * s_w,c * acc + bias_c) + h_c)``, the value the exporter
requantizes once. Anything the integer format cannot express raises :class:`LowbitError` naming the layer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lowbit.errors import LowbitError
from lowbit.quant.modules import QUANT_LAYERS, QuantConv2d

# Kinds that only move or select integer values and keep the scale of their input.
TRANSPARENT = ("maxpool", "flatten", "relu", "identity")
# Kinds that produce a new integer value through one requantization.
PRODUCERS = ("input", "qlayer", "add", "avgpool")


@dataclass
class FNode:
    """One node of the captured graph.

    Attributes:
        name: the module name for module calls (``layer1.0.conv1``), the fx node name otherwise.
        kind: ``input | qlayer | add | avgpool | maxpool | flatten | relu | identity | output``.
        inputs: names of the FNodes it reads.
        module: the quantized layer (kind ``qlayer``), else None.
        attrs: kind-specific: pooling geometry, flatten's ``start_dim``.
        gain, offset: per-channel float64 affine folded in after a ``qlayer`` (batch norms), or None.
        relu: a folded ReLU (the output is clamped at 0).
        shape: output shape for the example input (batch dimension included).
        folded: names of the batch-norm and ReLU modules folded into this node.
    """

    name: str
    kind: str
    inputs: list[str]
    module: nn.Module | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    gain: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    relu: bool = False
    shape: tuple[int, ...] = ()
    folded: list[str] = field(default_factory=list)


class _Tracer(fx.Tracer):
    """Keeps quantized layers opaque (their forward holds quantizers the exporter reads directly)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QUANT_LAYERS) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (eval mode) with quantized layers as leaves."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types on data-dependent control flow
        raise LowbitError(f"cannot trace {type(model).__name__} with torch.fx for export: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return fx.GraphModule(model, graph)


def capture(model: nn.Module, example: torch.Tensor) -> list[FNode]:
    """The folded graph of ``model`` in execution order; ``example`` (float, with batch dim) fixes shapes."""
    model.eval()
    gm = trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    nodes: dict[str, FNode] = {}
    alias: dict[str, str] = {}  # fx node name -> FNode name
    for n in gm.graph.nodes:
        fn = _map_node(n, modules)
        if fn is None:  # an identity: forward its input
            alias[n.name] = alias[n.args[0].name]
            continue
        fn.inputs = [alias[a] for a in fn.inputs]
        meta = n.meta.get("tensor_meta")
        fn.shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()
        if fn.name in nodes:  # a module called twice (torchvision's shared ReLU): name each call apart
            fn.name = f"{fn.name}#{sum(1 for k in nodes if k.split('#')[0] == fn.name)}"
        alias[n.name] = fn.name
        nodes[fn.name] = fn
    _fold(nodes)
    _check_inputs(nodes)
    return list(nodes.values())


def users(nodes: list[FNode] | dict[str, FNode]) -> dict[str, list[str]]:
    """FNode name -> names of the FNodes that read it (in order)."""
    seq = nodes.values() if isinstance(nodes, dict) else nodes
    out: dict[str, list[str]] = {n.name: [] for n in seq}
    for n in seq:
        for i in n.inputs:
            out[i].append(n.name)
    return out


def _map_node(n: fx.Node, modules: dict[str, nn.Module]) -> FNode | None:
    if n.op == "placeholder":
        return FNode(n.name, "input", [])
    if n.op == "output":
        args = n.args[0]
        if not isinstance(args, fx.Node):
            raise LowbitError("the model must return one tensor (the logits), not a tuple or dict")
        return FNode("output", "output", [args.name])
    if n.op == "call_module":
        return _map_module(n, modules[n.target])
    if n.op in ("call_function", "call_method"):
        return _map_function(n)
    raise LowbitError(f"node {n.name!r} ({n.op} {n.target}) is not supported by the integer export")


def _tensor_args(n: fx.Node) -> list[str]:
    return [a.name for a in n.args if isinstance(a, fx.Node)]


def _map_module(n: fx.Node, m: nn.Module) -> FNode | None:
    name, inputs = n.target, _tensor_args(n)
    if isinstance(m, QUANT_LAYERS):
        if m.weight_quantizer is None or m.input_quantizer is None:
            which = "weight" if m.weight_quantizer is None else "input"
            raise LowbitError(f"layer {name!r} has a float {which}; the integer export needs every conv/linear "
                              f"layer quantized on weights and input (give it bits in the plan)")
        if isinstance(m, QuantConv2d) and m.padding_mode != "zeros":
            raise LowbitError(f"layer {name!r}: padding_mode {m.padding_mode!r} is not supported (only zeros)")
        if isinstance(m, QuantConv2d) and isinstance(m.padding, str):
            raise LowbitError(f"layer {name!r}: string padding {m.padding!r} is not supported; give numbers")
        return FNode(name, "qlayer", inputs, module=m)
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        raise LowbitError(f"layer {name!r} is a float {type(m).__name__}; the integer export needs every "
                          f"conv/linear layer quantized (give it bits in the plan)")
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return FNode(name, "bn", inputs, module=m)
    if isinstance(m, nn.ReLU):
        return FNode(name, "relu", inputs)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return None
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise LowbitError(f"layer {name!r}: MaxPool2d with return_indices is not supported")
        return FNode(name, "maxpool", inputs, attrs=dict(
            kernel_size=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size), padding=_pair(m.padding),
            dilation=_pair(m.dilation), ceil_mode=bool(m.ceil_mode)))
    if isinstance(m, nn.AvgPool2d):
        if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
            raise LowbitError(f"layer {name!r}: AvgPool2d needs ceil_mode=False, count_include_pad=True and no "
                              f"divisor_override (one divisor for every window)")
        k = _pair(m.kernel_size)
        return FNode(name, "avgpool", inputs, attrs=dict(kernel_size=k, stride=_pair(m.stride or k),
                                                         padding=_pair(m.padding)))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return FNode(name, "avgpool", inputs, attrs=dict(output_size=_pair_or_none(m.output_size)))
    if isinstance(m, nn.Flatten):
        if m.end_dim != -1:
            raise LowbitError(f"layer {name!r}: Flatten with end_dim={m.end_dim} is not supported (only -1)")
        return FNode(name, "flatten", inputs, attrs=dict(start_dim=m.start_dim))
    raise LowbitError(f"layer {name!r} ({type(m).__name__}) is not supported by the integer export; supported: "
                      f"quantized Conv2d/Linear, BatchNorm after them, ReLU, MaxPool2d, AvgPool2d, "
                      f"AdaptiveAvgPool2d, Flatten, residual add")


_ADD = (operator.add, operator.iadd, torch.add)
_FLATTEN = (torch.flatten, "flatten")
_RELU = (F.relu, torch.relu, "relu")


def _map_function(n: fx.Node) -> FNode:
    target, inputs = n.target, _tensor_args(n)
    where = f"operation {n.name!r} ({getattr(target, '__name__', target)})"
    if target in _ADD:
        if len(inputs) != 2 or len(n.args) != 2 or n.kwargs:
            raise LowbitError(f"{where}: only the sum of two tensors (a residual add) is supported")
        return FNode(n.name, "add", inputs)
    if target in _FLATTEN:
        start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
        end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
        if end != -1:
            raise LowbitError(f"{where}: flatten with end_dim={end} is not supported (only -1)")
        return FNode(n.name, "flatten", inputs[:1], attrs=dict(start_dim=int(start)))
    if target in _RELU:
        return FNode(n.name, "relu", inputs[:1])
    raise LowbitError(f"{where} is not supported by the integer export")


def _fold(nodes: dict[str, FNode]) -> None:
    """Fold each BatchNorm into the quantized layer before it, and ReLUs into the producer before them."""
    for name in list(nodes):
        n = nodes.get(name)
        if n is None or n.kind not in ("bn", "relu"):
            continue
        src = nodes[n.inputs[0]]
        readers = users(nodes)[src.name]
        if n.kind == "bn":
            if src.kind != "qlayer" or len(readers) != 1 or src.relu:
                raise LowbitError(f"batch norm {name!r} cannot be folded: it must directly follow a quantized "
                                  f"conv/linear layer whose output nothing else reads (found {src.kind} "
                                  f"{src.name!r})")
            g, h = _bn_affine(n.module, name)
            src.gain = g if src.gain is None else src.gain * g
            src.offset = h if src.offset is None else src.offset * g + h
        elif src.kind in ("qlayer", "add", "avgpool") and len(readers) == 1:
            src.relu = True
        else:
            continue  # a standalone ReLU (after a pool, or on a value read twice) stays a node
        src.folded.append(name)
        src.shape = n.shape
        for other in nodes.values():
            other.inputs = [src.name if i == name else i for i in other.inputs]
        del nodes[name]


def _bn_affine(bn: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``g * y + h`` per channel (float64): g = γ/σ, h = β - γμ/σ."""
    if bn.running_mean is None or bn.running_var is None:
        raise LowbitError(f"batch norm {name!r} has no running statistics (track_running_stats=False)")
    sigma = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sigma)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(sigma)
    g = gamma / sigma
    return g, beta - g * bn.running_mean.double()


def _check_inputs(nodes: dict[str, FNode]) -> None:
    inputs = [n for n in nodes.values() if n.kind == "input"]
    if len(inputs) != 1:
        raise LowbitError(f"the model must take exactly one input tensor, found {len(inputs)}")


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def _pair_or_none(v: Any) -> list[int | None]:
    return [v, v] if v is None or isinstance(v, int) else [v[0], v[1]]
