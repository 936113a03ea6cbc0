"""Fast path for encoders (token graphs): oneDNN int8 GEMMs with exact int32 accumulators, bit-exact against the
reference runtime.

:class:`FastEncoderModel` runs a version-2 ``.lowbit`` file (an exported encoder). Its kernels are registered for
the backend ``"cpu_fast_encoder"`` (:mod:`lowbit.ir.kernels`); the CNN fast path (:mod:`lowbit.runtime.fastpath`)
stays what it is. :func:`fast_model` picks the right one for a loaded model.

* **Integer nodes.** Codes travel as uint8 (``code + zero point``, the zero point ``-lo`` for signed codes). A
  ``linear`` runs ``torch.ops.onednn.qlinear_pointwise`` on the (N*T, K) codes with unit scales, no bias and a
  float32 output: the int32 accumulators, exact while ``|acc| < 2^24``, which is checked per layer from the
  weights and the code range (W4A8 and W4A4 layers of BERT-base meet it; a wider layer runs an exact float32 or
  float64 matmul on integer values instead, and an AVX2-only CPU takes that path where its int16 pair sums could
  saturate). The two attention products (activation x activation) are float32 batched matmuls on integer values,
  exact under the same bound. Each requantization ``clamp(round_half_even((acc*m + b) * 2^-k), lo, hi)`` runs in
  float64, exact when ``max|acc|*|m| + |b| < 2^53`` (the lowering sizes multipliers so that it is for every
  accumulator below 2^24), else in int64; ``dequantize`` multiplies by a power of two in float64 and rounds once
  to float32, as the reference does.
* **Float glue.** Operations whose result IEEE arithmetic fixes (adds, scalar products, the mask, embedding
  gathers, ``quantize``: one correctly rounded division) are compiled. LayerNorm, softmax, GELU, tanh and float
  matmuls are opaque custom ops calling the very ATen kernels the reference calls: Inductor's own versions of
  these reductions and transcendental functions round differently, and a float that differs in its last bit can
  move a code across a rounding tie, so the compiled graph keeps the reference's kernels for them.

The whole body is one ``torch.compile`` (Inductor) graph around the opaque kernels (``compile=True``;
``"auto"``, the default via ``LOWBIT_COMPILE``, compiles a shape once its eager calls have taken 5 s;
``False`` runs the same arithmetic eagerly). :func:`compare_encoder` checks every value against the reference.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.ir.dyadic import acc_bounds
from lowbit.ir.graph import Node
from lowbit.ir.kernels import kernel, kernels
from lowbit.runtime.engine import IntegerModel, additive_mask, binary
from lowbit.runtime.fastpath import (
    FastModel,
    available,
    check_capability,
    cpu_capability,
    int16_saturates,
    linear_acc,
    register_layer,
    run_logits,
)
from lowbit.runtime.reference import EXACT_LIMIT, FLOAT32_EXACT_LIMIT

BACKEND = "cpu_fast_encoder"
INT16_MAX = 32767


def fast_model(model: IntegerModel, **kwargs: Any) -> FastModel | FastEncoderModel:
    """The fast backend for ``model``: :class:`FastEncoderModel` for token graphs, else the CNN fast path."""
    return FastEncoderModel(model, **kwargs) if model.token_input else FastModel(model, **kwargs)


# ----------------------------------------------------------------------------- opaque kernels for Inductor
@torch.library.custom_op("lowbit::ref_layer_norm", mutates_args=())
def ref_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's ``F.layer_norm`` (ATen's kernel, not a compiled one)."""
    return F.layer_norm(x, list(weight.shape), weight, bias, eps)


@torch.library.custom_op("lowbit::ref_softmax", mutates_args=())
def ref_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(x, dim)


@torch.library.custom_op("lowbit::ref_gelu", mutates_args=())
def ref_gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


@torch.library.custom_op("lowbit::ref_tanh", mutates_args=())
def ref_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


@torch.library.custom_op("lowbit::ref_matmul", mutates_args=())
def ref_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


@torch.library.custom_op("lowbit::ref_linear", mutates_args=())
def ref_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


for _op in (ref_layer_norm, ref_softmax, ref_gelu, ref_tanh):
    _op.register_fake(lambda x, *args: torch.empty_like(x))
ref_matmul.register_fake(lambda a, b: torch.matmul(a, b))
ref_linear.register_fake(lambda x, w, b: x.new_empty((*x.shape[:-1], w.shape[0])))


# ------------------------------------------------------------------------------------------- the backend
class FastEncoderModel:
    """``FastEncoderModel(IntegerModel)``: an encoder's integer logits, identical to the reference runtime's, on
    oneDNN int8 GEMMs with the glue compiled (module docstring).

    ``paths``: per ``linear``/``matmul``, ``"int8"`` or the exact float path and why; ``requant``: per
    requantization, ``"float64"`` or ``"int64 (why)"``; ``fallbacks``: nodes run by the reference kernel (an op
    without a kernel here; the model then runs eagerly, with one warning).
    """

    def __init__(self, model: IntegerModel, capability: str | None = None, compile: bool | str | None = None):
        if not model.token_input:
            raise LowbitError(f"{model.source}: FastEncoderModel runs encoders (token graphs); use FastModel")
        if not available():
            raise LowbitError("this PyTorch build has no oneDNN quantized ops (torch.ops.onednn.qlinear_pointwise)")
        self.model = model
        self.capability = cpu_capability() if capability is None else check_capability(capability)
        self.paths: dict[str, str] = {}
        self.requant: dict[str, str] = {}
        self.fallbacks: list[str] = []
        self.ranges = model.value_ranges()
        self._zp: dict[str, int | None] = {}  # int value -> zero point of its uint8 form, None: float64 units
        builders = kernels(BACKEND)
        self._steps = []
        for node in model.nodes:
            if model.graph.domains[node.output] == "int":
                lo, hi = self.ranges[node.output]
                self._zp[node.output] = max(0, -lo) if hi + max(0, -lo) <= 255 and lo >= -255 else None
            build = builders.get(node.op)
            self._steps.append(self._reference_step(node) if build is None else
                               build(self, node, model.params[node.name]))
        if compile is None:
            env = os.environ.get("LOWBIT_COMPILE", "auto").strip().lower()
            compile = {"0": False, "1": True}.get(env, "auto")
        self.compile = compile if not self.fallbacks else False
        if self.fallbacks:
            ops = sorted({model.graph.node(n).op for n in self.fallbacks})
            warnings.warn(f"{model.source}: the fast encoder backend has no kernel for op(s) {', '.join(ops)}: "
                          f"node(s) {', '.join(self.fallbacks)} run on the reference kernel, eagerly", stacklevel=2)
        if self.compile:
            dynamo = torch._dynamo.config
            dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
        self._compiled = torch.compile(self._body, dynamic=False) if self.compile else None
        self._eager_s: dict[tuple[int, ...], float] = {}
        self.compile_seconds: dict[tuple[int, ...], float] = {}

    @property
    def vnni(self) -> bool:
        return not int16_saturates(self.capability)

    def _reference_step(self, node: Node):
        self.fallbacks.append(node.name)

        def run(env):
            xs = [self._plain(i, env[i]) for i in node.inputs]
            y = self.model._step(node, [x.to(torch.int32) if self._is_int(i) and not self._is_input(i) else x
                                        for i, x in zip(node.inputs, xs)])
            return self._store(node.output, y)

        return run

    # ------------------------------------------------------------------------------- representations
    def _is_int(self, value: str) -> bool:
        return self.model.graph.domains[value] == "int"

    def _is_input(self, value: str) -> bool:
        return value in self.model.graph.inputs

    def _plain(self, value: str, t: torch.Tensor) -> torch.Tensor:
        """A value in the reference's form: int64 integers, float32 floats, token ids as they are."""
        if self._is_input(value) or not self._is_int(value):
            return t
        zp = self._zp.get(value)
        return (t.to(torch.int64) - zp) if zp is not None else t.to(torch.int64)

    def _store(self, value: str, y: torch.Tensor) -> torch.Tensor:
        """A reference-form integer value in this backend's form (uint8 codes or float64 units)."""
        if not self._is_int(value):
            return y
        zp = self._zp.get(value)
        return (y.to(torch.int64) + zp).to(torch.uint8) if zp is not None else y.to(torch.float64)

    def units(self, value: str, t: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """An integer value as ``dtype`` integer units (codes minus their zero point)."""
        zp = self._zp.get(value)
        return t.to(dtype) - zp if zp else t.to(dtype)

    # ----------------------------------------------------------------------------------------- running
    def _body(self, inputs: dict[str, torch.Tensor], trace: bool = False) -> dict[str, torch.Tensor]:
        env = dict(inputs)
        for node, step in zip(self.model.nodes, self._steps):
            env[node.output] = step(env)
        if trace:
            return {k: self._plain(k, v) for k, v in env.items() if k not in inputs}
        return {"logits": env["logits"].to(torch.int32)}

    def run_trace(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every value of the graph in the reference's form, run eagerly: for comparisons."""
        with torch.inference_mode():
            return self._body(self.model.inputs(x), trace=True)

    def run_int(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Integer logits (int32), identical to :meth:`IntegerModel.run_int`."""
        inputs = self.model.inputs(x)
        return run_logits(self, tuple(inputs[self.model.graph.inputs[0]].shape), inputs)

    def __call__(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (self.run_int(x).to(torch.float64) * self.model.output_scale).to(torch.float32)


def compare_encoder(fast: FastEncoderModel, ref: IntegerModel, x: Mapping[str, torch.Tensor]
                    ) -> dict[str, dict[str, float]]:
    """Per node: fraction of output elements that differ from the reference (bits, for floats) and the largest
    difference."""
    got, want = fast.run_trace(x), ref.run_trace(x)
    out = {}
    for node in ref.nodes:
        v = node.output
        if v not in got or v not in want:
            continue
        a, b = got[v], want[v]
        if a.dtype.is_floating_point:
            diff = a.view(torch.int32) != b.to(a.dtype).view(torch.int32)
            mx = float((a - b).abs().max()) if a.numel() else 0.0
        else:
            d = (a.to(torch.int64) - b.to(torch.int64)).abs()
            diff, mx = d > 0, int(d.max()) if d.numel() else 0
        out[node.name] = {"frac_diff": float(diff.double().mean()) if diff.numel() else 0.0, "max_diff": mx,
                          "domain": ref.graph.domains[v]}
    return out


# ------------------------------------------------------------------------------------- requantization
class _Requant:
    """``clamp(round_half_even((v*m + b) * 2^-k), lo, hi)`` on float64 integer units: exactly in float64 when
    ``|v*m + b| < 2^53`` for every ``v`` the layer can produce (``bound``), else in int64."""

    def __init__(self, m, k, b, lo: int, hi: int, acc_bound: torch.Tensor | float):
        self.m = torch.as_tensor(m, dtype=torch.int64).reshape(-1)
        self.k = torch.as_tensor(k, dtype=torch.int64).reshape(-1)
        self.b = torch.as_tensor(b, dtype=torch.int64).reshape(-1)
        acc = torch.as_tensor(acc_bound, dtype=torch.float64).reshape(-1)
        bound = float((acc * self.m.abs().double() + self.b.abs().double()).max())
        self.float64 = bound < EXACT_LIMIT
        self.why = "float64" if self.float64 else f"int64 (|acc*m + b| may reach 2^{math.log2(bound):.1f})"
        self.lo, self.hi = lo, hi
        self.mf, self.bf = self.m.double(), self.b.double()
        self.pf = torch.pow(2.0, -self.k.double())
        c = torch.where(self.k > 0, (torch.ones_like(self.k) << (self.k - 1).clamp_min(0)) - 1, 0)
        self.c, self.pos = c, (self.k > 0).to(torch.int64)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``v``: float64 integer units (per channel along the last axis); returns float64 integer units."""
        if self.float64:
            return torch.round((v * self.mf + self.bf) * self.pf).clamp(float(self.lo), float(self.hi))
        x = v.to(torch.int64) * self.m + self.b
        odd = torch.bitwise_and(torch.bitwise_right_shift(x, self.k), self.pos)
        y = torch.bitwise_right_shift(x + self.c + odd, self.k)
        return y.clamp(self.lo, self.hi).to(torch.float64)


def _out(fm: FastEncoderModel, value: str, y: torch.Tensor) -> torch.Tensor:
    """float64 integer units -> this backend's form of ``value`` (uint8 codes, or float64 units)."""
    zp = fm._zp.get(value)
    return (y + zp).to(torch.uint8) if zp is not None else y


def _acc_bounds(w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per output channel, the largest |sum(x * w)| for codes ``x`` in ``[lo, hi]``."""
    a_lo, a_hi = acc_bounds(w, (lo, hi))
    return torch.maximum(a_lo.abs(), a_hi.abs())


# ------------------------------------------------------------------------------------------------ kernels
# A kernel builds a node's step: ``build(fast_model, node, params) -> step(env) -> value``.
@kernel("linear", backend=BACKEND)
def _linear(fm: FastEncoderModel, node: Node, p):
    a, w, src, out = node.attrs, p["weight"], node.inputs[0], node.output
    lo_x, hi_x = fm.ranges[src]
    zp_in = fm._zp.get(src)
    acc = _acc_bounds(w, lo_x, hi_x)
    acc_max = int(acc.max()) if acc.numel() else 0
    rq = _Requant(p["multiplier"], p["shift"], p["bias"], a["lo"], a["hi"], acc)
    fm.requant[node.name] = rq.why
    k, o = w.shape[1], w.shape[0]
    why = None
    if zp_in is None:
        why = "input is not 8-bit codes"
    elif acc_max >= FLOAT32_EXACT_LIMIT:
        why = f"|acc| may reach 2^{math.log2(acc_max):.1f} >= 2^24, beyond exact float32 accumulators"
    elif int16_saturates(fm.capability) and 2 * (hi_x + zp_in) * int(w.abs().max()) > INT16_MAX:
        why = "u8 x s8 pair sums could saturate int16 without VNNI"
    if why is None:
        fm.paths[node.name] = "int8"
        key = register_layer("linear", w.to(torch.int8).contiguous(), {}, zp_in)

        def layer(env):
            x = env[src]
            acc = linear_acc(x.reshape(-1, k), key).reshape(*x.shape[:-1], o)
            return _out(fm, out, rq(acc.to(torch.float64)))

        return layer
    if acc_max >= EXACT_LIMIT:
        raise LowbitError(f"fast path: layer {node.name!r} is too wide for exact float64 products")
    dt = torch.float32 if acc_max < FLOAT32_EXACT_LIMIT else torch.float64
    fm.paths[node.name] = f"{'fp32' if dt == torch.float32 else 'fp64'} linear ({why})"
    wt = w.to(dt).T.contiguous()

    def exact_layer(env):
        return _out(fm, out, rq(torch.matmul(fm.units(src, env[src], dt), wt).to(torch.float64)))

    return exact_layer


@kernel("matmul", backend=BACKEND)
def _matmul(fm: FastEncoderModel, node: Node, p):
    a, (sa, sb), out = node.attrs, node.inputs, node.output
    k = fm.model.shapes[sa][-1]
    bound = k * max(map(abs, fm.ranges[sa])) * max(map(abs, fm.ranges[sb]))
    if bound >= EXACT_LIMIT:
        raise LowbitError(f"fast path: matmul {node.name!r} is too wide for exact float64 products")
    dt = torch.float32 if bound < FLOAT32_EXACT_LIMIT else torch.float64
    fm.paths[node.name] = f"{'fp32' if dt == torch.float32 else 'fp64'} matmul on integer values (exact)"
    rq = _Requant(a["multiplier"], a["shift"], a["bias"], a["lo"], a["hi"], float(bound))
    fm.requant[node.name] = rq.why
    return lambda env: _out(fm, out, rq(torch.matmul(fm.units(sa, env[sa], dt), fm.units(sb, env[sb], dt))
                                        .to(torch.float64)))


@kernel("quantize", backend=BACKEND)
def _quantize(fm: FastEncoderModel, node: Node, p):
    a, src, out = node.attrs, node.inputs[0], node.output
    scale = torch.tensor(a["scale"], dtype=torch.float32)
    lo, hi = float(a["lo"]), float(a["hi"])
    zp = fm._zp.get(out)

    def quantize(env):
        q = torch.round(torch.clamp(env[src] / scale, lo, hi))  # one correctly rounded division, as the reference
        return (q + zp).to(torch.uint8) if zp is not None else q.to(torch.float64)

    return quantize


@kernel("dequantize", backend=BACKEND)
def _dequantize(fm: FastEncoderModel, node: Node, p):
    src, scale = node.inputs[0], float(node.attrs["scale"])
    return lambda env: (fm.units(src, env[src]) * scale).to(torch.float32)


@kernel("dequantize_output", backend=BACKEND)
def _dequantize_output(fm: FastEncoderModel, node: Node, p):
    src = node.inputs[0]
    return lambda env: fm.units(src, env[src])


@kernel("embedding", backend=BACKEND)
def _embedding(fm: FastEncoderModel, node: Node, p):
    src, w = node.inputs[0], p["weight"]

    def embed(env):
        ids = env[src]
        if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]):
            raise LowbitError(f"{node.name}: token ids must lie in [0, {w.shape[0]})")
        return F.embedding(ids, w)

    return embed


@kernel("constant", backend=BACKEND)
def _constant(fm: FastEncoderModel, node: Node, p):
    value = p["value"]
    return lambda env: value


@kernel("binary", backend=BACKEND)
def _binary(fm: FastEncoderModel, node: Node, p):
    a, xs = node.attrs, node.inputs
    if len(xs) == 2:
        return lambda env: binary(a["fn"], env[xs[0]], env[xs[1]])
    return lambda env: binary(a["fn"], env[xs[0]], a["scalar"], a.get("reverse", False))


@kernel("layer_norm", backend=BACKEND)
def _layer_norm(fm: FastEncoderModel, node: Node, p):
    src, w, b, eps = node.inputs[0], p["weight"], p["bias"], float(node.attrs["eps"])
    return lambda env: ref_layer_norm(env[src], w, b, eps)


@kernel("softmax", backend=BACKEND)
def _softmax(fm: FastEncoderModel, node: Node, p):
    src, dim = node.inputs[0], int(node.attrs["dim"])
    return lambda env: ref_softmax(env[src], dim)


@kernel("gelu", backend=BACKEND)
def _gelu(fm: FastEncoderModel, node: Node, p):
    src, approx = node.inputs[0], str(node.attrs["approximate"])
    return lambda env: ref_gelu(env[src], approx)


@kernel("tanh", backend=BACKEND)
def _tanh(fm: FastEncoderModel, node: Node, p):
    src = node.inputs[0]
    return lambda env: ref_tanh(env[src])


@kernel("float_linear", backend=BACKEND)
def _float_linear(fm: FastEncoderModel, node: Node, p):
    src, w, b = node.inputs[0], p["weight"], p.get("bias")
    return lambda env: ref_linear(env[src], w, b)


@kernel("float_matmul", backend=BACKEND)
def _float_matmul(fm: FastEncoderModel, node: Node, p):
    a, b = node.inputs
    return lambda env: ref_matmul(env[a], env[b])


@kernel("attention_mask", backend=BACKEND)
def _attention_mask(fm: FastEncoderModel, node: Node, p):
    src, fill, square = node.inputs[0], float(node.attrs["fill"]), bool(node.attrs["square"])
    return lambda env: additive_mask(env[src], fill, square)


@kernel("reshape", backend=BACKEND)
def _reshape(fm: FastEncoderModel, node: Node, p):
    src, shape = node.inputs[0], list(node.attrs["shape"])
    return lambda env: env[src].reshape(env[src].shape[0], *shape)


@kernel("transpose", backend=BACKEND)
def _transpose(fm: FastEncoderModel, node: Node, p):
    src, d0, d1 = node.inputs[0], node.attrs["dim0"], node.attrs["dim1"]
    return lambda env: env[src].transpose(d0, d1)


@kernel("select", backend=BACKEND)
def _select(fm: FastEncoderModel, node: Node, p):
    src, d, i = node.inputs[0], node.attrs["dim"], node.attrs["index"]
    return lambda env: env[src].select(d, i)


@kernel("slice", backend=BACKEND)
def _slice(fm: FastEncoderModel, node: Node, p):
    a, src = node.attrs, node.inputs[0]

    def cut(env):
        index = [slice(None)] * env[src].dim()
        index[a["dim"]] = slice(a["start"], a["end"], a["step"])
        return env[src][tuple(index)]

    return cut


__all__ = ["BACKEND", "FastEncoderModel", "compare_encoder", "fast_model"]
