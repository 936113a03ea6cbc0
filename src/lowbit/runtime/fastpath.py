"""Fast path: a ``.lowbit`` model on PyTorch's oneDNN int8 CPU kernels, bit-exact against the reference runtime.

Built from the file alone (:class:`FastModel`). Each conv/linear whose input is 8-bit codes runs
``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise`` on uint8 activation codes (zero point ``-lo``
for signed codes) and int8 weight codes with every scale 1, no bias, no post-op and a float32 output: the
kernel's int32 accumulators, converted to float32, exactly while ``|acc| < 2^24``. That bound is checked per
layer from the weights and the input's value bounds (:func:`value_bounds`; 4-bit codes meet it up to
``K = 139810`` products); a layer that could pass it runs an exact float64 conv instead. Everything between
the kernels is the reference runtime's formula (:mod:`lowbit.ir.ops`), computed exactly:

* values between kernels are stored as uint8 codes (plus a zero point) or, when wide, as int32 (the reference
  holds every value in int32); arithmetic happens in registers inside the compiled graph, in the narrowest
  exact type, chosen per node from the value bounds (:class:`_Requant`, ``FastModel.requant``):
* requantization ``clamp(round_half_even((v*m + b) * 2^-k), lo, hi)``, after dividing out the powers of two
  ``m`` and ``b`` share: in float32 on float32 accumulators when ``max|v|*|m| + |b| < 2^24`` (each product and
  sum is then an exact float32 integer, the power-of-two scaling is exact and ``round`` is half to even); in
  int32 with the reference's shift-and-round when that bound plus ``2^(k-1)`` is below ``2^31``; else in int64,
  the reference's own arithmetic (never float64: see :class:`_Requant`);
* residual add ``(a*m_a + b*m_b + bias) * 2^-shift`` likewise, in int32 or int64;
* max pool selects values on the stored form (uint8 codes, int32 values), window sums of integers are exact in
  float64, ReLU/clamp/concat/flatten/upsampling move values in int32; a conv read only by a max pool is pooled
  on its accumulators and requantized after (same result: with every multiplier >= 0 the requantization is
  non-decreasing, so it commutes with the window maximum; 1/window of the requantization work);
* the input lookup table is a gather (uint8 pixels); a float input is quantized by the reference's float32
  formula, eagerly, before the compiled graph.

The glue runs as one ``torch.compile`` (Inductor) graph around the opaque int8 kernels (custom ops
``lowbit::conv_acc`` / ``lowbit::linear_acc``, whose prepacked weights are keyed by content, so Inductor's
on-disk FX graph cache serves a second process); ``compile=False`` (or ``LOWBIT_COMPILE=0``) runs the same
arithmetic eagerly, and by default an input shape is compiled once its eager calls have taken 5 s.

Which CPU the path decisions assume is the *capability* (:data:`CAPABILITIES`): ``avx2`` (u8 x s8 pair sums
in saturating int16, ``vpmaddubsw``; AVX-512 without VNNI too), ``vnni`` (int8 dot products into int32) or
``amx`` (int8 tiles into int32). On ``avx2`` a layer is sent to the int8 kernel only when ``2 * max(x_u8) *
max|w| <= 32767`` (w8a8 layers usually fail it and run an exact float32 conv). The capability is read from
``/proc/cpuinfo`` (capped by oneDNN's ``ONEDNN_MAX_CPU_ISA`` if set) unless forced: by
``FastModel(model, capability="avx2")``, a :func:`forced_capability` block or ``LOWBIT_CPU_ISA=avx2|vnni|amx``.
Forcing ``avx2`` is always exact (it only sends more layers to the float path); forcing ``vnni`` or ``amx`` on
a CPU without them models that machine's paths (tests) but its int8 layers may saturate here.

An op without a fast kernel runs the reference runtime's kernel on integer codes (``FastModel.fallbacks``; the
model then runs eagerly and says so in one warning). :func:`compare` checks every value against the reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.ir.dyadic import acc_bounds, float32_epilogue_exact, float32_sum_epilogue_exact, requantize
from lowbit.ir.graph import Node
from lowbit.ir.kernels import kernel, kernels
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.reference import EXACT_LIMIT, FLOAT32_EXACT_LIMIT, INT32_MAX, INT32_MIN

INT16_MAX = 32767
AUTO_COMPILE_AFTER_S = 5.0  # compile="auto": compile a shape once its eager calls have taken this long
# A large batch runs in chunks of images whose largest intermediate (a conv's float32 accumulators) stays below this:
# every tensor of a call then comes from memory the allocator keeps (glibc serves blocks above 32 MiB with fresh
# pages, faulted in on every call) and the working set stays in the caches.
CHUNK_BYTES = 16 * 2**20
CAPABILITIES = ("avx2", "vnni", "amx")  # weakest first
ISA_ENV = "LOWBIT_CPU_ISA"
_ALIASES = {"avx2": "avx2", "avx512": "avx2", "avx512_core": "avx2", "vnni": "vnni", "avx512_vnni": "vnni",
            "avx_vnni": "vnni", "amx": "amx", "amx_int8": "amx"}
_forced: list[str] = []


def check_capability(name: str, what: str = "capability") -> str:
    """``name`` (or an alias such as ``avx512_vnni``, ``amx_int8``) as one of :data:`CAPABILITIES`."""
    cap = _ALIASES.get(str(name).strip().lower())
    if cap is None:
        raise LowbitError(f"{what} {name!r} is not a CPU int8 capability: choose one of {', '.join(CAPABILITIES)}")
    return cap


def detect_capability() -> str:
    """The int8 capability of this CPU from ``/proc/cpuinfo``, capped by ``ONEDNN_MAX_CPU_ISA`` when set
    (oneDNN then runs the capped ISA's kernels)."""
    try:
        m = re.search(r"^flags\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        flags = set()
    cap = "amx" if "amx_int8" in flags else "vnni" if flags & {"avx512_vnni", "avx_vnni"} else "avx2"
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if limit and limit not in ("ALL", "DEFAULT"):
        vnni = "VNNI" in limit or limit.startswith(("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10"))
        allowed = "amx" if "AMX" in limit else "vnni" if vnni else "avx2"
        cap = min(cap, allowed, key=CAPABILITIES.index)
    return cap


def cpu_capability() -> str:
    """The capability the fast path assumes: the innermost :func:`forced_capability`, else ``LOWBIT_CPU_ISA``,
    else :func:`detect_capability`."""
    if _forced:
        return _forced[-1]
    env = os.environ.get(ISA_ENV, "").strip()
    return check_capability(env, ISA_ENV) if env else detect_capability()


@contextlib.contextmanager
def forced_capability(name: str) -> Iterator[str]:
    """Within the block, fast models and latency tables assume capability ``name`` instead of reading the CPU
    (so tests of the path decisions do not depend on the machine that runs them)."""
    _forced.append(check_capability(name))
    try:
        yield _forced[-1]
    finally:
        _forced.pop()


def int16_saturates(capability: str) -> bool:
    """Whether u8 x s8 pair sums go through saturating int16 (``vpmaddubsw``) on this capability."""
    return check_capability(capability) == "avx2"


def cpu_has_vnni() -> bool:
    """True when the assumed capability has no int16 saturation in u8 x s8 kernels (VNNI or AMX)."""
    return not int16_saturates(cpu_capability())


def available() -> bool:
    """Whether this PyTorch build has the oneDNN quantized ops the fast path needs."""
    return hasattr(torch.ops.onednn, "qconv2d_pointwise") and hasattr(torch.ops.onednn, "qlinear_pointwise")


# ------------------------------------------------------------------------------------------- value bounds
def value_bounds(model: IntegerModel) -> dict[str, tuple[int, int]]:
    """``[lo, hi]`` every integer value can take, tighter than :meth:`Graph.value_ranges`: a wide (int32)
    output is bounded by what its accumulators can reach (weights and input range), a sum by its terms.

    The bounds decide which arithmetic is exact: float32 accumulators (``|acc| < 2^24``), float32 or int32 glue
    (``|v*m + b| < 2^24`` on float32 accumulators, ``|v*m + b| + 2^(k-1) < 2^31``), else int64. They are
    conservative (every rounding step rounds outward), never a measurement."""
    b: dict[str, tuple[int, int]] = {}
    for node in model.nodes:
        a, p = node.attrs, model.params[node.name]
        xs = [b[i] for i in node.inputs if i in b]
        if node.op == "quantize_input":
            r = (a["lo"], a["hi"])
            if "lut" in p:
                r = (int(p["lut"].min()), int(p["lut"].max()))
        elif node.op in ("conv2d", "linear"):
            lo_c, hi_c = acc_bounds(p["weight"], xs[0])
            r = _requant_bounds(lo_c, hi_c, p["multiplier"], p["shift"], p["bias"])
        elif node.op == "conv2d_add":
            lo_c, hi_c = acc_bounds(p["weight"], xs[0])
            r = _requant_bounds(lo_c, hi_c, p["multiplier"], p["shift"], p["bias"], xs[1], p["residual_multiplier"])
        elif node.op == "requantize":
            r = _requant_bounds(*_t(xs[0]), a["multiplier"], a["shift"], a["bias"])
        elif node.op == "add":
            s, pairs = a["shift"], ((xs[0], a["multiplier_a"]), (xs[1], a["multiplier_b"]))
            terms = [sorted((lx * m, hx * m)) for (lx, hx), m in pairs]
            lo = terms[0][0] + terms[1][0] + a["bias"]
            hi = terms[0][1] + terms[1][1] + a["bias"]
            r = (lo >> s, -((-hi) >> s))
        elif node.op in ("avgpool2d", "adaptive_avgpool"):
            n = _window(node, model)
            lo, hi = min(0, xs[0][0]) * n, max(0, xs[0][1]) * n
            r = _requant_bounds(*_t((lo, hi)), a["multiplier"], a["shift"], a["bias"])
        elif node.op == "relu":
            r = (max(0, xs[0][0]), max(0, xs[0][1]))
        elif node.op == "concat":
            r = (min(x[0] for x in xs), max(x[1] for x in xs))
        elif xs:
            r = xs[0]
        else:
            r = (INT32_MIN, INT32_MAX)
        if "lo" in a and node.op != "quantize_input":
            r = (min(max(r[0], a["lo"]), a["hi"]), max(min(r[1], a["hi"]), a["lo"]))
        b[node.output] = (int(r[0]), int(r[1]))
    return b


def _t(r: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([r[0]], dtype=torch.int64), torch.tensor([r[1]], dtype=torch.int64)


def _requant_bounds(lo: torch.Tensor, hi: torch.Tensor, m, k, bias, r: tuple[int, int] = (0, 0), mr=0
                    ) -> tuple[int, int]:
    """Range of ``round((v*m + b + r*m_r) * 2^-k)`` over ``v`` in ``[lo, hi]`` per channel and ``r`` in ``r``
    (floor/ceil: outward). Python ints: the products can pass int64."""
    lo, hi = lo.tolist(), hi.tolist()
    ms, ks, bs, mrs = (torch.as_tensor(v).reshape(-1).tolist() for v in (m, k, bias, mr))
    n = max(len(lo), len(ms), len(ks), len(bs), len(mrs))
    out_lo, out_hi = None, None
    for c in range(n):
        mc, kc, bc, mrc = ms[c % len(ms)], ks[c % len(ks)], bs[c % len(bs)], mrs[c % len(mrs)]
        rt = sorted((r[0] * mrc, r[1] * mrc))
        ends = sorted((lo[c % len(lo)] * mc + bc, hi[c % len(hi)] * mc + bc))
        ends = [ends[0] + rt[0], ends[1] + rt[1]]
        l, h = ends[0] >> kc, -((-ends[1]) >> kc)
        out_lo = l if out_lo is None else min(out_lo, l)
        out_hi = h if out_hi is None else max(out_hi, h)
    return out_lo, out_hi


def _window(node: Node, model: IntegerModel) -> int:
    a = node.attrs
    if node.op == "avgpool2d":
        kh, kw = (a["kernel_size"], a["kernel_size"]) if isinstance(a["kernel_size"], int) else a["kernel_size"]
        return kh * kw
    h, w = model.shapes[node.inputs[0]][-2:]
    return (h // a["output_size"][0]) * (w // a["output_size"][1])


def _max_abs(r: tuple[int, int]) -> int:
    return max(abs(r[0]), abs(r[1]))


# ------------------------------------------------------------------------------ opaque oneDNN accumulators
# Prepacked weights live here under a key derived from their contents, so the custom ops below take only
# tensors and a string (what torch.compile traces), and a recompiled graph in another process has the same
# key (Inductor's FX graph cache can hit).
_PACKED: dict[str, dict[str, Any]] = {}


def register_layer(op: str, w8: torch.Tensor, a: dict[str, Any], zp_in: int) -> str:
    """Prepack an int8 conv/linear weight for the accumulator ops (:func:`conv_acc`, :func:`linear_acc`); the key
    is the weight's content and geometry, so a compiled graph (and Inductor's disk cache) finds it again."""
    geometry = (op, zp_in, *(tuple(a[k]) if isinstance(a.get(k), list) else a.get(k)
                             for k in ("stride", "padding", "dilation", "groups")))
    key = hashlib.sha1(w8.numpy().tobytes() + repr((tuple(w8.shape), geometry)).encode()).hexdigest()[:20]
    if key in _PACKED:
        return key
    c = w8.shape[0]
    ones, wzp = torch.ones(c, dtype=torch.float32), torch.zeros(c, dtype=torch.int64)
    if op == "conv2d":
        packed = torch.ops.onednn.qconv_prepack(w8, ones, 1.0, zp_in, a["stride"], a["padding"], a["dilation"],
                                                a["groups"], None)
    else:
        packed = torch.ops.onednn.qlinear_prepack(w8, None)
    _PACKED[key] = {"op": op, "packed": packed, "ones": ones, "wzp": wzp, "zp": zp_in, "out": c,
                    "kernel": list(w8.shape[2:]), **{k: a.get(k) for k in ("stride", "padding", "dilation", "groups")}}
    return key


@torch.library.custom_op("lowbit::conv_acc", mutates_args=())
def conv_acc(x: torch.Tensor, key: str) -> torch.Tensor:
    """int32 accumulators of a prepacked int8 conv, as exact float32 (output scale 1, no bias, no post-op),
    channels-last. ``x``: uint8 codes shifted by the layer's zero point."""
    e = _PACKED[key]
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.onednn.qconv2d_pointwise(
        x, 1.0, e["zp"], e["packed"], e["ones"], e["wzp"], None, e["stride"], e["padding"], e["dilation"],
        e["groups"], 1.0, 0, torch.float32, "none", [], "").contiguous(memory_format=torch.channels_last)


@conv_acc.register_fake
def _(x: torch.Tensor, key: str) -> torch.Tensor:
    return _conv_out(x, _PACKED[key], torch.float32)


@torch.library.custom_op("lowbit::linear_acc", mutates_args=())
def linear_acc(x: torch.Tensor, key: str) -> torch.Tensor:
    """int32 accumulators of a prepacked int8 linear layer, as exact float32 (see :func:`conv_acc`)."""
    e = _PACKED[key]
    return torch.ops.onednn.qlinear_pointwise(x.contiguous(), 1.0, e["zp"], e["packed"], e["ones"], e["wzp"], None,
                                              1.0, 0, torch.float32, "none", [], "")


@linear_acc.register_fake
def _(x: torch.Tensor, key: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], _PACKED[key]["out"]), dtype=torch.float32)


def _register_fused(op: str, w: torch.Tensor, a: dict[str, Any], zp_in: int, p: dict[str, torch.Tensor],
                    lo: int, hi: int, zp_out: int, zp_r: int | None = None) -> str:
    """Prepack a layer whose requantization runs in the kernel's float32 epilogue (weight scales
    ``|m|*2^-k``, bias ``b*2^-k``, clip to ``[lo, hi]``, output zero point): exact under
    :func:`~lowbit.ir.dyadic.float32_epilogue_exact`. Channels with ``m < 0`` run with negated weights; a zero
    multiplier gets scale 1 and zero weights (the output is then the bias alone). conv2d_add (``zp_r`` given): the
    residual's one scale ``S = m_r*2^-k`` and zero point for the sum post-op (:func:`conv_add_u8`)."""
    m, k, b = (p[r].to(torch.int64) for r in ("multiplier", "shift", "bias"))
    sign = torch.where(m < 0, -1, 1).reshape(-1, *[1] * (w.dim() - 1))
    w8 = torch.where((m == 0).reshape(sign.shape), 0, w.to(torch.int64) * sign).to(torch.int8).contiguous()
    p2 = torch.pow(2.0, -k.to(torch.float64))
    scales = torch.where(m == 0, 1.0, m.abs().to(torch.float64) * p2).to(torch.float32)
    beta = (b.to(torch.float64) * p2).to(torch.float32)
    sum_scale = None
    if zp_r is not None:  # one number on every channel (checked by float32_sum_epilogue_exact)
        sum_scale = float(p["residual_multiplier"][0].double() * p2[0])
    geometry = (op, zp_in, lo, hi, zp_out, zp_r, sum_scale,
                *(tuple(a[g]) if isinstance(a.get(g), list) else a.get(g)
                  for g in ("stride", "padding", "dilation", "groups")))
    key = "u8" + hashlib.sha1(w8.numpy().tobytes() + scales.numpy().tobytes() + beta.numpy().tobytes()
                              + repr((tuple(w8.shape), geometry)).encode()).hexdigest()[:20]
    if key in _PACKED:
        return key
    c = w8.shape[0]
    if op != "linear":
        packed = torch.ops.onednn.qconv_prepack(w8, scales, 1.0, zp_in, a["stride"], a["padding"], a["dilation"],
                                                a["groups"], None)
    else:
        packed = torch.ops.onednn.qlinear_prepack(w8, None)
    _PACKED[key] = {"op": op, "packed": packed, "scales": scales, "beta": beta,
                    "wzp": torch.zeros(c, dtype=torch.int64), "zp": zp_in, "zp_out": zp_out,
                    "clip": [float(lo), float(hi)], "out": c, "zp_r": zp_r, "sum_scale": sum_scale,
                    "narrow": None if (lo + zp_out, hi + zp_out) == (0, 255) else (lo + zp_out, hi + zp_out),
                    "kernel": list(w8.shape[2:]), **{g: a.get(g) for g in ("stride", "padding", "dilation", "groups")}}
    return key


@torch.library.custom_op("lowbit::conv_u8", mutates_args=())
def conv_u8(x: torch.Tensor, key: str) -> torch.Tensor:
    """A prepacked int8 conv that requantizes in its epilogue and writes uint8 codes (plus the output zero
    point), channels-last (:func:`_register_fused`)."""
    e = _PACKED[key]
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.onednn.qconv2d_pointwise(
        x, 1.0, e["zp"], e["packed"], e["scales"], e["wzp"], e["beta"], e["stride"], e["padding"], e["dilation"],
        e["groups"], 1.0, e["zp_out"], torch.uint8, "hardtanh", e["clip"], "").contiguous(
        memory_format=torch.channels_last)


@conv_u8.register_fake
def _(x: torch.Tensor, key: str) -> torch.Tensor:
    return _conv_out(x, _PACKED[key], torch.uint8)


@torch.library.custom_op("lowbit::conv_add_u8", mutates_args=())
def conv_add_u8(x: torch.Tensor, r: torch.Tensor, key: str) -> torch.Tensor:
    """A prepacked int8 conv, plus the residual codes ``r`` (stored uint8, its zero point) through oneDNN's sum
    post-op (``S*(r - zp_r)`` added in the float32 epilogue), requantized there and written as uint8 codes into a copy
    of ``r`` (the sum post-op works in place), channels-last (:func:`_register_fused`). Measured semantics (torch
    2.13): ``sat_u8(rne((x_scale*w_scale_c*acc + bias_c + accum_scale*(accum - accum_zp)) / output_scale) +
    output_zp)``, ``alpha`` unused; no clip post-op (only ``sum`` and ``sum_relu``): a code range narrower than uint8's
    is one in-place clamp after the kernel (inside the op, so the compiled graph neither copies nor re-reads it)."""
    out = r.contiguous(memory_format=torch.channels_last).clone(memory_format=torch.channels_last)
    _conv_add_into(x, out, key)
    return out


@conv_add_u8.register_fake
def _(x: torch.Tensor, r: torch.Tensor, key: str) -> torch.Tensor:
    return _conv_out(x, _PACKED[key], torch.uint8)


@torch.library.custom_op("lowbit::conv_add_u8_", mutates_args=("r",))
def conv_add_u8_(x: torch.Tensor, r: torch.Tensor, key: str) -> None:
    """:func:`conv_add_u8` writing into ``r`` itself (channels-last uint8), for an add that is its residual's last
    reader: no copy. Under torch.compile the mutation is functionalized, and Inductor writes in place where nothing
    reads ``r`` later (else it copies, as :func:`conv_add_u8` does)."""
    _conv_add_into(x, r, key)


def _conv_add_into(x: torch.Tensor, r: torch.Tensor, key: str) -> None:
    """The kernel of both fused-add ops: the sum post-op into ``r``, then the narrow range's clamp."""
    e = _PACKED[key]
    torch.ops.onednn.qconv2d_pointwise.binary(
        x.contiguous(memory_format=torch.channels_last), 1.0, e["zp"], e["packed"], e["scales"], e["wzp"], r,
        e["beta"], e["stride"], e["padding"], e["dilation"], e["groups"], 1.0, e["zp_out"], torch.uint8,
        e["sum_scale"], e["zp_r"], "sum", 1.0, "none", [], "")
    if e["narrow"] is not None:
        r.clamp_(*e["narrow"])


@torch.library.custom_op("lowbit::linear_u8", mutates_args=())
def linear_u8(x: torch.Tensor, key: str) -> torch.Tensor:
    """A prepacked int8 linear layer that requantizes in its epilogue and writes uint8 codes."""
    e = _PACKED[key]
    return torch.ops.onednn.qlinear_pointwise(x.contiguous(), 1.0, e["zp"], e["packed"], e["scales"], e["wzp"],
                                              e["beta"], 1.0, e["zp_out"], torch.uint8, "hardtanh", e["clip"], "")


@linear_u8.register_fake
def _(x: torch.Tensor, key: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], _PACKED[key]["out"]), dtype=torch.uint8)


def _conv_out(x: torch.Tensor, e: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    size = [x.shape[0], e["out"]]
    for i in range(2):
        k = e["dilation"][i] * (e["kernel"][i] - 1) + 1
        size.append((x.shape[2 + i] + 2 * e["padding"][i] - k) // e["stride"][i] + 1)
    return torch.empty(size, dtype=dtype, device=x.device, memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------- the backend

def run_logits(fast: Any, shape: tuple[int, ...], inputs: Any) -> torch.Tensor:
    """``fast``'s integer logits: eagerly until a shape's eager calls add up to ``AUTO_COMPILE_AFTER_S`` (under
    ``compile="auto"``), compiled after; the first compiled call's time is kept in ``compile_seconds``.

    Shared by the fast paths (CNN and encoder): ``fast`` has ``compile``, ``_compiled``, ``_body``, ``_eager_s``
    and ``compile_seconds``.
    """
    with torch.inference_mode():
        eager = fast.compile == "auto" and fast._eager_s.get(shape, 0) < AUTO_COMPILE_AFTER_S
        if fast._compiled is None or eager:
            t0 = time.perf_counter()
            out = fast._body(inputs)["logits"]
            fast._eager_s[shape] = fast._eager_s.get(shape, 0) + time.perf_counter() - t0
            return out
        t0 = time.perf_counter()
        out = fast._compiled(inputs)["logits"]
        fast.compile_seconds.setdefault(shape, time.perf_counter() - t0)
        return out

class FastModel:
    """``FastModel(IntegerModel)``: the same integer logits as the reference runtime, bit for bit, on oneDNN's
    int8 kernels with the glue compiled.

    Every conv/linear whose input is 8-bit codes runs ``qconv2d_pointwise`` / ``qlinear_pointwise`` with unit
    scales and a float32 output: the int32 accumulators, exact while ``|acc| < 2^24`` (checked per layer from
    the weights and the input's bounds, :func:`value_bounds`). Requantizations, adds, pools, clamps and the
    input lookup are the reference formulas in the narrowest arithmetic their bounds prove exact (float32, int32,
    else int64), on values stored as uint8 codes or int32; the whole graph around the opaque int8
    kernels is one ``torch.compile`` (Inductor) graph.

    ``paths``: per conv/linear, ``"int8 fused"`` (oneDNN int8 requantizing in its float32 epilogue and writing
    uint8 codes, proved exact per channel by :func:`~lowbit.ir.dyadic.float32_epilogue_exact`; ``epilogue``
    says, per layer with narrow output codes, this or why not), ``"int8"`` (oneDNN int8, exact int32
    accumulators, requantized in the compiled glue) or ``"fp32 conv2d (why)"``
    / ``"fp64 linear (why)"`` (an exact float conv or matmul on integer-valued tensors); ``requant``: per node with
    a requantization, its arithmetic (``"float32"``, ``"int32"``, ``"int64"`` or ``"in the int8 kernel"``);
    ``fallbacks``: nodes run by the reference kernel (an op this backend has no kernel for: the model then runs
    eagerly, with one warning). ``compile``: True compiles on
    the first call, False runs the same arithmetic eagerly (bit-identical, slower), ``"auto"`` (the default,
    or ``LOWBIT_COMPILE=0|1|auto``) compiles an input shape once its eager calls have taken
    :data:`AUTO_COMPILE_AFTER_S` seconds, so a short job stays eager and a long one pays the compile once.
    ``compile_seconds``: the compiling call's time per input shape.

    ``chunk``: the most images per call of the graph; a larger batch runs in as few equal chunks as that allows
    (64 images with ``chunk`` 20: four of 16), the last one padded with zero input to the same shape where the
    batch does not divide (images are independent: the padding changes no other image's integers); the chunk shape
    follows the batch size, so each batch size compiles its own graph (``compile="auto"`` compiles only the ones
    that run long enough to repay it). Default: as
    many images as keep the largest intermediate below :data:`CHUNK_BYTES` (at batch 64, fresh pages for
    ResNet-18's 200 MB of stem accumulators cost more than the conv).
    """

    def __init__(self, model: IntegerModel, capability: str | None = None, compile: bool | str | None = None,
                 chunk: int | None = None):
        if not available():
            raise LowbitError("this PyTorch build has no oneDNN quantized ops (torch.ops.onednn.qconv2d_pointwise)")
        self.model = model
        self.capability = cpu_capability() if capability is None else check_capability(capability)
        self.paths: dict[str, str] = {}
        self.requant: dict[str, str] = {}
        self.epilogue: dict[str, str] = {}
        self.fallbacks: list[str] = []
        self.bounds = value_bounds(model)
        self._zp: dict[str, int | None] = {}  # value -> zero point of its uint8 form, None: int32
        readers: dict[str, list[str]] = {}
        for node in model.nodes:
            for v in node.inputs:
                readers.setdefault(v, []).append(node.op)
        builders = kernels("cpu_fast")
        self.last_reader = {v: n.name for n in model.nodes for v in n.inputs}  # value -> its last reader
        # values that only ops making new tensors read (no view or pass-through of them can outlive their reader)
        self.consumed = {v for v in self.last_reader
                         if all(n.op in _CONSUMING for n in model.nodes if v in n.inputs)}
        self.tracing = False  # run_trace keeps every value: no step may then write into its input
        self._pool_first = {n.output for n in model.nodes if n.op == "conv2d" and "maxpool2d" in builders
                            and readers.get(n.output) == ["maxpool2d"]}
        self._deferred: dict[str, tuple[Any, int | None]] = {}  # conv output held as accumulators -> (rq, zp)
        self._steps = []
        for node in model.nodes:
            self._zp[node.output] = self._rep(node)
            build = builders.get(node.op)
            self._steps.append(self._reference_step(node) if build is None else
                               build(self, node, model.params[node.name]))
        if compile is None:
            env = os.environ.get("LOWBIT_COMPILE", "auto").strip().lower()
            compile = {"0": False, "1": True}.get(env, "auto")
        self.compile = compile if self.fallbacks == [] else False
        if self.fallbacks:
            ops = sorted({model.graph.node(n).op for n in self.fallbacks})
            warnings.warn(f"{model.source}: the fast backend has no kernel for op(s) {', '.join(ops)}: node(s) "
                          f"{', '.join(self.fallbacks)} run on the reference kernel, the model eagerly", stacklevel=2)
        if self.compile:  # one graph per (model, input shape): raise Dynamo's per-function recompile limit
            dynamo = torch._dynamo.config
            dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
        self._compiled = torch.compile(self._body, dynamic=False) if self.compile else None
        self._eager_s: dict[tuple[int, ...], float] = {}
        self.compile_seconds: dict[tuple[int, ...], float] = {}
        if chunk is not None and chunk < 1:
            raise LowbitError(f"chunk must be at least 1 image, got {chunk}")
        self.chunk = chunk or max(1, CHUNK_BYTES // max(1, self.image_bytes()))

    def image_bytes(self) -> int:
        """Bytes of one image's largest intermediate tensor: a value stored as uint8 codes or int32, or the float32
        accumulators of a conv/linear requantized in the glue."""
        out = 0
        for node in self.model.nodes:
            n = math.prod(self.model.shapes[node.output])
            glue = node.name in self.paths and self.paths[node.name] != "int8 fused"
            out = max(out, n * (4 if glue or self._zp[node.output] is None else 1))
        return out

    @property
    def compiled(self) -> bool:
        """Whether calls run (or will run, ``compile="auto"``) the compiled graph."""
        return bool(self.compile)

    @property
    def vnni(self) -> bool:
        """No int16 saturation on the assumed capability."""
        return not int16_saturates(self.capability)

    def _rep(self, node: Node) -> int | None:
        """Zero point of the value's uint8 form when its bounds fit in 0..255 after it, else None (int32)."""
        lo, hi = self.bounds[node.output]
        zp = max(0, -lo)
        return zp if hi + zp <= 255 else None

    def _reference_step(self, node: Node):
        self.fallbacks.append(node.name)

        def run(env):
            xs = [_to_int(env[i], self._zp.get(i)).to(torch.int32) for i in node.inputs]
            y = self.model._step(node, xs)
            return _from_float(y, self._zp[node.output])

        return run

    # ------------------------------------------------------------------------------------------ running
    def _body(self, x: torch.Tensor, trace: bool = False) -> dict[str, torch.Tensor]:
        env = {self.model.graph.inputs[0]: x}
        for node, step in zip(self.model.nodes, self._steps):
            env[node.output] = step(env)
        if trace:
            for k, (rq, zp) in self._deferred.items():
                env[k] = _from_float(rq(env[k]), zp)
            return {k: _to_int(v, self._zp.get(k)) for k, v in env.items() if k != self.model.graph.inputs[0]}
        return {"logits": _to_int(env["logits"], self._zp["logits"]).to(torch.int32)}

    def run_trace(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every integer value of the graph (int64, by value name), run eagerly: for comparisons."""
        self.model._check_input(x)
        self.tracing = True
        try:
            with torch.inference_mode():
                return self._body(self._prologue(x), trace=True)
        finally:
            self.tracing = False

    def run_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer logits (int32), identical to :meth:`IntegerModel.run_int` (``chunk`` images per call)."""
        self.model._check_input(x)
        x = self._prologue(x)
        n, c = x.shape[0], self.chunk
        if n <= c:
            return run_logits(self, tuple(x.shape), x)
        c = -(-n // -(-n // c))  # equal chunks: ceil(n / number of chunks)
        outs = []
        for i in range(0, n, c):
            part = x[i:i + c]
            if len(part) < c:  # the compiled chunk shape: zero input (valid codes or pixels) fills it
                part = torch.cat([part, part.new_zeros((c - len(part), *part.shape[1:]))])
                if x.is_contiguous(memory_format=torch.channels_last):  # the full chunks' strides
                    part = _cl(part)
            outs.append(run_logits(self, tuple(part.shape), part)[: n - i])
        return torch.cat(outs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.run_int(x).to(torch.float64) * self.model.output_scale).to(torch.float32)

    def _prologue(self, x: torch.Tensor) -> torch.Tensor:
        """Float input: the reference's float32 quantizer, eagerly (a compiled division could become a
        multiplication by the reciprocal and round differently). uint8 pixels go in as they are, channels-last."""
        node = self.model.nodes[0]
        if self.model.pixel_input:  # channels-last before the lookup: ATen transposes bytes 4x faster than Inductor
            return _cl(x)
        a = node.attrs
        return (x.to(torch.float32) / torch.tensor(a["scale"], dtype=torch.float32)).clamp(a["lo"], a["hi"]).round()

    def describe(self) -> str:
        """One line: how many layers run on int8 kernels, how many requantize in the kernel (uint8 out), which
        do not and why, and the fallbacks."""
        other = {n: p for n, p in self.paths.items() if not p.startswith("int8")}
        fused = [n for n, p in self.paths.items() if p == "int8 fused"]
        glue = {n: e.removeprefix("compiled glue: ") for n, e in self.epilogue.items() if n not in fused}
        return (f"{len(self.paths) - len(other)}/{len(self.paths)} conv/linear layers on oneDNN int8, "
                f"{len(fused)} of them requantizing in the kernel (uint8 codes out), the others writing exact int32 "
                f"accumulators; glue requantization in {_modes(self.requant)}"
                + (f"; narrow outputs requantized outside the kernel: {_list(glue)}" if glue else "")
                + (f"; exact float conv for {_list(other)}" if other else "")
                + (f"; reference kernel for {', '.join(self.fallbacks)}" if self.fallbacks else "")
                + ("" if self.compiled else "; eager (not compiled)"))


def _modes(requant: dict[str, str]) -> str:
    """``"int32 x9, float64 x6"``: how many requantizations run in each arithmetic (kernel-fused ones left out)."""
    counts: dict[str, int] = {}
    for r in requant.values():
        if r != "in the int8 kernel":
            mode = r.split(" ")[0]
            counts[mode] = counts.get(mode, 0) + 1
    return ", ".join(f"{m} x{n}" for m, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def _list(d: dict[str, str]) -> str:
    return ", ".join(f"{k} [{v}]" for k, v in d.items())


# Values inside the graph: uint8 codes shifted by a zero point (narrow) or int32 integers (wide; the reference
# runtime holds every value in int32, so int32 always suffices). Arithmetic happens in registers, in the
# narrowest exact type (:class:`_Requant`); only these 1- or 4-byte forms are stored.
def _as_f64(t: torch.Tensor, zp: int | None) -> torch.Tensor:
    return t.to(torch.float64) if zp is None else t.to(torch.float64) - zp


def _as_int(t: torch.Tensor, zp: int | None) -> torch.Tensor:
    """The integer value as int32 (exact: codes, wide values and float32 accumulators all fit)."""
    return t.to(torch.int32) if zp is None else t.to(torch.int32) - zp


def _from_float(v: torch.Tensor, zp: int | None) -> torch.Tensor:
    """Store an integer-valued tensor (any dtype, value within int32): uint8 codes + zp, or int32."""
    return v.to(torch.int32) if zp is None else (v + zp).to(torch.uint8)


def _to_int(t: torch.Tensor, zp: int | None) -> torch.Tensor:
    return t.to(torch.int64) - (zp or 0)


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _drop_common_twos(m: torch.Tensor, k: torch.Tensor, *terms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(m, k, *terms)`` with the powers of two that every one of ``m, *terms`` shares (up to ``k``) divided
    out of them and of ``k``: ``(v*m + b) * 2^-k`` is the same number, with smaller intermediates (a multiplier
    ``2^30`` with shift 46, a wide value requantized to codes, becomes 1 with shift 16 and stays in float64)."""
    m, k, *terms = torch.broadcast_tensors(m, k, *terms)
    twos = k.clone()
    for t in (m, *terms):
        nz = t != 0
        tz = torch.where(nz, (t & -t).clamp_min(1).to(torch.float64).log2().round().to(torch.int64), twos)
        twos = torch.minimum(twos, tz)
    return (m >> twos, k - twos, *(t >> twos for t in terms))


INT32_LIMIT = 2**31


def _round_shift_int(x: torch.Tensor, k, c, pos) -> torch.Tensor:
    """The reference's :func:`~lowbit.ir.dyadic.round_shift` in ``x``'s integer dtype: ``(x + c + (q & 1)) >> k``
    with ``q = x >> k`` (floor), ``c = 2^(k-1) - 1`` and ``pos = [k > 0]``; exact while ``|x| + 2^(k-1) <`` the
    dtype's limit (arithmetic shifts floor)."""
    odd = torch.bitwise_and(torch.bitwise_right_shift(x, k), pos)
    return torch.bitwise_right_shift(x + c + odd, k)


class _Requant:
    """``clamp(round_half_even((v*m + b) * 2^-k), lo, hi)`` on integer-valued tensors (codes, int32 wide values or
    float32 accumulators), in the narrowest arithmetic that is exact for ``|v| <= v_max`` (per channel), with
    ``bound = max|v|*|m| + |b|`` after dividing out the powers of two ``m`` and ``b`` share (``mode``):

    * ``"float32"`` when the input is float32 (accumulators) and ``bound < 2^24``: every product and sum is an
      exact float32 integer, scaling by ``2^-k`` is exact and ``round`` rounds half to even;
    * ``"int32"`` when ``bound + 2^(k-1) < 2^31``: the reference's shift-and-round (:func:`_round_shift_int`) in
      int32, so ``v*m + b`` and the rounding offset never overflow;
    * ``"int64"`` otherwise: the reference's own arithmetic (``bound + 2^(k-1) < 2^63``).

    No float64: Inductor's vectorized CPU code converts float64 to and from other types one element at a time
    (ATen's AVX-512 vector conversions have no double specializations), so exact float64 glue ran 2-3x slower
    than the same int64 arithmetic (``vpmullq``, variable shifts) at ResNet-18's shapes.

    ``axis``: the channel axis of per-channel parameters. With ``mr`` (a fused residual add, conv2d_add) the value
    is ``(v*m + b + r*m_r) * 2^-k`` for residual values ``|r| <= r_max`` (the bound grows by ``r_max*|m_r|``; the
    residual, codes or int32, is converted to the arithmetic's type, exactly). The result is an integer-valued
    tensor (float32, int32 or int64), stored by :func:`_from_float`."""

    def __init__(self, m, k, bias, lo: int, hi: int, v_max: int | torch.Tensor, axis: int, ndim: int,
                 int64: bool = False, float32_input: bool = False, mr=None, r_max: int = 0):
        terms = [torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in (m, k, bias, 0 if mr is None else mr)]
        m, k, bias, mr_t = _drop_common_twos(*terms)
        v_max = torch.as_tensor(v_max, dtype=torch.int64).reshape(-1)
        bound = max(int(vm) * abs(int(mm)) + abs(int(bb)) + r_max * abs(int(rr)) for vm, mm, bb, rr in
                    zip(*torch.broadcast_tensors(v_max, m, bias, mr_t)))
        half = (1 << (int(k.max()) - 1)) if int(k.max()) > 0 else 0
        if int64:
            self.mode = "int64"
        elif float32_input and bound < FLOAT32_EXACT_LIMIT:  # float32 accumulators: no conversion at all
            self.mode = "float32"
        elif bound + half < INT32_LIMIT:
            self.mode = "int32"
        else:
            self.mode = "int64"
        if bound + half >= 2**63:
            raise LowbitError(f"fast path: |v*m + b| may reach 2^{math.log2(bound):.1f}, beyond int64")
        self.why = self.mode
        shape = [1] * ndim
        if max(m.numel(), k.numel(), bias.numel(), mr_t.numel()) > 1:
            shape[axis] = -1
        self.residual = mr is not None
        self.lo, self.hi = float(lo), float(hi)
        self.ilo, self.ihi = lo, hi
        if self.mode == "float32":
            dt = self.dt = torch.float32
            self.m = m.to(dt).reshape(shape) if m.numel() > 1 else float(m)
            self.b = bias.to(dt).reshape(shape) if bias.numel() > 1 else float(bias)
            self.mr = mr_t.to(dt).reshape(shape) if mr_t.numel() > 1 else float(mr_t)
            p2 = torch.pow(2.0, -k.to(torch.float64))
            self.p2 = p2.to(dt).reshape(shape) if k.numel() > 1 else float(p2)
        else:
            dt = torch.int32 if self.mode == "int32" else torch.int64
            self.dt = dt
            pos = (k > 0).to(torch.int64)
            c = (pos << (k - 1).clamp_min(0)) - pos

            def param(t):  # a Python int for a per-tensor parameter: no broadcast load in the graph
                return t.to(dt).reshape(shape) if t.numel() > 1 else int(t)

            self.m, self.b, self.k, self.c, self.pos, self.mr = (param(t) for t in (m, bias, k, c, pos, mr_t))

    def __call__(self, v: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        x = v.to(self.dt) * self.m + self.b
        if self.residual:
            x = x + r.to(self.dt) * self.mr
        if self.mode == "float32":
            return torch.round(x * self.p2).clamp(self.lo, self.hi)
        return _round_shift_int(x, self.k, self.c, self.pos).clamp(self.ilo, self.ihi)


# ------------------------------------------------------------------------------------------------ kernels
# A cpu_fast kernel builds a node's step: ``build(fast_model, node, params) -> step(env) -> value``, traced
# by torch.compile. Ops without one run the reference kernel (``FastModel.fallbacks``).
@kernel("quantize_input", backend="cpu_fast")
def _fast_input(fm: FastModel, node: Node, p):
    zp, src = fm._zp[node.output], node.inputs[0]
    if "lut" not in p:  # the float quantizer ran eagerly in the prologue: codes as float32
        return lambda env: _from_float(env[src], zp)
    lut = p["lut"].to(torch.int64)
    flat = (lut + zp).to(torch.uint8).reshape(-1) if zp is not None else lut.to(torch.int32).reshape(-1)
    offs = (torch.arange(lut.shape[0]) * 256).reshape(1, -1, *[1] * (len(fm.model.input_spec["shape"]) - 1))

    def quantize(env):
        y = flat[env[src].to(torch.int64) + offs] if lut.shape[0] > 1 else flat[env[src].to(torch.int64)]
        return _cl(y)

    return quantize


@kernel("conv2d", backend="cpu_fast")
@kernel("conv2d_add", backend="cpu_fast")
@kernel("linear", backend="cpu_fast")
def _fast_layer(fm: FastModel, node: Node, p):
    """A conv/linear (conv2d_add: with the residual of its second input added before the one rounding): oneDNN int8
    requantizing in its float32 epilogue (conv2d_add: with a sum post-op reading the residual codes) where that is
    provably exact, else exact accumulators requantized in the compiled glue, else an exact float conv."""
    a, w, src = node.attrs, p["weight"], node.inputs[0]
    zp_in, zp = fm._zp[src], fm._zp[node.output]
    res = node.inputs[1] if node.op == "conv2d_add" else None
    zp_r = fm._zp[res] if res else None
    conv = node.op != "linear"
    lo_c, hi_c = acc_bounds(w, fm.bounds[src])
    acc_max = int(torch.maximum(lo_c.abs(), hi_c.abs()).max()) if w.numel() else 0
    w_max = int(w.abs().max()) if w.numel() else 0
    why = None
    if zp_in is None:
        why = "input is not 8-bit codes"
    elif acc_max >= FLOAT32_EXACT_LIMIT:
        why = f"|acc| may reach 2^{math.log2(acc_max):.1f} >= 2^24, beyond exact float32 accumulators"
    elif int16_saturates(fm.capability) and 2 * (fm.bounds[src][1] + zp_in) * w_max > INT16_MAX:
        why = "u8 x s8 pair sums could saturate int16 without VNNI"
    axis, ndim = (1, 4) if conv else (-1, 2)
    rq = _Requant(p["multiplier"], p["shift"], p["bias"], a["lo"], a["hi"],
                  torch.maximum(lo_c.abs(), hi_c.abs()), axis % ndim, ndim,
                  float32_input=acc_max < FLOAT32_EXACT_LIMIT,  # float32 accumulators (int8 kernel or fp32 conv)
                  mr=p["residual_multiplier"] if res else None, r_max=_max_abs(fm.bounds[res]) if res else 0)
    fm.requant[node.name] = rq.why
    if why is None and zp is not None:
        if res:
            fused_why = _fused_sum_why(w, p, a, zp_in, zp, lo_c, hi_c, fm.bounds[res], zp_r)
        else:
            fused_why = _fused_why(w, p, a, zp_in, zp, lo_c, hi_c)
        fm.epilogue[node.name] = fused_why or ("in the kernel (uint8 codes" + (", residual sum post-op)" if res
                                                                               else ")"))
        if not fused_why:
            fm.paths[node.name] = "int8 fused"
            fm.requant[node.name] = "in the int8 kernel"
            key = _register_fused(node.op, w, a, zp_in, p, a["lo"], a["hi"], zp, zp_r)
            if res:
                return _fused_add(fm, node, src, res, key)
            if conv:
                return lambda env: conv_u8(_cl(env[src]), key)
            return lambda env: linear_u8(env[src].contiguous(), key)
    if why is None:
        fm.paths[node.name] = "int8"
        key = register_layer("conv2d" if conv else "linear", w.to(torch.int8).contiguous(), a, zp_in)
        acc_op = conv_acc if conv else linear_acc

        if res:
            return lambda env: _from_float(rq(acc_op(_cl(env[src]), key), _as_int(env[res], zp_r)), zp)
        if node.output in fm._pool_first and int(p["multiplier"].min()) >= 0:
            # read only by a max pool, and rq is non-decreasing (m >= 0; round and clamp are monotone): the
            # pool selects from the accumulators and requantizes 1/window of the values (exact, same result)
            fm._deferred[node.output] = (rq, zp)
            return lambda env: acc_op(_cl(env[src]), key)

        def layer(env):
            x = env[src]
            x = _cl(x) if conv else x.contiguous()
            return _from_float(rq(acc_op(x, key)), zp)

        return layer
    dt = torch.float32 if acc_max < FLOAT32_EXACT_LIMIT else torch.float64
    if acc_max >= EXACT_LIMIT:
        raise LowbitError(f"fast path: layer {node.name!r} is too wide for exact float64 products")
    fm.paths[node.name] = f"{'fp32' if dt == torch.float32 else 'fp64'} {'conv2d' if conv else 'linear'} ({why})"
    wt = w.to(dt)
    if conv:
        wt = wt.contiguous(memory_format=torch.channels_last)

    def exact_layer(env):
        x = _as_int(env[src], zp_in).to(dt)
        if conv:
            acc = F.conv2d(_cl(x), wt, None, a["stride"], a["padding"], a["dilation"], a["groups"])
        else:
            acc = x @ wt.T
        return _from_float(rq(acc, _as_int(env[res], zp_r) if res else None), zp)

    return exact_layer


def _fused_why(w: torch.Tensor, p, a: dict[str, Any], zp_in: int, zp_out: int, lo_c: torch.Tensor,
               hi_c: torch.Tensor) -> str:
    """Why this int8 layer (narrow codes out) cannot requantize in the kernel's float32 epilogue, or ""."""
    m = p["multiplier"].to(torch.int64)
    if bool((m < 0).any()) and w.numel() and bool((w[m < 0] == -128).any()):
        return "compiled glue: negating a channel with multiplier < 0 needs weight code +128"
    ok, why = float32_epilogue_exact(m, p["shift"], p["bias"], a["lo"], a["hi"], zp_out, lo_c, hi_c)
    if not bool(ok.all()):
        return f"compiled glue: {int((~ok).sum())}/{ok.numel()} channels not exact in a float32 epilogue ({why})"
    return ""


# Ops whose fast kernels always return a new tensor (never a view or their input itself).
_CONSUMING = frozenset({"conv2d", "conv2d_add", "linear", "requantize", "add", "maxpool2d", "avgpool2d",
                        "adaptive_avgpool"})


def _fused_add(fm: FastModel, node: Node, src: str, res: str, key: str):
    """The step of an in-kernel residual add: into the residual's own buffer where this node is its last reader,
    every reader of it makes a new tensor (so no view of it outlives them) and the conv does not read that very
    value, else into a copy; a code range narrower than uint8's is one clamp inside the op, after the kernel (the sum
    post-op saturates at uint8's ends only)."""
    last = fm.last_reader.get(res) == node.name and res in fm.consumed and src != res

    def step(env):
        x, r = _cl(env[src]), env[res]
        if last and not fm.tracing and r.dtype == torch.uint8 and r.is_contiguous(memory_format=torch.channels_last):
            conv_add_u8_(x, r, key)
            return r
        return conv_add_u8(x, _cl(r), key)

    return step


def _fused_sum_why(w: torch.Tensor, p, a: dict[str, Any], zp_in: int, zp_out: int, lo_c: torch.Tensor,
                   hi_c: torch.Tensor, r_range: tuple[int, int], zp_r: int | None) -> str:
    """Why this conv2d_add cannot run as one int8 kernel with a residual sum post-op writing uint8, or "": the
    residual must be stored as uint8 codes, and the epilogue exact
    (:func:`~lowbit.ir.dyadic.float32_sum_epilogue_exact`). The sum post-op has no clip: it saturates at uint8's
    ends, and a narrower ``[lo, hi]`` is one clamp of the uint8 result after it, which gives the reference's clamp:
    both sides are exact on the accumulators that round into ``[lo, hi]`` and monotone beyond them."""
    m = p["multiplier"].to(torch.int64)
    if zp_r is None:
        return "compiled glue: the residual is a wide (int32) value, not uint8 codes"
    if a["lo"] + zp_out < 0 or a["hi"] + zp_out > 255:
        return f"compiled glue: the output range [{a['lo']}, {a['hi']}] plus zero point {zp_out} is not in uint8"
    if bool((m < 0).any()) and w.numel() and bool((w[m < 0] == -128).any()):
        return "compiled glue: negating a channel with multiplier < 0 needs weight code +128"
    ok, why = float32_sum_epilogue_exact(m, p["shift"], p["bias"], p["residual_multiplier"], a["lo"], a["hi"], zp_out,
                                         lo_c, hi_c, r_range[0], r_range[1], zp_r)
    if not bool(ok.all()):
        return f"compiled glue: {int((~ok).sum())}/{ok.numel()} channels not exact in a float32 epilogue ({why})"
    return ""


@kernel("requantize", backend="cpu_fast")
def _fast_requantize(fm: FastModel, node: Node, p):
    a, src = node.attrs, node.inputs[0]
    rq = _Requant(a["multiplier"], a["shift"], a["bias"], a["lo"], a["hi"], _max_abs(fm.bounds[src]), 1, 1)
    fm.requant[node.name] = rq.why
    zp_in, zp = fm._zp[src], fm._zp[node.output]
    return lambda env: _from_float(rq(_as_int(env[src], zp_in)), zp)


@kernel("add", backend="cpu_fast")
def _fast_add(fm: FastModel, node: Node, p):
    """``clamp(round_half_even((a*m_a + b*m_b + bias) * 2^-shift), lo, hi)`` after dividing out shared powers of
    two, with ``bound = max|a|*|m_a| + max|b|*|m_b| + |bias|``: the reference's shift-and-round in int32 when
    ``bound + 2^(shift-1) < 2^31``, else in int64 (as the reference), refused where even int64 could wrap."""
    a = node.attrs
    (sa, sb), zp = node.inputs, fm._zp[node.output]
    ma, s, mb, bias = (int(v) for v in _drop_common_twos(*(torch.tensor([a[key]]) for key in (
        "multiplier_a", "shift", "multiplier_b", "bias"))))
    za, zb = fm._zp[sa], fm._zp[sb]
    bound = _max_abs(fm.bounds[sa]) * abs(ma) + _max_abs(fm.bounds[sb]) * abs(mb) + abs(bias)
    lo, hi = a["lo"], a["hi"]
    half = (1 << (s - 1)) if s > 0 else 0
    if bound + half >= 2**63:  # refused at load (lowbit.ir.ops); this guards a graph edited after loading
        raise LowbitError(f"fast path: add {node.name!r}: |a*m_a + b*m_b + bias| may reach 2^{math.log2(bound):.1f}, "
                          f"beyond int64")
    dt = torch.int32 if bound + half < INT32_LIMIT else torch.int64
    fm.requant[node.name] = "int32" if dt == torch.int32 else "int64"
    c, pos = max(half - 1, 0), int(s > 0)

    def add(env):
        v = _as_int(env[sa], za).to(dt) * ma + _as_int(env[sb], zb).to(dt) * mb + bias
        return _from_float(_round_shift_int(v, s, c, pos).clamp(lo, hi), zp)

    return add


@kernel("relu", backend="cpu_fast")
def _fast_relu(fm: FastModel, node: Node, p):
    src = node.inputs[0]
    return lambda env: _from_float(_as_int(env[src], fm._zp[src]).clamp_min(0), fm._zp[node.output])


@kernel("clamp", backend="cpu_fast")
def _fast_clamp(fm: FastModel, node: Node, p):
    src, lo, hi = node.inputs[0], int(node.attrs["lo"]), int(node.attrs["hi"])
    return lambda env: _from_float(_as_int(env[src], fm._zp[src]).clamp(lo, hi), fm._zp[node.output])


@kernel("maxpool2d", backend="cpu_fast")
def _fast_maxpool(fm: FastModel, node: Node, p):
    """Max selects: it runs on the stored form itself (uint8 codes, int32 values, float32 accumulators of a
    deferred conv), with no conversion; window padding never wins (PyTorch pads max pools with the least value)."""
    a, src = node.attrs, node.inputs[0]
    geometry = (a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    zp_in, zp = fm._zp[src], fm._zp[node.output]
    if src in fm._deferred:  # the producing conv's accumulators: pool, then its requantization
        rq, _ = fm._deferred[src]
        return lambda env: _from_float(rq(F.max_pool2d(env[src], *geometry)), zp)
    if zp_in == zp:  # same bounds, same stored form (uint8 + zp is monotone)
        return lambda env: _max_pool_stored(env[src], geometry)
    return lambda env: _from_float(_as_int(F.max_pool2d(env[src], *geometry), zp_in), zp)


def _max_pool_stored(x: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """Max pool on the stored form. Compiled, Inductor's loops select on uint8 directly; eager ATen's integer
    max pool indexes in the element type (uint8 inputs with ``C*H*W > 255`` are refused), so eager codes pool as
    int32 (the same selection)."""
    if x.dtype == torch.uint8 and not torch.compiler.is_compiling():
        return F.max_pool2d(x.to(torch.int32), *geometry).to(torch.uint8)
    return F.max_pool2d(x, *geometry)


@kernel("avgpool2d", backend="cpu_fast")
@kernel("adaptive_avgpool", backend="cpu_fast")
def _fast_pool(fm: FastModel, node: Node, p):
    a, src = node.attrs, node.inputs[0]
    n = _window(node, fm.model)
    rq = _Requant(a["multiplier"], a["shift"], a["bias"], a["lo"], a["hi"], _max_abs(fm.bounds[src]) * n, 1, 4)
    fm.requant[node.name] = rq.why
    zp_in, zp = fm._zp[src], fm._zp[node.output]
    h, w = fm.model.shapes[src][-2:]

    def pool(env):  # window sums: int64 for the global pool, float64 windows (exact: n * 2^31 < 2^53, n < 2^22)
        if node.op == "adaptive_avgpool" and list(a["output_size"]) == [1, 1]:
            return _from_float(rq(_as_int(env[src], zp_in).sum((2, 3), keepdim=True, dtype=torch.int64)), zp)
        x = _as_f64(env[src], zp_in)
        if node.op == "avgpool2d":
            s = F.avg_pool2d(x, a["kernel_size"], a["stride"], a["padding"], count_include_pad=True,
                             divisor_override=1)
        else:
            oh, ow = a["output_size"]
            k = (h // oh, w // ow)
            s = F.avg_pool2d(x, k, k, 0, count_include_pad=True, divisor_override=1)
        return _from_float(rq(s), zp)

    return pool


@kernel("flatten", backend="cpu_fast")
def _fast_flatten(fm: FastModel, node: Node, p):
    src, d = node.inputs[0], node.attrs["start_dim"]
    return lambda env: torch.flatten(env[src], d)  # same bounds, same representation


@kernel("upsample_nearest", backend="cpu_fast")
def _fast_upsample(fm: FastModel, node: Node, p):
    src, (sh, sw) = node.inputs[0], node.attrs["scale"]

    def up(env):
        x = env[src]
        n, c, h, w = x.shape
        return _cl(x[:, :, :, None, :, None].expand(n, c, h, sh, w, sw).reshape(n, c, h * sh, w * sw))

    return up


@kernel("concat", backend="cpu_fast")
def _fast_concat(fm: FastModel, node: Node, p):
    zp = fm._zp[node.output]
    return lambda env: _cl(_from_float(torch.cat([_as_int(env[i], fm._zp[i]) for i in node.inputs], 1), zp))


@kernel("dequantize_output", backend="cpu_fast")
def _fast_dequantize(fm: FastModel, node: Node, p):
    src = node.inputs[0]
    return lambda env: _from_float(_as_int(env[src], fm._zp[src]), fm._zp[node.output])



# ---------------------------------------------------------------------------------- per-layer latency probe
# One conv/linear on oneDNN int8 with the requantization folded into the kernel (float32, not bit-exact):
# what the per-layer latency table (lowbit.deploy.bench.latency_table) times at every bit width.
@dataclass
class _Val:
    """A value of :func:`layer_step` (the per-layer latency probe): uint8 codes shifted by ``zp``, or float32
    integer units (``zp`` None)."""

    t: torch.Tensor
    zp: int | None


def layer_step(op: str, a: dict[str, Any], p: dict[str, torch.Tensor], x_range: tuple[int, int], zp_in: int,
               zp_out: int | None, capability: str, name: str = "layer", sum_factor: float | None = None):
    """One conv/linear of the fast path: ``(step, path)`` with ``step([value]) -> value`` and the path taken
    (``"int8"``, or ``"exact (why)"``) on a CPU of ``capability`` (:data:`CAPABILITIES`). Used by
    :class:`FastModel` and by the per-layer latency table.

    With ``sum_factor`` (int8 conv only) the step is ``step(x_codes, shortcut) -> value``: the conv's output
    times ``sum_factor`` plus the float32 ``shortcut`` (overwritten), then ReLU if ``a["lo"] >= 0``, all in
    the kernel (a fused residual add, wide float32 output)."""
    w = p["weight"]
    pow2 = torch.pow(2.0, -p["shift"].to(torch.float64))
    mult, bias = p["multiplier"].to(torch.float64) * pow2, p["bias"].to(torch.float64) * pow2
    if sum_factor is not None:
        mult, bias = mult * sum_factor, bias * sum_factor
    lo_x, hi_x = x_range
    k, w_max = w[0].numel(), (int(w.abs().max()) if w.numel() else 0)
    sign = torch.where(mult < 0, -1, 1).reshape(-1, *[1] * (w.dim() - 1))
    flipped = w.to(torch.int64) * sign
    saturates = int16_saturates(capability) and 2 * (hi_x + zp_in) * w_max > INT16_MAX
    if saturates or (flipped.numel() and int(flipped.max()) > 127):
        path = "exact (" + ("int16 saturation without VNNI" if saturates else "sign flip needs code +128") + ")"
        bound = k * max(abs(lo_x), abs(hi_x)) * w_max
        if bound >= EXACT_LIMIT:
            raise LowbitError(f"fast path: layer {name!r} is too wide for exact float64 products")
        dt = torch.float32 if bound < FLOAT32_EXACT_LIMIT else torch.float64
        return _exact_step(op, a, p, zp_in, zp_out, dt), path
    zero = mult == 0
    w8 = torch.where(zero.reshape(sign.shape), 0, flipped).to(torch.int8).contiguous()
    scales = torch.where(zero, 1.0, mult.abs()).to(torch.float32)
    bias32 = bias.to(torch.float32)
    wzp = torch.zeros(w.shape[0], dtype=torch.int64)
    out_dtype = torch.uint8 if zp_out is not None else torch.float32
    lo, hi = _wide_bounds(a)
    if zp_out is not None or (lo, hi) not in ((None, None), (0, None)):  # a clamp (ReLU6, hardtanh) in the kernel
        attr, scalars = "hardtanh", [float(a["lo"]), float(a["hi"])]
    else:
        attr, scalars = ("relu", []) if a["lo"] >= 0 else ("none", [])
    if op == "conv2d":
        packed = torch.ops.onednn.qconv_prepack(w8, scales, 1.0, zp_in, a["stride"], a["padding"], a["dilation"],
                                                a["groups"], None)
        if sum_factor is not None:
            unary = "relu" if a["lo"] >= 0 else "none"

            def conv_sum(x, shortcut):
                return _Val(torch.ops.onednn.qconv2d_pointwise.binary(
                    x, 1.0, zp_in, packed, scales, wzp, shortcut, bias32, a["stride"], a["padding"], a["dilation"],
                    a["groups"], 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, unary, [], ""), None)

            return conv_sum, "int8"

        def conv(xs):
            return _Val(torch.ops.onednn.qconv2d_pointwise(
                xs[0].t, 1.0, zp_in, packed, scales, wzp, bias32, a["stride"], a["padding"], a["dilation"],
                a["groups"], 1.0, zp_out or 0, out_dtype, attr, scalars, ""), zp_out)

        return conv, "int8"
    packed = torch.ops.onednn.qlinear_prepack(w8, None)

    def linear(xs):
        return _Val(torch.ops.onednn.qlinear_pointwise(
            xs[0].t.contiguous(), 1.0, zp_in, packed, scales, wzp, bias32, 1.0, zp_out or 0, out_dtype, attr,
            scalars, ""), zp_out)

    return linear, "int8"


def _exact_step(op: str, a: dict[str, Any], p: dict[str, torch.Tensor], zp_in: int, zp_out: int | None,
                dt: torch.dtype):
    """Float conv/matmul on integer-valued tensors (exact by the caller's bound), then dyadic requantize."""
    w = p["weight"].to(dt)
    if op == "conv2d":
        w = w.contiguous(memory_format=torch.channels_last)

    def run(xs):
        x = xs[0].t.to(dt) - zp_in
        if op == "conv2d":
            acc, axis = F.conv2d(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"]), 1
        else:
            acc, axis = x @ w.T, -1
        y = requantize(acc.to(torch.int64), p["multiplier"], p["shift"], p["bias"], lo=a["lo"], hi=a["hi"],
                       axis=axis)
        if zp_out is None:
            return _Val(y.to(torch.float32), None)
        return _Val(_cl((y + zp_out).to(torch.uint8)), zp_out)

    return run




def _wide_bounds(a: dict[str, Any]) -> tuple[int | None, int | None]:
    """The bounds a wide value is clamped to (a folded ReLU, ReLU6 or hardtanh); None: the int32 limit."""
    return (a["lo"] if a["lo"] > INT32_MIN else None), (a["hi"] if a["hi"] < INT32_MAX else None)


def compare(fast: FastModel, ref: IntegerModel, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per node with an integer output: fraction of outputs that differ from the reference, max difference,
    and whether the backend holds the value as uint8 codes (``narrow``)."""
    got = fast.run_trace(x)
    want = ref.run_trace(x)
    out = {}
    for node in ref.nodes:
        name = node.outputs[0]
        if node.op == "dequantize_output" or name not in want or name not in got:
            continue
        d = (got[name].reshape(want[name].shape) - want[name].to(torch.int64)).abs()
        out[node.name] = {"frac_diff": float((d > 0).double().mean()), "max_diff": int(d.max()) if d.numel() else 0,
                          "narrow": fast._zp.get(name) is not None}
    return out
