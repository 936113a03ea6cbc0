"""QDQ ONNX export of a ``.lowbit`` model, runnable by onnxruntime.

The ONNX graph mirrors the CPU fast path of the runtime: activation codes travel as uint8
(``code + zero point``), every conv/linear is ``DequantizeLinear(x) -> Conv/Gemm(DequantizeLinear(w)) ->
QuantizeLinear`` with per-channel weight scales ``|m_c| * 2^-k_c`` (the sign of a folded BN gamma is in the
weight codes) and input/output scale 1, so onnxruntime can fuse it into an integer ``QLinearConv``. Weights
of 4 bits or fewer are stored with the ONNX ``INT4`` type (opset 21), others as ``INT8``. Wide (int32)
values are float tensors in integer units; residual adds, pools and requantizations are float ops followed
by ``QuantizeLinear`` (round half to even, as everywhere in lowbit); a conv2d_add (a conv and its residual add,
rounded once) is the layer's float output plus the dequantized residual times ``m_r*2^-k``, then one
``QuantizeLinear``. A QuantAct's codes (8-bit residual codes)
are the uint8 output of the ``QuantizeLinear`` that ends their producer (the residual add); a reader with its own
quantizer gets them through a ``DequantizeLinear`` (scale ``m * 2^-k``) / ``QuantizeLinear`` pair. A bias becomes
int32 in accumulator units (the QDQ convention, which lets onnxruntime fuse the layer) only where that quantum is
below 2^-9 of an output code, else a float ``Add``: a trained layer's bias rounded to a multiple of ``|m_c|``
output steps moves about 1% of roundings. Layers whose u8 x s8 products could saturate the int16 pair sums of int8
kernels without VNNI (8-bit weights on 8-bit inputs) are exported as float convs on integer values (exact
below 2^24) followed by the per-channel scale, as the fast path's exact path.

Encoders (token graphs) take their int64 inputs by name; a ``linear`` on (N, T, K) codes becomes ``MatMul``
with the dequantized weights transposed, an attention ``matmul`` a float ``MatMul`` of the two dequantized code
tensors (exact below 2^24), and the float glue the ONNX operators of the same names (``Gather``,
``LayerNormalization``, ``Softmax``, ``Gelu``, ``Tanh``, ``Where`` for the mask). onnxruntime computes the float
glue with its own kernels, so its codes may differ from the reference near rounding ties: the verification
reports top-1 agreement and the largest logit difference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.io import atomic_write_bytes
from lowbit.ir.graph import Graph, Node
from lowbit.ir.kernels import kernel, require_kernels

OPSET = 21  # INT4 in DequantizeLinear
INT16_MAX = 32767
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise LowbitError("ONNX export needs the onnx package: pip install 'lowbit[onnx]'") from None
    return onnx, TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, model: Graph, int4: bool):
        self.onnx, self.TP, self.helper, self.nh = _onnx()
        self.model, self.int4 = model, int4
        self.kernels = require_kernels("onnx", {n.op for n in model.nodes}, f"ONNX export of {model.source}")
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.zp: dict[str, int | None] = {}  # value -> zero point (narrow uint8) or None (float)
        self.ranges = model.value_ranges()
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}__{self._n}"

    def const(self, hint: str, array: np.ndarray, dtype: int | None = None) -> str:
        name = self.name(hint)
        if dtype == self.TP.INT4:
            self.inits.append(self.helper.make_tensor(name, dtype, list(array.shape), array.reshape(-1).tolist()))
        else:
            self.inits.append(self.nh.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def scalar(self, v: float, hint: str = "c") -> str:
        return self.const(hint, np.array(v, dtype=np.float32))

    # value helpers ---------------------------------------------------------------------------------
    def to_float(self, value: str) -> str:
        """Integer units as float: ``DequantizeLinear(codes_u8, 1, zp)`` for narrow values."""
        zp = self.zp[value]
        if zp is None:
            return value
        return self.op("DequantizeLinear", [value, self.scalar(1.0), self.const("zp", np.array(zp, np.uint8))],
                       "dq")

    def to_codes(self, v: str, lo: int, hi: int, zp: int, hint: str) -> str:
        """Round float units to uint8 codes: Clip to [lo, hi] (when the uint8 window is wider), then Q."""
        if lo + zp > 0 or hi + zp < 255:
            v = self.op("Clip", [v, self.scalar(float(lo)), self.scalar(float(hi))], "clip")
        return self.op("QuantizeLinear", [v, self.scalar(1.0), self.const("zp", np.array(zp, np.uint8))], hint)

    def finish(self, v: str, a: dict[str, Any], zp: int | None, hint: str) -> str:
        """Codes for a narrow output; for a wide one the folded ReLU, or Clip for a narrower range (ReLU6)."""
        if zp is not None:
            return self.to_codes(v, a["lo"], a["hi"], zp, hint)
        lo, hi = (a["lo"] if a["lo"] > INT32_MIN else None), (a["hi"] if a["hi"] < INT32_MAX else None)
        if hi is None:
            return v if lo is None else self.op("Relu", [v], hint) if lo == 0 else \
                self.op("Max", [v, self.scalar(float(lo))], hint)
        return self.op("Clip", [v, "" if lo is None else self.scalar(float(lo)), self.scalar(float(hi))], hint)


def _out_zp(a: dict[str, Any]) -> int | None:
    zp = max(0, -a["lo"])
    return zp if a["hi"] + zp <= 255 else None


def export_onnx(model: Graph | Any, path: str | os.PathLike, int4: bool = True) -> Path:
    """Write ``model`` (a :class:`~lowbit.ir.Graph`, or a loaded runtime model holding one as ``.graph``) as a
    QDQ ONNX file (opset 21) at ``path``; returns the path."""
    model = model if isinstance(model, Graph) else model.graph
    b = _Builder(model, int4)
    spec = model.input_spec
    shape = ["N", *spec["shape"]]
    pixel = spec.get("dtype") == "uint8"
    dtype = b.TP.INT64 if model.token_input else b.TP.UINT8 if pixel else b.TP.FLOAT
    x_in = [b.helper.make_tensor_value_info(name, dtype, shape) for name in model.inputs]
    for name in model.inputs:
        b.zp[name] = None
    for node in model.nodes:
        _emit(b, node, model.params[node.name])
    out = b.nodes[-1].output[0]
    y = b.helper.make_tensor_value_info(out, b.TP.FLOAT, ["N", None])
    graph = b.helper.make_graph(b.nodes, "lowbit", x_in, [y], b.inits)
    onnx_model = b.helper.make_model(graph, opset_imports=[b.helper.make_opsetid("", OPSET)],
                                     producer_name="lowbit")
    onnx_model.ir_version = 10
    b.onnx.checker.check_model(onnx_model)
    return atomic_write_bytes(Path(path), onnx_model.SerializeToString())


def _emit(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    b.kernels[node.op](b, node, p)


# ------------------------------------------------------------------------------------------------ kernels
# An onnx kernel emits a node's ONNX nodes: ``kernel(builder, node, params)``; an op without one is refused
# by export_onnx, naming it.


@kernel("quantize_input", backend="onnx")
def _onnx_input(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out = node.attrs, node.inputs, node.output
    zp = _out_zp(a)
    if "lut" in p:
        lut = (p["lut"] + zp).to(torch.uint8).numpy().reshape(-1)
        idx = b.op("Cast", [xs[0]], "idx", to=b.TP.INT64)
        c = p["lut"].shape[0]
        if c > 1:
            offs = (np.arange(c, dtype=np.int64) * 256).reshape(1, c, 1, 1)
            idx = b.op("Add", [idx, b.const("offs", offs)], "idx")
        v = b.op("Gather", [b.const("lut", lut), idx], "codes", axis=0)
    else:
        v = b.op("Div", [xs[0], b.scalar(a["scale"])], "x")
        v = b.to_codes(b.op("Round", [v], "x"), a["lo"], a["hi"], zp, "codes")
    _bind(b, v, out, zp)


@kernel("conv2d", backend="onnx")
@kernel("conv2d_add", backend="onnx")
@kernel("linear", backend="onnx")
def _onnx_layer(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    _emit_layer(b, node, node.attrs, p)


@kernel("requantize", backend="onnx")
def _onnx_requantize(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out = node.attrs, node.inputs, node.output
    zp, zp_in, factor = _out_zp(a), b.zp[xs[0]], a["multiplier"] * 2.0 ** -a["shift"]
    if zp_in is not None:  # codes to codes (a QuantAct's codes for a reader's quantizer): a DQ/Q pair
        v = b.op("DequantizeLinear", [xs[0], b.scalar(factor), b.const("zp", np.array(zp_in, np.uint8))], "rq")
    else:
        v = b.op("Mul", [b.to_float(xs[0]), b.scalar(factor)], "rq")
    if a["bias"]:
        v = b.op("Add", [v, b.scalar(a["bias"] * 2.0 ** -a["shift"])], "rq")
    _bind(b, b.finish(v, a, zp, "rq"), out, zp)


@kernel("add", backend="onnx")
def _onnx_add(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out = node.attrs, node.inputs, node.output
    zp = _out_zp(a)
    k = 2.0 ** -a["shift"]
    va = b.op("Mul", [b.to_float(xs[0]), b.scalar(a["multiplier_a"] * k)], "a")
    vb = b.op("Mul", [b.to_float(xs[1]), b.scalar(a["multiplier_b"] * k)], "b")
    v = b.op("Add", [va, vb], "sum")
    if a["bias"]:
        v = b.op("Add", [v, b.scalar(a["bias"] * k)], "sum")
    _bind(b, b.finish(v, a, zp, "add"), out, zp)


@kernel("relu", backend="onnx")
def _onnx_relu(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    xs, out = node.inputs, node.output
    zp = b.zp[xs[0]]
    v = b.op("Relu", [xs[0]], "relu") if zp is None else \
        b.op("Max", [xs[0], b.const("zp", np.array(zp, np.uint8))], "relu")
    _bind(b, v, out, zp)


@kernel("maxpool2d", backend="onnx")
def _onnx_maxpool(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out = node.attrs, node.inputs, node.output
    pads = list(a["padding"]) * 2
    v = b.op("MaxPool", [xs[0]], "maxpool", kernel_shape=a["kernel_size"], strides=a["stride"], pads=pads,
             dilations=a["dilation"], ceil_mode=int(a["ceil_mode"]))
    _bind(b, v, out, b.zp[xs[0]])


@kernel("avgpool2d", backend="onnx")
@kernel("adaptive_avgpool", backend="onnx")
def _onnx_pool(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out, op = node.attrs, node.inputs, node.output, node.op
    zp = _out_zp(a)
    x = b.to_float(xs[0])
    factor = a["multiplier"] * 2.0 ** -a["shift"]
    if op == "avgpool2d":
        kh, kw = a["kernel_size"]
        v = b.op("AveragePool", [x], "pool", kernel_shape=[kh, kw], strides=a["stride"],
                 pads=list(a["padding"]) * 2, count_include_pad=1)
    elif tuple(a["output_size"]) == (1, 1):
        kh, kw = b.model.shapes[xs[0]][-2:]
        v = b.op("GlobalAveragePool", [x], "pool")
    else:  # even windows (the runtime checks): a plain average pool with stride = kernel
        h, w = b.model.shapes[xs[0]][-2:]
        kh, kw = h // a["output_size"][0], w // a["output_size"][1]
        v = b.op("AveragePool", [x], "pool", kernel_shape=[kh, kw], strides=[kh, kw])
    v = b.op("Mul", [v, b.scalar(factor * kh * kw)], "pool")
    if a["bias"]:
        v = b.op("Add", [v, b.scalar(a["bias"] * 2.0 ** -a["shift"])], "pool")
    _bind(b, b.finish(v, a, zp, "pool"), out, zp)


@kernel("clamp", backend="onnx")
def _onnx_clamp(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out = node.attrs, node.inputs, node.output
    zp = b.zp[xs[0]]
    if zp is None:
        v = b.op("Clip", [xs[0], b.scalar(float(a["lo"])), b.scalar(float(a["hi"]))], "clamp")
    else:  # codes keep their zero point; lo/hi lie within the input's range
        lo, hi = (b.const("bound", np.array(v + zp, np.uint8)) for v in (a["lo"], a["hi"]))
        v = b.op("Clip", [xs[0], lo, hi], "clamp")
    _bind(b, v, out, zp)


@kernel("concat", backend="onnx")
def _onnx_concat(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out = node.attrs, node.inputs, node.output
    zp = _out_zp(a)
    zps = {b.zp[x] for x in xs}
    if zps == {zp} and zp is not None:
        v = b.op("Concat", list(xs), "cat", axis=1)
    else:  # zero points differ, or wide values: join float units, then round to the output's codes
        v = b.finish(b.op("Concat", [b.to_float(x) for x in xs], "cat", axis=1), a, zp, "cat")
    _bind(b, v, out, zp)


@kernel("upsample_nearest", backend="onnx")
def _onnx_upsample(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out = node.attrs, node.inputs, node.output
    scales = b.const("scales", np.array([1.0, 1.0, *a["scale"]], np.float32))
    v = b.op("Resize", [xs[0], "", scales], "up", mode="nearest", nearest_mode="floor",
             coordinate_transformation_mode="asymmetric")
    _bind(b, v, out, b.zp[xs[0]])


@kernel("flatten", backend="onnx")
def _onnx_flatten(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out, name = node.attrs, node.inputs, node.output, node.name
    if a["start_dim"] != 1:
        raise LowbitError(f"ONNX export: flatten {name!r} from dim {a['start_dim']} is not supported (only 1)")
    _bind(b, b.op("Flatten", [xs[0]], "flat", axis=1), out, b.zp[xs[0]])


@kernel("dequantize_output", backend="onnx")
def _onnx_output(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs, out = node.attrs, node.inputs, node.output
    b.nodes.append(b.helper.make_node("Mul", [b.to_float(xs[0]), b.scalar(a["scale"])], [out], name=out))


def _emit_layer(b: _Builder, node: Node, a: dict[str, Any], p: dict[str, torch.Tensor]) -> None:
    x, out = node.inputs[0], node.outputs[0]
    zp_in, zp = b.zp[x], _out_zp(a)
    if zp_in is None:
        raise LowbitError(f"ONNX export: layer {node.name!r} reads a value that is not uint8 codes")
    pow2 = torch.pow(2.0, -p["shift"].double())
    mult, bias = p["multiplier"].double() * pow2, p["bias"].double() * pow2
    w = p["weight"].to(torch.int64)
    sign = torch.where(mult < 0, -1, 1).reshape(-1, *[1] * (w.dim() - 1))
    zero = mult == 0
    w = torch.where(zero.reshape(sign.shape), 0, w * sign)
    scale = torch.where(zero, 1.0, mult.abs())
    lo_x, hi_x = b.ranges[x]
    w_max = int(w.abs().max()) if w.numel() else 0
    conv = node.op != "linear"
    shape = [1, -1, 1, 1] if conv else [1, -1]
    tokens = not conv and len(b.model.shapes[x]) > 1  # (N, T, K): MatMul with the weights transposed
    if 2 * (hi_x + zp_in) * w_max > INT16_MAX and w[0].numel() * max(abs(lo_x), abs(hi_x)) * w_max < 2**24:
        # u8 x s8 pairs could saturate int16 in int8 kernels without VNNI (onnxruntime's included): run the
        # layer as a float conv on integer values (exact below 2^24), then scale, as the fast path does
        xf = b.op("Sub", [b.op("Cast", [x], "x", to=b.TP.FLOAT), b.scalar(float(zp_in))], "x")
        wf = b.const("w", w.numpy().astype(np.float32))
        if conv:
            y = b.op("Conv", [xf, wf], "conv", strides=a["stride"], pads=list(a["padding"]) * 2,
                     dilations=a["dilation"], group=a["groups"])
        elif tokens:
            y = b.op("MatMul", [xf, b.op("Transpose", [wf], "wt", perm=[1, 0])], "matmul")
        else:
            y = b.op("Gemm", [xf, wf], "gemm", transB=1)
        y = b.op("Mul", [y, b.const("scale", scale.numpy().astype(np.float32).reshape(shape))], "y")
        y = b.op("Add", [y, b.const("bias", bias.numpy().astype(np.float32).reshape(shape))], "y")
        _bind(b, b.finish(_residual(b, node, p, y, pow2, shape), a, zp, "y"), out, zp)
        return
    use_int4 = b.int4 and a["w_bits"] <= 4 and int(w.max()) <= 7  # a sign flip can make -8 into +8
    w_name = b.const("w", w.numpy().astype(np.int8), b.TP.INT4 if use_int4 else None)
    w_zero = b.const("wzp", np.zeros(w.shape[0], np.int8), b.TP.INT4 if use_int4 else None)
    w_float = b.op("DequantizeLinear", [w_name, b.const("ws", scale.numpy().astype(np.float32)), w_zero], "w",
                   axis=0)
    xf = b.op("DequantizeLinear", [x, b.scalar(1.0), b.const("zp", np.array(zp_in, np.uint8))], "x")
    bias_acc = (bias / scale).numpy()
    # The QDQ bias convention (int32 in accumulator units, scale x_scale * w_scale) rounds the bias to a
    # multiple of |M_c| output steps; only where that is below 2^-9 of a code does it keep (almost) every
    # rounding of the reference, else the bias is a float Add (and onnxruntime may not fuse the layer).
    int_bias = zp is not None and float(scale.max()) <= 2.0**-9 and bool(np.all(np.abs(bias_acc) < 2**30)) \
        and not tokens and node.op != "conv2d_add"
    if int_bias:
        bq = b.const("b", np.rint(bias_acc).astype(np.int32))
        bias_in = [b.op("DequantizeLinear", [bq, b.const("bs", scale.numpy().astype(np.float32))], "bias", axis=0)]
    else:
        bias_in = []
    if conv:
        y = b.op("Conv", [xf, w_float, *bias_in], "conv", strides=a["stride"], pads=list(a["padding"]) * 2,
                 dilations=a["dilation"], group=a["groups"])
    elif tokens:
        y = b.op("MatMul", [xf, b.op("Transpose", [w_float], "wt", perm=[1, 0])], "matmul")
    else:
        y = b.op("Gemm", [xf, w_float, *bias_in], "gemm", transB=1)
    if not int_bias:
        y = b.op("Add", [y, b.const("bias", bias.numpy().astype(np.float32).reshape(shape))], "bias")
    _bind(b, b.finish(_residual(b, node, p, y, pow2, shape), a, zp, "y"), out, zp)


def _residual(b: _Builder, node: Node, p: dict[str, torch.Tensor], y: str, pow2: torch.Tensor, shape: list[int]
              ) -> str:
    """conv2d_add: ``y + r * m_r*2^-k`` (the residual in integer units, per channel) before the one rounding."""
    if node.op != "conv2d_add":
        return y
    factor = (p["residual_multiplier"].double() * pow2).numpy().astype(np.float32).reshape(shape)
    return b.op("Add", [y, b.op("Mul", [b.to_float(node.inputs[1]), b.const("rs", factor)], "res")], "sum")


# ---------------------------------------------------------------------------------------- encoder ops
@kernel("quantize", backend="onnx")
def _onnx_quantize(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, x = node.attrs, node.inputs[0]
    zp = _out_zp(a)
    v = b.op("Round", [b.op("Div", [x, b.scalar(a["scale"])], "x")], "x")
    _bind(b, b.to_codes(v, a["lo"], a["hi"], zp, "codes"), node.output, zp)


@kernel("matmul", backend="onnx")
def _onnx_matmul(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, (xa, xb) = node.attrs, node.inputs
    zp = _out_zp(a)
    v = b.op("MatMul", [b.to_float(xa), b.to_float(xb)], "matmul")  # integer values, exact below 2^24
    v = b.op("Mul", [v, b.scalar(a["multiplier"] * 2.0 ** -a["shift"])], "rq")
    if a["bias"]:
        v = b.op("Add", [v, b.scalar(a["bias"] * 2.0 ** -a["shift"])], "rq")
    _bind(b, b.finish(v, a, zp, "rq"), node.output, zp)


@kernel("dequantize", backend="onnx")
def _onnx_dequantize(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    v = b.op("Mul", [b.to_float(node.inputs[0]), b.scalar(node.attrs["scale"])], "dq")
    _bind(b, v, node.output, None)


@kernel("embedding", backend="onnx")
def _onnx_embedding(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    w = b.const("emb", p["weight"].numpy())
    _bind(b, b.op("Gather", [w, node.inputs[0]], "emb", axis=0), node.output, None)


@kernel("constant", backend="onnx")
def _onnx_constant(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    _bind(b, b.const("const", p["value"].numpy()), node.output, None)


@kernel("binary", backend="onnx")
def _onnx_binary(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, xs = node.attrs, list(node.inputs)
    op = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}[a["fn"]]
    if len(xs) == 1:
        xs.append(b.scalar(a["scalar"]))
        if a.get("reverse"):
            xs.reverse()
    _bind(b, b.op(op, xs, a["fn"]), node.output, None)


@kernel("layer_norm", backend="onnx")
def _onnx_layer_norm(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    w, bias = p["weight"], p["bias"]
    v = b.op("LayerNormalization", [node.inputs[0], b.const("ln_w", w.numpy()), b.const("ln_b", bias.numpy())],
             "ln", axis=-w.dim(), epsilon=float(node.attrs["eps"]))
    _bind(b, v, node.output, None)


@kernel("softmax", backend="onnx")
def _onnx_softmax(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    _bind(b, b.op("Softmax", [node.inputs[0]], "softmax", axis=int(node.attrs["dim"])), node.output, None)


@kernel("gelu", backend="onnx")
def _onnx_gelu(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    v = b.op("Gelu", [node.inputs[0]], "gelu", approximate=str(node.attrs["approximate"]))
    _bind(b, v, node.output, None)


@kernel("tanh", backend="onnx")
def _onnx_tanh(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    _bind(b, b.op("Tanh", [node.inputs[0]], "tanh"), node.output, None)


@kernel("float_linear", backend="onnx")
def _onnx_float_linear(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    v = b.op("MatMul", [node.inputs[0], b.const("w", p["weight"].T.contiguous().numpy())], "linear")
    if "bias" in p:
        v = b.op("Add", [v, b.const("b", p["bias"].numpy())], "linear")
    _bind(b, v, node.output, None)


@kernel("float_matmul", backend="onnx")
def _onnx_float_matmul(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    _bind(b, b.op("MatMul", list(node.inputs), "matmul"), node.output, None)


@kernel("attention_mask", backend="onnx")
def _onnx_mask(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    a, t = node.attrs, b.model.shapes[node.inputs[0]][-1]
    keep = b.op("Equal", [node.inputs[0], b.const("zero", np.array(0, np.int64))], "masked")
    v = b.op("Where", [keep, b.scalar(a["fill"]), b.scalar(0.0)], "mask")
    v = b.op("Unsqueeze", [v, b.const("axes", np.array([1, 2], np.int64))], "mask")
    if a["square"]:
        v = b.op("Expand", [v, b.const("shape", np.array([1, 1, t, t], np.int64))], "mask")
    _bind(b, v, node.output, None)


@kernel("reshape", backend="onnx")
def _onnx_reshape(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    x = node.inputs[0]
    shape = b.const("shape", np.array([0, *node.attrs["shape"]], np.int64))  # 0: keep the batch
    _bind(b, b.op("Reshape", [x, shape], "reshape"), node.output, b.zp[x])


@kernel("transpose", backend="onnx")
def _onnx_transpose(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    x = node.inputs[0]
    perm = list(range(len(b.model.shapes[x]) + 1))
    d0, d1 = node.attrs["dim0"] % len(perm), node.attrs["dim1"] % len(perm)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    _bind(b, b.op("Transpose", [x], "transpose", perm=perm), node.output, b.zp[x])


@kernel("select", backend="onnx")
def _onnx_select(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    x, a = node.inputs[0], node.attrs
    index = b.name("index")  # a 0-d index (const() stores arrays at least 1-d), so Gather drops the dimension
    b.inits.append(b.nh.from_array(np.array(a["index"], np.int64), index))
    v = b.op("Gather", [x, index], "select", axis=int(a["dim"]))
    _bind(b, v, node.output, b.zp[x])


@kernel("slice", backend="onnx")
def _onnx_slice(b: _Builder, node: Node, p: dict[str, torch.Tensor]) -> None:
    x, a = node.inputs[0], node.attrs
    args = [b.const(k, np.array([a[k]], np.int64)) for k in ("start", "end")]
    v = b.op("Slice", [x, *args, b.const("axes", np.array([a["dim"]], np.int64)),
                       b.const("steps", np.array([a["step"]], np.int64))], "slice")
    _bind(b, v, node.output, b.zp[x])


def _bind(b: _Builder, value: str, out: str, zp: int | None) -> None:
    """Name the last node's output after the manifest value ``out`` (or alias it through Identity)."""
    if value != out:
        b.nodes.append(b.helper.make_node("Identity", [value], [out], name=b.name("id")))
    b.zp[out] = zp


class OnnxModel:
    """An onnxruntime session on an exported file, with the reference runtime's call convention."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise LowbitError("running ONNX needs onnxruntime: pip install 'lowbit[onnx]'") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, dict):  # an encoder: its token tensors by input name
            feed = {i.name: x[i.name].to(torch.int64).numpy() for i in self.session.get_inputs()}
        else:
            feed = {"input": x.numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])
