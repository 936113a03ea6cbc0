"""Graph capture: the eval-mode quantized model as a small dataflow graph of exportable float ops.

``torch.fx`` traces the model symbolically with quantized layers, batch norms, ReLUs and pools as leaf
modules, and every fx node is mapped to one or two :class:`FNode` kinds. The traced graph is run twice, on a
batch of one and of two examples: the first run gives every value's shape and the values of size arithmetic
(``x.size(0)``, ``x.shape[2:]``), the second proves that every tensor keeps the batch as its first dimension,
so a reshape written with sizes taken from the tensor (``x.view(x.size(0), -1)``) is recognised by what it
does, a flatten of trailing dimensions, not by how it is spelled.

Batch norms and clamps (ReLU, ReLU6, hardtanh, clamp) that directly follow a quantized conv/linear are folded
into it (a per-channel affine ``g_c * y + h_c`` and clamp bounds), so that a producer's output is
``clamp(g_c * (s_x * s_w,c * acc + bias_c) + h_c, lo, hi)``, the value the exporter requantizes once. A
:class:`~lowbit.quant.QuantAct` (an activation quantizer of its own, e.g. on the residual stream) is a leaf too,
a producer of its quantizer's codes (kind ``qact``); nothing folds into it (it is not a conv, and a clamp after it
acts on its codes, after their rounding).
Anything the integer format cannot express raises one-line :class:`LowbitError` naming the op and the
user's source line.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.errors import LowbitError, first_line
from lowbit.quant.modules import QUANT_LAYERS, QuantAct, QuantConv2d, QuantLinear

# Kinds that only move or select integer values and keep the scale of their input.
TRANSPARENT = ("maxpool", "flatten", "relu", "clamp", "upsample", "identity")
# Kinds that produce a new integer value through one requantization (``qact``: a QuantAct's codes, made by its
# input's producer where it can, else by one requantize node).
PRODUCERS = ("input", "qlayer", "qact", "add", "avgpool")
# Kinds that join several values of one scale (along channels) without arithmetic.
JOINS = ("concat",)


@dataclass
class FNode:
    """One node of the captured graph.

    Attributes:
        name: the module name for module calls (``layer1.0.conv1``), the fx node name otherwise.
        kind: ``input | qlayer | qact | add | avgpool | maxpool | flatten | relu | clamp | upsample | concat |
            output``.
        inputs: names of the FNodes it reads.
        module: the quantized layer (kind ``qlayer``) or the QuantAct (kind ``qact``), else None.
        attrs: kind-specific: pooling geometry, flatten's ``start_dim``, clamp's ``min``/``max``,
            upsampling's integer ``scale``.
        gain, offset: per-channel float64 affine folded in after a ``qlayer`` (batch norms), or None.
        bounds: ``(min, max)`` of folded clamps in real units (None: unbounded on that side), or None.
        shape: output shape for the example input (batch dimension included).
        folded: names of the batch-norm and clamp modules folded into this node.
        where: the user's source line that made it (`` (at file.py:12: x = ...)``), or "".
    """

    name: str
    kind: str
    inputs: list[str]
    module: nn.Module | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    gain: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    bounds: tuple[float | None, float | None] | None = None
    shape: tuple[int, ...] = ()
    folded: list[str] = field(default_factory=list)
    where: str = ""


class _Tracer(fx.Tracer):
    """Keeps quantized layers opaque (their forward holds quantizers the exporter reads directly) and records
    each node's stack, so that errors can quote the user's line."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*QUANT_LAYERS, QuantAct)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (eval mode) with quantized layers as leaves."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types on data-dependent control flow
        raise LowbitError(f"cannot trace {type(model).__name__} with torch.fx for export: "
                          f"{first_line(e)}") from None
    return fx.GraphModule(model, graph)


class _Stop(Exception):
    """The batch-of-two run failed at a node (reported when capture reaches that node)."""


class _Run(fx.Interpreter):
    """Runs the traced model once, keeping every tensor's shape and every other value (size arithmetic).

    ``strict``: a failure is the user's error at once; else (the batch-of-two run) the run stops and ``error``
    keeps the failing node, so that a node that moved the batch dimension before it is the one reported."""

    def __init__(self, gm: fx.GraphModule, strict: bool = True):
        super().__init__(gm)
        self.strict = strict
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.values: dict[str, Any] = {}
        self.error = ""

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except (LowbitError, _Stop):
            raise
        except Exception as e:  # the user's forward failing on the example shape
            if not self.strict:
                self.error = first_line(e)
                raise _Stop from None
            raise LowbitError(f"the model fails on an example input at {_describe(n)}: {first_line(e)}"
                              f"{where(n)}") from None
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        else:
            self.values[n.name] = out
        return out


@dataclass
class _Ctx:
    """What mapping an fx node needs: the modules and the two example runs (batch 1 and batch 2)."""

    modules: dict[str, nn.Module]
    one: _Run
    two: _Run

    def is_tensor(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a.name in self.one.shapes

    def shape(self, a: fx.Node | str) -> tuple[int, ...]:
        return self.one.shapes[a if isinstance(a, str) else a.name]

    def static(self, a: Any, what: str, n: fx.Node) -> Any:
        """``a`` with size-arithmetic nodes replaced by their values; refused if a value depends on the batch."""
        if isinstance(a, (list, tuple)):
            return type(a)(self.static(v, what, n) for v in a) if not isinstance(a, torch.Size) else tuple(a)
        if not isinstance(a, fx.Node):
            return a
        if self.is_tensor(a):
            raise LowbitError(f"{_describe(n)}: {what} must be a number, not a tensor")
        v1, v2 = self.one.values[a.name], self.two.values.get(a.name, self.one.values[a.name])
        if v1 != v2:
            raise LowbitError(f"{_describe(n)}: {what} depends on the batch size ({v1} for one example, "
                              f"{v2} for two)")
        return tuple(v1) if isinstance(v1, torch.Size) else v1


def capture(model: nn.Module, example: torch.Tensor) -> list[FNode]:
    """The folded graph of ``model`` in execution order; ``example`` (float, batch of one) fixes shapes."""
    model.eval()
    gm = trace(model)
    ctx = _Ctx(dict(gm.named_modules()), _Run(gm), _Run(gm, strict=False))
    with torch.no_grad():
        ctx.one.run(example)
        try:
            ctx.two.run(torch.cat([example, example]))
        except _Stop:
            pass
    nodes: dict[str, FNode] = {}
    alias: dict[str, str] = {}  # fx node name (or a chained FNode's name) -> FNode name
    for n in gm.graph.nodes:
        try:
            if n.op == "get_attr":
                raise LowbitError(f"the model reads its tensor {n.target!r} directly (a parameter or buffer used "
                                  f"outside a layer), which the integer export does not support")
            if n.op != "output" and not ctx.is_tensor(n):
                _check_size_value(n)  # x.size(0), x.shape[2:] ...: read by the ops that take them, no node
                continue
            fns = _map_node(n, ctx)
            if n.op != "output":
                _check_batch(n, ctx)
        except LowbitError as e:
            raise LowbitError(f"{e}{where(n)}") from None
        if fns is None:  # an identity: forward its input
            alias[n.name] = alias[_tensor_args(n, ctx)[0]]
            continue
        for fn in fns if isinstance(fns, list) else [fns]:
            fn.inputs = [alias[a] for a in fn.inputs]
            fn.where = fn.where or where(n)
            if not fn.shape and n.op != "output":
                fn.shape = ctx.shape(n)
            if fn.name in nodes:  # a module called twice (torchvision's shared ReLU): name each call apart
                fn.name = f"{fn.name}#{sum(1 for k in nodes if k.split('#')[0] == fn.name)}"
            alias[fn.name] = alias[n.name] = fn.name
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


# ------------------------------------------------------------------------------------------ source lines
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')
_TORCH_DIR = os.path.dirname(torch.__file__)


def where(n: fx.Node) -> str:
    """`` (at file.py:12: x = F.gelu(x))``: the innermost frame of the user's code that made ``n``, or ""."""
    frames = [f for f in _FRAME.findall(n.stack_trace or "") if not f[0].startswith(_TORCH_DIR)]
    if not frames:
        return ""
    path, line, code = frames[-1]
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        rel = path
    return f" (at {rel if not rel.startswith('..') else path}:{line}: {code.strip()})"


def _describe(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"layer {n.target!r}"
    if n.op == "call_method":
        return f"method .{n.target}() ({n.name!r})"
    return f"operation {getattr(n.target, '__name__', str(n.target))} ({n.name!r})"


# ---------------------------------------------------------------------------------------------- mapping
_SIZE_METHODS = ("size", "dim", "numel")
_SIZE_FUNCTIONS = (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg,
                   len)


def _check_size_value(n: fx.Node) -> None:
    """Non-tensor values may only be sizes and arithmetic on them (they become constants or shapes)."""
    ok = (n.op == "call_method" and n.target in _SIZE_METHODS) or \
        (n.op == "call_function" and (n.target in _SIZE_FUNCTIONS or
                                      (n.target is getattr and n.args[1] in ("shape", "ndim"))))
    if not ok:
        raise LowbitError(f"{_describe(n)} is not supported by the integer export (it does not give "
                          f"one tensor)")


def _check_batch(n: fx.Node, ctx: _Ctx) -> None:
    if n.name not in ctx.two.shapes:
        raise LowbitError(f"{_describe(n)} fails on a batch of two examples ({ctx.two.error}); the export needs a "
                          f"model that runs on any batch size")
    s1, s2 = ctx.one.shapes[n.name], ctx.two.shapes[n.name]
    if not s1 or s1[0] != 1 or s2 != (2, *s1[1:]):
        raise LowbitError(f"{_describe(n)} moves the batch dimension: its output is {list(s1)} for one "
                          f"example and {list(s2)} for two; keep the batch first, with sizes taken from the tensor "
                          f"(x.view(x.size(0), -1), x.flatten(1), squeeze with explicit dims)")


def _map_node(n: fx.Node, ctx: _Ctx) -> FNode | list[FNode] | None:
    if n.op == "placeholder":
        return FNode(n.name, "input", [])
    if n.op == "output":
        args = n.args[0]
        if not ctx.is_tensor(args):
            raise LowbitError("the model must return one tensor (the logits), not a tuple or dict")
        return FNode("output", "output", [args.name])
    if n.op == "call_module":
        return _map_module(n, ctx.modules[n.target], ctx)
    if n.op in ("call_function", "call_method"):
        return _map_function(n, ctx)
    raise LowbitError(f"node {n.name!r} ({n.op} {n.target}) is not supported by the integer export")


def _tensor_args(n: fx.Node, ctx: _Ctx) -> list[str]:
    """Names of the tensors ``n`` reads, in order (looking into lists, as ``torch.cat`` takes them)."""
    out = []
    for a in [*n.args, *n.kwargs.values()]:
        for v in a if isinstance(a, (list, tuple)) else [a]:
            if ctx.is_tensor(v):
                out.append(v.name)
    return out


def _map_module(n: fx.Node, m: nn.Module, ctx: _Ctx) -> FNode | list[FNode] | None:
    name, inputs = n.target, _tensor_args(n, ctx)
    if isinstance(m, QUANT_LAYERS):
        if m.weight_quantizer is None or m.input_quantizer is None:
            which = "weight" if m.weight_quantizer is None else "input"
            raise LowbitError(f"layer {name!r} has a float {which}; the integer export needs every conv/linear "
                              f"layer quantized on weights and input (give it bits in the plan)")
        if isinstance(m, QuantConv2d) and m.padding_mode != "zeros":
            raise LowbitError(f"layer {name!r}: padding_mode {m.padding_mode!r} is not supported (only zeros)")
        if isinstance(m, QuantConv2d) and isinstance(m.padding, str):
            raise LowbitError(f"layer {name!r}: string padding {m.padding!r} is not supported; give numbers")
        if isinstance(m, QuantLinear) and len(ctx.shape(inputs[0])) != 2:
            raise LowbitError(f"layer {name!r} reads a {len(ctx.shape(inputs[0]))}-D tensor; the integer "
                              f"export runs linear layers on (batch, features): flatten first")
        return FNode(name, "qlayer", inputs, module=m)
    if isinstance(m, QuantAct):
        if m.input_quantizer is None:
            raise LowbitError(f"activation quantizer {name!r} has no quantizer (bits None); remove it or give it bits")
        return FNode(name, "qact", inputs, module=m)
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        raise LowbitError(f"layer {name!r} is a float {type(m).__name__}; the integer export needs every "
                          f"conv/linear layer quantized (give it bits in the plan)")
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return FNode(name, "bn", inputs, module=m)
    if isinstance(m, nn.ReLU):
        return FNode(name, "relu", inputs)
    if isinstance(m, nn.Hardtanh):  # ReLU6 too
        return _clamp(name, inputs, m.min_val, m.max_val)
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
        return None
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise LowbitError(f"layer {name!r}: MaxPool2d with return_indices is not supported")
        return _maxpool(name, inputs, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if isinstance(m, nn.AvgPool2d):
        return _avgpool(f"layer {name!r}", name, inputs, ctx.shape(inputs[0]), m.kernel_size, m.stride,
                        m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return FNode(name, "avgpool", inputs, attrs=dict(output_size=_pair_or_none(m.output_size)))
    if isinstance(m, nn.Flatten):
        return _reshape(f"layer {name!r}", name, inputs[0], n, ctx)
    if isinstance(m, nn.Upsample):
        return _upsample(f"layer {name!r}", name, inputs[0], n, ctx, m.mode, m)
    raise LowbitError(f"layer {name!r} ({type(m).__name__}) is not supported by the integer export (it supports "
                      f"{_SUPPORTED})")


_SUPPORTED = ("quantized Conv2d (grouped, depthwise)/Linear, QuantAct, BatchNorm after them, ReLU/ReLU6/hardtanh/"
              "clamp, max/average/adaptive average pooling, mean over H and W, flatten/view/reshape of trailing dims, "
              "torch.cat along channels, residual add, nearest upsampling by integer factors")

_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
_RELU = (F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_")
_HARDTANH = (F.hardtanh, F.hardtanh_)
_CLAMP = (torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, "clamp", "clamp_", "clip", "clip_",
          "clamp_min", "clamp_min_", "clamp_max", "clamp_max_")
_MAXPOOL = (F.max_pool2d, torch.max_pool2d)
_AVGPOOL = (F.avg_pool2d,)
_ADAPTIVE = (F.adaptive_avg_pool2d,)
_MEAN = (torch.mean, "mean")
_RESHAPE = (torch.flatten, torch.reshape, torch.squeeze, "flatten", "view", "reshape", "squeeze", "squeeze_")
_CAT = (torch.cat, torch.concat, torch.concatenate)
_UPSAMPLE = (F.interpolate, F.upsample, F.upsample_nearest)
_DROPOUT = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
_IDENTITY = ("contiguous", "clone", "detach", "float")


def _bind(n: fx.Node, params: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of ``n`` by parameter name (the first one is the input tensor)."""
    out = dict(defaults)
    out.update(zip(params, n.args))
    out.update(n.kwargs)
    return out


def _map_function(n: fx.Node, ctx: _Ctx) -> FNode | list[FNode] | None:
    target, inputs = n.target, _tensor_args(n, ctx)
    what = _describe(n)

    def static(a: Any, arg: str) -> Any:
        return ctx.static(a, arg, n)

    if target in _ADD:
        if len(inputs) != 2 or len(n.args) != 2 or n.kwargs:
            raise LowbitError(f"{what}: only the sum of two tensors (a residual add) is supported")
        if ctx.shape(inputs[0]) != ctx.shape(inputs[1]):
            raise LowbitError(f"{what}: adds shapes {list(ctx.shape(inputs[0]))} and {list(ctx.shape(inputs[1]))}; "
                              f"only same-shape (residual) adds are supported, no broadcasting")
        return FNode(n.name, "add", inputs)
    if target in _RELU:
        return FNode(n.name, "relu", inputs[:1])
    if target is F.relu6:
        return _clamp(n.name, inputs[:1], 0.0, 6.0)
    if target in _HARDTANH:
        a = _bind(n, ("input", "min_val", "max_val"), {"min_val": -1.0, "max_val": 1.0})
        return _clamp(n.name, inputs[:1], static(a["min_val"], "min_val"), static(a["max_val"], "max_val"), what)
    if target in _CLAMP:
        if len(inputs) != 1:
            raise LowbitError(f"{what}: clamp bounds must be numbers, not tensors")
        one_sided = {torch.clamp_min: "min", "clamp_min": "min", "clamp_min_": "min", torch.clamp_max: "max",
                     "clamp_max": "max", "clamp_max_": "max"}.get(target)
        a = _bind(n, ("input", one_sided) if one_sided else ("input", "min", "max"), {"min": None, "max": None})
        return _clamp(n.name, inputs, static(a["min"], "min"), static(a["max"], "max"), what)
    if target in _MAXPOOL:
        a = _bind(n, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                  {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
        a = {k: static(v, k) for k, v in a.items() if k != "input"}
        if a["return_indices"]:
            raise LowbitError(f"{what}: max_pool2d with return_indices is not supported")
        return _maxpool(n.name, inputs, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    if target in _AVGPOOL:
        a = _bind(n, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                      "divisor_override"), {"stride": None, "padding": 0, "ceil_mode": False,
                                            "count_include_pad": True, "divisor_override": None})
        a = {k: static(v, k) for k, v in a.items() if k != "input"}
        return _avgpool(what, n.name, inputs, ctx.shape(inputs[0]), a["kernel_size"], a["stride"], a["padding"],
                        a["ceil_mode"], a["count_include_pad"], a["divisor_override"])
    if target in _ADAPTIVE:
        size = static(_bind(n, ("input", "output_size"), {})["output_size"], "output_size")
        return FNode(n.name, "avgpool", inputs, attrs=dict(output_size=_pair_or_none(size)))
    if target in _MEAN:
        return _mean(what, n, inputs, ctx)
    if target in _RESHAPE:
        return _reshape(what, n.name, inputs[0], n, ctx)
    if target in _CAT:
        a = _bind(n, ("tensors", "dim"), {"dim": 0})
        dim, rank = static(a["dim"], "dim"), len(ctx.shape(inputs[0]))
        if len(inputs) != len(a["tensors"]) or dim % rank != 1:
            raise LowbitError(f"{what}: only concatenating tensors along the channel dimension (dim=1) is "
                              f"supported, got dim={dim}")
        return FNode(n.name, "concat", inputs) if len(inputs) > 1 else None
    if target in _UPSAMPLE:
        a = _bind(n, ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                      "antialias"), {"mode": "nearest"})
        kwargs = {k: static(v, k) for k, v in a.items() if k != "input"}
        if target is F.upsample_nearest:
            kwargs["mode"] = "nearest"
        return _upsample(what, n.name, inputs[0], n, ctx, kwargs["mode"],
                         lambda t: F.interpolate(t, **kwargs))
    if target in _DROPOUT:
        a = _bind(n, ("input", "p", "training"), {"training": True})
        if static(a["training"], "training"):
            raise LowbitError(f"{what}: dropout with training=True drops values even in eval mode; pass "
                              f"training=self.training")
        return None
    if target in _IDENTITY and n.op == "call_method" and len(n.args) == 1 and not n.kwargs:
        return None
    raise LowbitError(f"{what} is not supported by the integer export (it supports {_SUPPORTED})")


def _clamp(name: str, inputs: list[str], lo: Any, hi: Any, what: str = "") -> FNode:
    """A clamp to ``[lo, hi]`` in real units (None: unbounded); ``relu`` when it is exactly ``max(x, 0)``."""
    for v in (lo, hi):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise LowbitError(f"{what or name}: clamp bounds must be finite numbers, got {v!r}")
    lo, hi = (None if v is None else float(v) for v in (lo, hi))
    if lo is not None and hi is not None and lo > hi:
        raise LowbitError(f"{what or name}: clamp with min {lo} > max {hi}")
    if lo == 0.0 and hi is None:
        return FNode(name, "relu", inputs)
    return FNode(name, "clamp", inputs, attrs={"min": lo, "max": hi})


def _maxpool(name: str, inputs: list[str], kernel: Any, stride: Any, padding: Any, dilation: Any,
             ceil_mode: bool) -> FNode:
    k = _pair(kernel)
    return FNode(name, "maxpool", inputs, attrs=dict(
        kernel_size=k, stride=_pair(stride) if stride else k, padding=_pair(padding), dilation=_pair(dilation),
        ceil_mode=bool(ceil_mode)))


def _avgpool(what: str, name: str, inputs: list[str], in_shape: tuple[int, ...], kernel: Any, stride: Any,
             padding: Any, ceil_mode: bool, count_include_pad: bool, divisor: int | None) -> FNode:
    """Average pooling with one divisor for every window: ``count_include_pad`` (or no padding) and windows
    that ``ceil_mode`` does not change. ``divisor`` (``divisor_override``) replaces the window size."""
    k = _pair(kernel)
    s, p = (_pair(stride) if stride else k), _pair(padding)
    if ceil_mode and any((size + 2 * pp - kk) % ss for size, kk, ss, pp in zip(in_shape[-2:], k, s, p)):
        raise LowbitError(f"{what}: avg_pool2d with ceil_mode=True makes partial windows here (input "
                          f"{list(in_shape[-2:])}, kernel {k}, stride {s}, padding {p}), each with its own divisor; "
                          f"use ceil_mode=False or sizes that divide evenly")
    if not count_include_pad and any(p):
        raise LowbitError(f"{what}: avg_pool2d with count_include_pad=False and padding {p} divides border windows "
                          f"by fewer elements; one requantization needs one divisor (use count_include_pad=True)")
    attrs: dict[str, Any] = dict(kernel_size=k, stride=s, padding=p)
    if divisor:
        attrs["divisor"] = int(divisor)
    return FNode(name, "avgpool", inputs, attrs=attrs)


def _mean(what: str, n: fx.Node, inputs: list[str], ctx: _Ctx) -> list[FNode]:
    """``x.mean((2, 3))`` (any spelling of the last two dims of an NCHW tensor): a global average pool, then a
    flatten unless ``keepdim``."""
    a = _bind(n, ("input", "dim", "keepdim", "dtype"), {"dim": None, "keepdim": False, "dtype": None})
    dims, keep = ctx.static(a["dim"], "dim", n), ctx.static(a["keepdim"], "keepdim", n)
    shape = ctx.shape(inputs[0])
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if len(shape) != 4 or sorted(d % 4 for d in dims) != [2, 3] or a["dtype"] is not None:
        raise LowbitError(f"{what}: only the mean over the spatial dims of an NCHW tensor (x.mean((2, 3)), "
                          f"x.mean(dim=(-2, -1))) is supported, got dim={a['dim']} of a {len(shape)}-D tensor")
    pool = FNode(n.name, "avgpool", inputs, attrs=dict(output_size=[1, 1]), shape=(*shape[:2], 1, 1))
    if keep:
        return [pool]
    return [pool, FNode(f"{n.name}.flatten", "flatten", [n.name], attrs=dict(start_dim=1))]


def _reshape(what: str, name: str, x: str, n: fx.Node, ctx: _Ctx) -> FNode | None:
    """A view/reshape/flatten/squeeze recognised by its shapes: none, or a flatten of trailing dims."""
    s_in, s_out = ctx.shape(x), ctx.shape(n)
    if s_out == s_in:
        return None
    for d in range(1, len(s_in)):
        if s_out == (*s_in[:d], math.prod(s_in[d:])):
            return FNode(name, "flatten", [x], attrs=dict(start_dim=d))
    raise LowbitError(f"{what} reshapes {list(s_in)} to {list(s_out)}; only flattening trailing dimensions "
                      f"(x.view(x.size(0), -1), x.flatten(1)) is supported")


def _upsample(what: str, name: str, x: str, n: fx.Node, ctx: _Ctx, mode: str,
              call: Callable[[torch.Tensor], torch.Tensor]) -> FNode:
    """Nearest upsampling by integer factors: checked by running the user's own call on a map of positions."""
    s_in, s_out = ctx.shape(x), ctx.shape(n)
    if mode not in ("nearest", "nearest-exact") or len(s_in) != 4:
        raise LowbitError(f"{what}: only nearest upsampling of NCHW tensors is supported, got mode {mode!r} on a "
                          f"{len(s_in)}-D tensor")
    (h, w), (ho, wo) = s_in[2:], s_out[2:]
    if ho % h or wo % w:
        raise LowbitError(f"{what}: upsampling {h}x{w} to {ho}x{wo} is not by integer factors")
    sh, sw = ho // h, wo // w
    pos = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    with torch.no_grad():
        got = call(pos)
    if not torch.equal(got, pos.repeat_interleave(sh, -2).repeat_interleave(sw, -1)):
        raise LowbitError(f"{what}: this upsampling does not repeat each pixel {sh}x{sw} times")
    return FNode(name, "upsample", [x], attrs=dict(scale=[sh, sw]))


# --------------------------------------------------------------------------------------------- folding
def _fold(nodes: dict[str, FNode]) -> None:
    """Fold each BatchNorm into the quantized layer before it, and clamps into the producer before them."""
    for name in list(nodes):
        n = nodes.get(name)
        if n is None or n.kind not in ("bn", "relu", "clamp"):
            continue
        src = nodes[n.inputs[0]]
        readers = users(nodes)[src.name]
        if n.kind == "bn":
            if src.kind != "qlayer" or len(readers) != 1 or src.bounds is not None:
                raise LowbitError(f"batch norm {name!r} cannot be folded: it must directly follow a quantized "
                                  f"conv/linear layer whose output nothing else reads (found {src.kind} "
                                  f"{src.name!r}){n.where}")
            g, h = _bn_affine(n.module, name)
            src.gain = g if src.gain is None else src.gain * g
            src.offset = h if src.offset is None else src.offset * g + h
        else:
            bounds = (0.0, None) if n.kind == "relu" else (n.attrs["min"], n.attrs["max"])
            merged = _intersect(src.bounds, bounds)
            if src.kind not in ("qlayer", "add", "avgpool") or len(readers) != 1 or merged is None:
                continue  # a standalone clamp (after a pool or a concat, or on a value read twice) stays a node
            src.bounds = merged
        src.folded.append(name)
        src.shape = n.shape
        for other in nodes.values():
            other.inputs = [src.name if i == name else i for i in other.inputs]
        del nodes[name]


def _intersect(a: tuple | None, b: tuple) -> tuple[float | None, float | None] | None:
    """Bounds of ``clamp(clamp(x, *a), *b)`` as one clamp, or None where they do not overlap."""
    if a is None:
        return b
    lo = max((v for v in (a[0], b[0]) if v is not None), default=None)
    hi = min((v for v in (a[1], b[1]) if v is not None), default=None)
    return None if lo is not None and hi is not None and lo > hi else (lo, hi)


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
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[-1])]


def _pair_or_none(v: Any) -> list[int | None]:
    return [v, v] if v is None or isinstance(v, int) else [v[0], v[1]]
