"""The op table: every op of the integer IR, registered once with its schema, validation and shape rule.

An op is a name plus an :class:`OpSpec`: how many inputs it takes, the attribute keys and tensor roles a node
must carry, a ``check`` that validates a node's attributes and decoded tensors (so a bad file fails at load,
not mid-run) and a ``shape`` rule that runs the node on meta tensors. What each op *computes* is the
reference backend's kernel (:mod:`lowbit.runtime.engine`); other backends register their own kernels against
this table (:mod:`lowbit.ir.kernels`).

=================== =======================================================================================
op                  computes (``rq`` = ``clamp(round_half_even((v*m + b) * 2^-k), lo, hi)``)
=================== =======================================================================================
quantize_input      uint8 pixels: ``lut[c, p]``; float input: ``clamp(round_half_even(x / scale), lo, hi)``
                    in float32, exactly as the model's input quantizer
conv2d / linear     ``rq(sum(x * w))`` with per-output-channel ``m, k, b`` (BN, bias and ReLU folded in)
conv2d_add          ``clamp(round_half_even((sum(x * w)*m + b + r*m_r) * 2^-k), lo, hi)``: a conv and the residual
                    add of ``r`` (its second input) rounded once; per-channel ``m, k, b, m_r``
requantize          ``rq(x)`` with per-tensor ``m, k, b``
add                 ``clamp(round_half_even((a*m_a + b*m_b + bias) * 2^-shift), lo, hi)``
relu / maxpool2d    ``max(x, 0)`` / window maxima (zero point 0: order and sign are those of the reals)
clamp               ``clamp(x, lo, hi)`` (ReLU6, hardtanh: real bounds rounded to codes; rounding is monotone)
avgpool2d           ``rq(window sum)`` (zero padding counted); adaptive_avgpool: even windows only
flatten             reshape (trailing dims from ``start_dim`` into one)
concat              ``cat(x_1, ..., x_n)`` along ``axis`` 1 (inputs of one scale)
upsample_nearest    each value repeated ``scale[0] x scale[1]`` times (nearest upsampling by integer factors)
dequantize_output   ``float32(x * scale)``: the only float operation after the input
=================== =======================================================================================

Encoders (format version 2) mix integer nodes with float *glue*; every node is marked ``"domain": "int"`` or
``"float"`` in the manifest (its output's domain, checked at load against the op's rule):

=================== ===== =================================================================================
op                  out   computes
=================== ===== =================================================================================
quantize            int   ``clamp(round_half_even(x / scale), lo, hi)`` in float32, exactly as an LSQ quantizer
linear              int   as above, on ``(..., K)`` codes (the requantization is per output channel, last axis)
matmul              int   ``rq(a @ b)`` of two code tensors ``(..., M, K) x (..., K, N)``, per-tensor ``m, k, b``
dequantize          float ``float32(float64(x) * scale)`` (a power-of-two ``scale``: exact, one rounding)
embedding           float ``weight[ids]`` (token ids, int64 input)
constant            float a stored float32 tensor (a folded subgraph, e.g. position embeddings), no input
binary              float ``a fn b`` (``fn``: add, sub, mul, div) with broadcasting, or ``x fn scalar``
layer_norm          float ``F.layer_norm`` over the last ``weight.dim()`` dims, float32
softmax / gelu      float ``torch.softmax(x, dim)`` / ``F.gelu(x, approximate)``, float32
tanh                float ``torch.tanh(x)``
float_linear        float ``F.linear(x, weight, bias)`` in float32 (a layer the plan left float)
float_matmul        float ``torch.matmul(a, b)`` in float32 (attention products left float)
attention_mask      float ``where(mask != 0, 0, fill)`` as ``(N, 1, 1, T)`` or ``(N, 1, T, T)`` (``square``)
reshape             same  ``x.reshape(N, *shape)`` (the batch dimension is kept)
transpose / select  same  ``x.transpose(dim0, dim1)`` / ``x.select(dim, index)`` (never the batch dim)
slice               same  ``x[..., start:end:step]`` along ``dim`` (never the batch dim)
=================== ===== =================================================================================

Float glue is computed by the reference backend with the ATen operator the traced model called, in float32,
so a backend or simulation that calls the same operator on the same values gets the same bits.

Adding an op: :func:`register_op` here (or from a plugin), emit it in the lowering, and register one kernel
per backend that runs it (a backend without one falls back to the reference kernel or refuses the file with
the op's name).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.ir.dyadic import BIAS_LIMIT, INT32_MAX, INT32_MIN, MAX_SHIFT, PRODUCT_LIMIT, SUM_LIMIT

if TYPE_CHECKING:
    from lowbit.ir.graph import Graph, Node

Params = dict[str, torch.Tensor]
CheckFn = Callable[["Node", Params, "Graph"], None]
ShapeFn = Callable[["Node", Params, list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class OpSpec:
    """What a node of this op must look like and how its output shape follows from its inputs.

    ``arity``: number of inputs (at least ``arity`` when ``variadic``); ``attrs``/``params``: required attribute
    keys and tensor roles; ``check``: validation of the node's values (raises :class:`LowbitError`);
    ``shape``: the output on the meta device; ``moves_values``: the output holds input values moved or
    selected, in the input's representation (relu and clamp narrow its range); ``domain``: what the output
    holds, ``"int"`` (codes, integer values, token ids), ``"float"`` (float32 glue) or ``"same"`` (the first
    input's); ``takes``: the domain every input must have (None: not checked).
    """

    arity: int
    attrs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    variadic: bool = False
    check: CheckFn | None = None
    shape: ShapeFn | None = None
    moves_values: bool = False
    domain: str = "int"
    takes: str | None = None


OPS: dict[str, OpSpec] = {}
FLOAT32_EXACT = 2**24  # float32 holds every integer of at most this magnitude


def register_op(name: str, spec: OpSpec) -> None:
    """Make ``name`` a known op; re-registering a name is an error (an op is defined in one place)."""
    if name in OPS:
        raise LowbitError(f"op {name!r} is already registered")
    OPS[name] = spec


def unregister_op(name: str) -> None:
    """Remove an op registered by :func:`register_op` (tests and plugins that add one temporarily)."""
    OPS.pop(name, None)


def op_spec(name: str) -> OpSpec:
    """The spec of ``name``, or a :class:`LowbitError` listing the known ops."""
    if name not in OPS:
        raise LowbitError(f"unknown op {name!r} (known: {', '.join(OPS)})")
    return OPS[name]


# ------------------------------------------------------------------------------------------- validation
def int_attr(a: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """``a[key]`` as an int in ``[lo, hi]``, else a :class:`LowbitError` naming it."""
    v = a.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise LowbitError(f"attribute {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _check_range(a: dict[str, Any]) -> None:
    lo, hi = int_attr(a, "lo", INT32_MIN, INT32_MAX), int_attr(a, "hi", INT32_MIN, INT32_MAX)
    if lo > hi:
        raise LowbitError(f"empty output range lo={lo} > hi={hi}")


def _check_scale(a: dict[str, Any], what: str) -> None:
    s = a["scale"]
    if not (isinstance(s, float) and math.isfinite(s) and s > 0):
        raise LowbitError(f"{what} scale must be a positive number, got {s!r}")


def _check_requant_tensors(p: Params, channels: int) -> None:
    for role, dtype in (("multiplier", torch.int32), ("shift", torch.int8), ("bias", torch.int64)):
        t = p[role]
        if t.dtype != dtype or list(t.shape) != [channels]:
            raise LowbitError(f"{role} must be {str(dtype).removeprefix('torch.')} of shape [{channels}], "
                              f"got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
    if int(p["shift"].min()) < 0 or int(p["shift"].max()) > MAX_SHIFT:
        raise LowbitError(f"shift must be in [0, {MAX_SHIFT}]")
    if int(p["multiplier"].min()) == INT32_MIN:
        raise LowbitError("multiplier -2^31 is out of range")
    if int(p["bias"].min()) < -BIAS_LIMIT or int(p["bias"].max()) > BIAS_LIMIT:
        raise LowbitError("bias must be in [-2^61, 2^61] (fixed-point units; beyond, int64 could overflow)")


def _check_requant_attrs(node: Node, p: Params, graph: Graph) -> None:
    a = node.attrs
    _check_range(a)
    int_attr(a, "multiplier", INT32_MIN + 1, INT32_MAX)
    int_attr(a, "shift", 0, MAX_SHIFT)
    int_attr(a, "bias", -(2**61), 2**61)
    _check_product(_terms(node, graph) * _bound(graph, node.inputs[0]), abs(a["multiplier"]))


def _bound(graph: Graph, value: str) -> int:
    """The largest ``|v|`` the declared range of ``value`` allows."""
    lo, hi = graph.ranges[value]
    return max(-lo, hi)


def _terms(node: Node, graph: Graph) -> int:
    """How many input values (times the second input's bound, for matmul) one accumulator of a scalar-requantized
    op sums: 1 for requantize, the window for the pools, the shared dimension for matmul."""
    a, shape = node.attrs, graph.shapes[node.inputs[0]]
    if node.op == "avgpool2d":
        k = a["kernel_size"]
        return math.prod([k, k] if type(k) is int else k)
    if node.op == "adaptive_avgpool":
        return math.prod(-(-n // o) for n, o in zip(shape[-2:], a["output_size"], strict=True))
    if node.op == "matmul":
        return shape[-1] * _bound(graph, node.inputs[1])
    return 1


def _check_product(acc: int, multiplier: int) -> None:
    """``|acc|·|m| < 2^62`` for every accumulator the inputs' declared ranges allow, as the runtimes require of the
    values they meet: refused at load rather than mid-run."""
    if acc * multiplier >= PRODUCT_LIMIT:
        raise LowbitError(f"|acc|·|multiplier| may reach 2^{math.log2(acc * multiplier):.2f} over the inputs' "
                          "declared ranges: int64 could overflow (limit 2^62)")


def _layer_acc(node: Node, p: Params, graph: Graph) -> int:
    """The largest ``|acc|`` of a conv or linear layer: its output channel's ``sum |w|`` times the input's bound."""
    w = p["weight"]
    return int(w.to(torch.int64).abs().flatten(1).sum(1).max()) * _bound(graph, node.inputs[0]) if w.numel() else 0


def _check_float_range(a: dict[str, Any]) -> None:
    """A quantizer of float values clamps in float32 (as the model's): ``lo``, ``hi`` must be exact there, else
    ``hi = 2^31 - 1`` rounds to ``2^31`` and wraps in int32."""
    _check_range(a)
    if not -FLOAT32_EXACT <= a["lo"] <= a["hi"] <= FLOAT32_EXACT:
        raise LowbitError(f"a float quantizer's range [{a['lo']}, {a['hi']}] must lie within [-2^24, 2^24] "
                          f"(it is clamped in float32)")


def _check_quantize_input(node: Node, p: Params, graph: Graph) -> None:
    a, spec = node.attrs, graph.input_spec
    _check_range(a)
    if spec.get("dtype") == "uint8":
        lut = p.get("lut")
        if lut is None or lut.dtype != torch.int16 or list(lut.shape) != [spec["shape"][0], 256]:
            raise LowbitError(f"uint8 input needs an int16 'lut' of shape [{spec['shape'][0]}, 256]")
        if int(lut.min()) < a["lo"] or int(lut.max()) > a["hi"]:
            raise LowbitError("lookup table codes fall outside [lo, hi]")
    else:
        if "lut" in p:  # backends would disagree on whether to index it with float values or quantize them
            raise LowbitError("a lookup table 'lut' maps uint8 pixels; this model's input is not uint8")
        _check_scale(a, "input")
        _check_float_range(a)


def _check_pair(a: dict[str, Any], key: str, least: int) -> None:
    """``a[key]``: an integer or a list of two, each in ``[least, 2^31 - 1]``."""
    v = a[key]
    vs = [v, v] if type(v) is int else v
    if not (isinstance(vs, list) and len(vs) == 2 and all(type(x) is int and least <= x <= INT32_MAX for x in vs)):
        raise LowbitError(f"attribute {key!r} must be an integer or two integers >= {least}, got {v!r}")


def _check_layer(node: Node, p: Params, graph: Graph) -> None:
    a = node.attrs
    _check_range(a)
    if node.op != "linear":  # torch's shape rule accepts padding < 0 and dilation 0, which then fail in the run
        for key, least in (("stride", 1), ("padding", 0), ("dilation", 1)):
            _check_pair(a, key, least)
        int_attr(a, "groups", 1, INT32_MAX)
    w, bits = p["weight"], a["w_bits"]
    entry = graph.entries[node.params["weight"]]
    if entry.get("bits") != bits or entry.get("signed") is not True:
        raise LowbitError(f"weight must be packed as signed {bits}-bit codes (w_bits), found "
                          f"{entry.get('bits')}-bit {'signed' if entry.get('signed') else 'unsigned'}")
    dims = 2 if node.op == "linear" else 4
    if w.dim() != dims:
        raise LowbitError(f"weight must be {dims}-D, got shape {list(w.shape)}")
    lo_w, hi_w = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if w.numel() and (int(w.min()) < lo_w or int(w.max()) > hi_w):
        raise LowbitError(f"weight codes exceed the {bits}-bit range")
    _check_requant_tensors(p, w.shape[0])
    if node.op != "conv2d_add":  # its residual sum is bounded as a whole (_check_conv_add)
        _check_product(_layer_acc(node, p, graph), int(p["multiplier"].abs().max()) if w.shape[0] else 0)


def _check_conv_add(node: Node, p: Params, graph: Graph) -> None:
    _check_layer(node, p, graph)
    c, t = p["weight"].shape[0], p["residual_multiplier"]
    if t.dtype != torch.int32 or list(t.shape) != [c]:
        dtype = str(t.dtype).removeprefix("torch.")
        raise LowbitError(f"residual_multiplier must be int32 of shape [{c}], got {dtype} {list(t.shape)}")
    if c and int(t.min()) == INT32_MIN:
        raise LowbitError("residual multiplier -2^31 is out of range")
    if c:  # |acc*m + b + r*m_r| below 2^63 - 2^61, as requantize_sum requires (room for the rounding)
        bound = (_layer_acc(node, p, graph) * int(p["multiplier"].abs().max()) + int(p["bias"].abs().max())
                 + _bound(graph, node.inputs[1]) * int(t.abs().max()))
        if bound >= SUM_LIMIT:
            raise LowbitError(f"|acc*m + b + r*m_r| may reach 2^{math.log2(bound):.2f} over the inputs' declared "
                              "ranges: int64 could overflow (limit 2^63 - 2^61)")


def _check_add(node: Node, p: Params, graph: Graph) -> None:
    """Also bounds ``|a*m_a + b*m_b + bias|`` over the inputs' declared ranges below ``2^63 - 2^61``, so the sum
    and its rounding never wrap int64 in any backend."""
    a = node.attrs
    _check_range(a)
    for key in ("multiplier_a", "multiplier_b"):
        int_attr(a, key, INT32_MIN + 1, INT32_MAX)
    int_attr(a, "shift", 0, MAX_SHIFT)
    int_attr(a, "bias", -(2**61), 2**61)
    (lo_a, hi_a), (lo_b, hi_b) = (graph.ranges[v] for v in node.inputs)
    bound = (max(-lo_a, hi_a) * abs(a["multiplier_a"]) + max(-lo_b, hi_b) * abs(a["multiplier_b"])
             + abs(a["bias"]))
    if bound >= SUM_LIMIT:
        raise LowbitError(f"|a*m_a + b*m_b + bias| may reach 2^{math.log2(bound):.2f} over the inputs' ranges "
                          f"[{lo_a}, {hi_a}] and [{lo_b}, {hi_b}]: int64 could overflow (limit 2^63 - 2^61)")


def _check_concat(node: Node, p: Params, graph: Graph) -> None:
    """Also requires ``[lo, hi]`` to cover every input's range: concat moves values unchanged, and backends store
    its output in the form its declared range allows."""
    _check_range(node.attrs)
    if node.attrs["axis"] != 1:
        raise LowbitError(f"concat runs along axis 1 (channels), got axis {node.attrs['axis']!r}")
    lo, hi = node.attrs["lo"], node.attrs["hi"]
    for v in node.inputs:
        r = graph.ranges[v]
        if not lo <= r[0] <= r[1] <= hi:
            raise LowbitError(f"range [{lo}, {hi}] does not cover input {v!r}'s range [{r[0]}, {r[1]}]")


def _check_adaptive(node: Node, p: Params, graph: Graph) -> None:
    s = node.attrs["output_size"]
    if not (isinstance(s, list) and len(s) == 2 and all(type(v) is int and v >= 1 for v in s)):
        raise LowbitError(f"output_size must be two positive integers, got {s!r}")
    _check_requant_attrs(node, p, graph)


def _check_upsample(node: Node, p: Params, graph: Graph) -> None:
    s = node.attrs["scale"]
    if not (isinstance(s, list) and len(s) == 2 and all(type(v) is int and v >= 1 for v in s)):
        raise LowbitError(f"upsampling scale must be two positive integers, got {s!r}")


# ------------------------------------------------------------------------------------------------ shapes
def _same(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(xs[0])


def _conv_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    w = torch.empty(p["weight"].shape, device="meta")
    return F.conv2d(xs[0], w, None, a["stride"], a["padding"], a["dilation"], a["groups"])


def _conv_add_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    out = _conv_shape(node, p, xs)
    if xs[1].shape != out.shape:
        raise LowbitError(f"the residual {list(xs[1].shape)} differs from the conv's output {list(out.shape)}")
    return out


def _linear_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    if xs[0].dim() < 2:
        raise LowbitError(f"linear needs a (batch, ..., features) input, got {xs[0].dim()}-D")
    return F.linear(xs[0].float(), torch.empty(p["weight"].shape, device="meta"))


def _add_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    if xs[0].shape != xs[1].shape:
        raise LowbitError(f"adds shapes {list(xs[0].shape)} and {list(xs[1].shape)}")
    return torch.empty_like(xs[0])


def _maxpool_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return F.max_pool2d(xs[0], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])


def _avgpool_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return F.avg_pool2d(xs[0], a["kernel_size"], a["stride"], a["padding"])


def _adaptive_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    x, (oh, ow) = xs[0], node.attrs["output_size"]
    if x.dim() != 4 or x.shape[-2] % oh or x.shape[-1] % ow:
        raise LowbitError(f"output size {node.attrs['output_size']} does not divide the input {list(x.shape)}")
    return F.adaptive_avg_pool2d(x, (oh, ow))


def _upsample_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    x, (sh, sw) = xs[0], node.attrs["scale"]
    if x.dim() != 4:
        raise LowbitError(f"upsampling needs an NCHW input, got {x.dim()}-D")
    return x.new_empty((*x.shape[:2], x.shape[2] * sh, x.shape[3] * sw))


_REQUANT = ("multiplier", "shift", "bias", "lo", "hi")
_LAYER = ("weight", "multiplier", "shift", "bias")  # per-channel requantization tensors

for _name, _spec in {
    "quantize_input": OpSpec(1, attrs=("bits", "signed", "scale", "lo", "hi"), check=_check_quantize_input,
                             shape=_same),
    "conv2d": OpSpec(1, attrs=("stride", "padding", "dilation", "groups", "w_bits", "lo", "hi"), params=_LAYER,
                     check=_check_layer, shape=_conv_shape),
    "linear": OpSpec(1, attrs=("w_bits", "lo", "hi"), params=_LAYER, check=_check_layer, shape=_linear_shape),
    "conv2d_add": OpSpec(2, attrs=("stride", "padding", "dilation", "groups", "w_bits", "lo", "hi"),
                         params=(*_LAYER, "residual_multiplier"), check=_check_conv_add, shape=_conv_add_shape),
    "requantize": OpSpec(1, attrs=_REQUANT, check=_check_requant_attrs, shape=_same),
    "add": OpSpec(2, attrs=("multiplier_a", "multiplier_b", "shift", "bias", "lo", "hi"), check=_check_add,
                  shape=_add_shape),
    "relu": OpSpec(1, shape=_same, moves_values=True),
    "clamp": OpSpec(1, attrs=("lo", "hi"), check=lambda n, p, g: _check_range(n.attrs), shape=_same,
                    moves_values=True),
    "maxpool2d": OpSpec(1, attrs=("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                        shape=_maxpool_shape, moves_values=True),
    "avgpool2d": OpSpec(1, attrs=("kernel_size", "stride", "padding", *_REQUANT), check=_check_requant_attrs,
                        shape=_avgpool_shape),
    "adaptive_avgpool": OpSpec(1, attrs=("output_size", *_REQUANT), check=_check_adaptive,
                               shape=_adaptive_shape),
    "flatten": OpSpec(1, attrs=("start_dim",), shape=lambda n, p, xs: torch.flatten(xs[0], n.attrs["start_dim"]),
                      moves_values=True),
    "concat": OpSpec(2, attrs=("axis", "lo", "hi"), variadic=True, check=_check_concat,
                     shape=lambda n, p, xs: torch.cat(xs, dim=1)),
    "upsample_nearest": OpSpec(1, attrs=("scale",), check=_check_upsample, shape=_upsample_shape,
                               moves_values=True),
    "dequantize_output": OpSpec(1, attrs=("scale",), check=lambda n, p, g: _check_scale(n.attrs, "output"),
                                shape=_same, moves_values=True),
}.items():
    register_op(_name, _spec)


IMAGE_OPS = tuple(OPS)  # what image (CNN) graphs are made of

# ------------------------------------------------------------------------------------- encoder ops (v2)
BINARY_FNS = ("add", "sub", "mul", "div")
GELU_APPROXIMATIONS = ("none", "tanh")


def _float_tensor(p: Params, role: str, dims: int | None = None) -> torch.Tensor:
    t = p[role]
    if t.dtype != torch.float32 or (dims is not None and t.dim() != dims):
        raise LowbitError(f"{role} must be a float32 tensor{f' of {dims} dims' if dims else ''}, got "
                          f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise LowbitError(f"{role} holds non-finite values")
    return t


def _check_quantize(node: Node, p: Params, graph: Graph) -> None:
    _check_float_range(node.attrs)
    _check_scale(node.attrs, "quantize")


def _check_dequantize(node: Node, p: Params, graph: Graph) -> None:
    _check_scale(node.attrs, "dequantize")


def _check_matmul(node: Node, p: Params, graph: Graph) -> None:
    _check_requant_attrs(node, p, graph)


def _check_binary(node: Node, p: Params, graph: Graph) -> None:
    a = node.attrs
    if a["fn"] not in BINARY_FNS:
        raise LowbitError(f"binary fn must be one of {', '.join(BINARY_FNS)}, got {a['fn']!r}")
    if len(node.inputs) == 1:
        v = a.get("scalar")
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise LowbitError(f"binary with one input needs a finite 'scalar', got {v!r}")
    elif len(node.inputs) != 2:
        raise LowbitError(f"binary takes one or two inputs, got {len(node.inputs)}")


def _check_layer_norm(node: Node, p: Params, graph: Graph) -> None:
    w, b = _float_tensor(p, "weight"), _float_tensor(p, "bias")
    if w.shape != b.shape:
        raise LowbitError(f"layer_norm weight {list(w.shape)} and bias {list(b.shape)} differ")
    eps = node.attrs["eps"]
    if not (isinstance(eps, float) and math.isfinite(eps) and eps >= 0):
        raise LowbitError(f"layer_norm eps must be a non-negative number, got {eps!r}")


def _check_gelu(node: Node, p: Params, graph: Graph) -> None:
    if node.attrs["approximate"] not in GELU_APPROXIMATIONS:
        raise LowbitError(f"gelu approximate must be one of {GELU_APPROXIMATIONS}, got {node.attrs['approximate']!r}")


def _check_float_linear(node: Node, p: Params, graph: Graph) -> None:
    w = _float_tensor(p, "weight", 2)
    if "bias" in p and list(_float_tensor(p, "bias", 1).shape) != [w.shape[0]]:
        raise LowbitError(f"float_linear bias must have {w.shape[0]} values")


def _check_mask(node: Node, p: Params, graph: Graph) -> None:
    fill = node.attrs["fill"]
    if not (isinstance(fill, float) and math.isfinite(fill)) or not isinstance(node.attrs["square"], bool):
        raise LowbitError(f"attention_mask needs a finite float 'fill' and a boolean 'square', got "
                          f"{fill!r}, {node.attrs['square']!r}")


def _not_batch(dim: Any, rank: int, what: str) -> int:
    if type(dim) is not int or not -rank <= dim < rank or dim % rank == 0:
        raise LowbitError(f"{what} must be a dimension other than the batch (0) of a {rank}-D value, got {dim!r}")
    return dim % rank


def _embedding_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    w = _float_tensor(p, "weight", 2)
    return F.embedding(xs[0].long(), torch.empty(w.shape, device="meta"))


def _binary_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    out = torch.broadcast_shapes(*(x.shape for x in xs))
    if len(xs) == 2 and out != xs[0].shape and out != xs[1].shape:
        raise LowbitError(f"broadcasts {list(xs[0].shape)} and {list(xs[1].shape)} to a third shape")
    return torch.empty(out, device="meta")


def _layer_norm_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    shape = list(p["weight"].shape)
    if list(xs[0].shape[-len(shape):]) != shape:
        raise LowbitError(f"normalizes the trailing dims {shape} of a {list(xs[0].shape)} value")
    return torch.empty_like(xs[0], dtype=torch.float32)


def _reshape_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    shape = node.attrs["shape"]
    if not (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape)):
        raise LowbitError(f"reshape needs positive integer sizes (batch excluded), got {shape!r}")
    if math.prod(shape) != math.prod(xs[0].shape[1:]):
        raise LowbitError(f"cannot reshape {list(xs[0].shape[1:])} to {shape}")
    return xs[0].new_empty((xs[0].shape[0], *shape))


def _transpose_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    r = xs[0].dim()
    a, b = (_not_batch(node.attrs[k], r, k) for k in ("dim0", "dim1"))
    return xs[0].transpose(a, b)


def _select_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    d = _not_batch(node.attrs["dim"], xs[0].dim(), "select dim")
    i = node.attrs["index"]
    if type(i) is not int or not -xs[0].shape[d] <= i < xs[0].shape[d]:
        raise LowbitError(f"select index {i!r} is out of range for size {xs[0].shape[d]}")
    return xs[0].select(d, i)


def _slice_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    d = _not_batch(a["dim"], xs[0].dim(), "slice dim")
    if not all(type(a[k]) is int for k in ("start", "end", "step")) or a["step"] < 1:
        raise LowbitError(f"slice needs integer start/end and a positive step, got {a['start']!r}:{a['end']!r}:"
                          f"{a['step']!r}")
    return xs[0].narrow(d, 0, len(range(*slice(a["start"], a["end"], a["step"]).indices(xs[0].shape[d]))))


def _matmul_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.matmul(xs[0].float(), xs[1].float())


def _float_linear_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return F.linear(xs[0].float(), torch.empty(p["weight"].shape, device="meta"))


def _mask_shape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    if xs[0].dim() != 2:
        raise LowbitError(f"attention_mask reads a (batch, tokens) mask, got {xs[0].dim()}-D")
    n, t = xs[0].shape
    return torch.empty((n, 1, t if node.attrs["square"] else 1, t), device="meta")


def _as(dtype: torch.dtype) -> ShapeFn:
    return lambda n, p, xs: torch.empty_like(xs[0], dtype=dtype)


for _name, _spec in {
    "quantize": OpSpec(1, attrs=("bits", "signed", "scale", "lo", "hi"), check=_check_quantize,
                       shape=_as(torch.int32), takes="float"),
    "dequantize": OpSpec(1, attrs=("scale",), check=_check_dequantize, shape=_as(torch.float32), domain="float",
                         takes="int"),
    "matmul": OpSpec(2, attrs=_REQUANT, check=_check_matmul, shape=lambda n, p, xs: _matmul_shape(n, p, xs).int(),
                     takes="int"),
    "embedding": OpSpec(1, params=("weight",), shape=_embedding_shape, domain="float", takes="int"),
    "constant": OpSpec(0, params=("value",), check=lambda n, p, g: _float_tensor(p, "value") is None,
                       shape=lambda n, p, xs: torch.empty(p["value"].shape, device="meta"), domain="float"),
    "binary": OpSpec(1, attrs=("fn",), variadic=True, check=_check_binary, shape=_binary_shape, domain="float",
                     takes="float"),
    "layer_norm": OpSpec(1, attrs=("eps",), params=("weight", "bias"), check=_check_layer_norm,
                         shape=_layer_norm_shape, domain="float", takes="float"),
    "softmax": OpSpec(1, attrs=("dim",), shape=lambda n, p, xs: torch.softmax(xs[0], n.attrs["dim"]),
                      domain="float", takes="float"),
    "gelu": OpSpec(1, attrs=("approximate",), check=_check_gelu, shape=_same, domain="float", takes="float"),
    "tanh": OpSpec(1, shape=_same, domain="float", takes="float"),
    "float_linear": OpSpec(1, params=("weight",), check=_check_float_linear, shape=_float_linear_shape,
                           domain="float", takes="float"),
    "float_matmul": OpSpec(2, shape=_matmul_shape, domain="float", takes="float"),
    "attention_mask": OpSpec(1, attrs=("fill", "square"), check=_check_mask, shape=_mask_shape, domain="float",
                             takes="int"),
    "reshape": OpSpec(1, attrs=("shape",), shape=_reshape_shape, moves_values=True, domain="same"),
    "transpose": OpSpec(1, attrs=("dim0", "dim1"), shape=_transpose_shape, moves_values=True, domain="same"),
    "select": OpSpec(1, attrs=("dim", "index"), shape=_select_shape, moves_values=True, domain="same"),
    "slice": OpSpec(1, attrs=("dim", "start", "end", "step"), shape=_slice_shape, moves_values=True,
                    domain="same"),
}.items():
    register_op(_name, _spec)

# what token (encoder) graphs are made of: the ops above plus the integer linear layer and the logits
TOKEN_OPS = (*(op for op in OPS if op not in IMAGE_OPS), "linear", "dequantize_output")
