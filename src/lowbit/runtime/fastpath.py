"""Fast path: a ``.lowbit`` model on PyTorch's oneDNN int8 CPU kernels (prepacked weights, channels-last).

Built from the file alone. Every conv/linear of <= 8 bits runs through ``torch.ops.onednn.qconv2d_pointwise``
/ ``qlinear_pointwise`` with uint8 activation codes (zero point ``-lo`` for signed codes) and int8 weight
codes. The requantization is the kernel's own: per-channel weight scale ``|m_c| * 2^-k_c`` (the sign of a
folded BN gamma moves into the weight codes), input and output scale 1, float bias ``b_c * 2^-k_c`` and a
``hardtanh(lo, hi)`` clamp, rounded half to even in float32. Wide (int32) values are carried as float32
tensors in their integer units, and residual adds, average pools and requantizations of wide values are
float32 elementwise ops.

Two kinds of layers cannot take the int8 kernels exactly, and run an exact path instead (float32 conv on
integer-valued tensors, exact while ``K * max|x| * max|w| < 2^24``, else float64, then the reference's
dyadic requantization):

* on CPUs without VNNI (AVX2), u8 x s8 pairs are summed in int16 with saturation (``vpmaddubsw``), so a layer
  is exact only when ``2 * max(x_u8) * max|w| <= 32767``: w8a8 layers (the usual first/last layers) fail it;
* 8-bit weights whose folded-BN sign flip would need the code +128.

Differences from the reference runtime therefore come only from float32 rounding (the kernels' requantization
and the wide values, which the reference rounds to int32 and the fast path does not); :func:`compare`
measures them.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.runtime.dyadic import requantize
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.reference import EXACT_LIMIT, FLOAT32_EXACT_LIMIT

INT16_MAX = 32767


def cpu_has_vnni() -> bool:
    """True when the CPU has an int8 dot-product instruction (no int16 saturation in u8 x s8 kernels)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    flags = set(m.group(1).split()) if m else set()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def available() -> bool:
    """Whether this PyTorch build has the oneDNN quantized ops the fast path needs."""
    return hasattr(torch.ops.onednn, "qconv2d_pointwise") and hasattr(torch.ops.onednn, "qlinear_pointwise")


@dataclass
class _Val:
    """A fast-path value: uint8 codes shifted by ``zp`` (narrow), or float32 integer units (wide)."""

    t: torch.Tensor
    zp: int | None  # None: wide float32

    def codes(self) -> torch.Tensor:
        """Integer view for comparisons: codes for narrow values, rounded units for wide ones."""
        if self.zp is None:
            return self.t.round().to(torch.int64)
        return self.t.to(torch.int64) - self.zp


class FastModel:
    """``FastModel(IntegerModel)``: same input and output as the reference runtime, on int8 kernels.

    ``paths`` tells, per conv/linear node, which path it takes: ``"int8"`` or ``"exact"`` (and why).
    """

    def __init__(self, model: IntegerModel, vnni: bool | None = None):
        if not available():
            raise LowbitError("this PyTorch build has no oneDNN quantized ops (torch.ops.onednn.qconv2d_pointwise)")
        self.model = model
        self.vnni = cpu_has_vnni() if vnni is None else vnni
        self.paths: dict[str, str] = {}
        self._zp: dict[str, int | None] = {}
        self._ranges = model.value_ranges()
        self._fused: dict[str, Any] = {}  # add node name -> fused conv step taking (conv inputs, shortcut)
        self._fusable = self._find_fusable_adds()
        self._steps = [self._build(node) for node in model.nodes]

    def _find_fusable_adds(self) -> dict[str, tuple[dict[str, Any], int, float, float]]:
        """conv name -> (add node, branch index, branch factor, shortcut factor) for adds the kernel can fuse.

        The oneDNN ``sum`` post-op adds a float32 tensor to the conv's float32 output (before an optional
        ReLU) and overwrites that tensor, so: a conv branch read only by the add, a float32 (wide) shortcut
        with factor exactly 1 (the lowering gives shortcut and sum one scale) that nothing reads afterwards.
        The kernel sums ``(f_branch / f_shortcut) * conv + shortcut``, and the shortcut factor is applied after:
        folded into the one ``quantize_per_tensor`` that rounds a narrow (codes) output, or one multiply.
        """
        nodes = self.model.nodes
        producer = {n["outputs"][0]: n for n in nodes}
        readers: dict[str, int] = {}
        last: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for v in n["inputs"]:
                readers[v] = readers.get(v, 0) + 1
                last[v] = i
        found = {}
        for i, n in enumerate(nodes):
            a = n.get("attrs", {})
            if n["op"] != "add" or a["bias"]:
                continue
            factors = [a["multiplier_a"] * 2.0 ** -a["shift"], a["multiplier_b"] * 2.0 ** -a["shift"]]
            for branch in (0, 1):
                b_val, s_val = n["inputs"][branch], n["inputs"][1 - branch]
                conv = producer.get(b_val)
                short = producer.get(s_val)
                wide_short = short is not None and short["op"] not in ("quantize_input",) and \
                    self._zp_of(short) is None
                if conv is not None and conv["op"] == "conv2d" and readers[b_val] == 1 and factors[1 - branch] > 0 \
                        and self._out_zp(conv) is None and conv["attrs"]["lo"] < 0 and last[s_val] == i and wide_short:
                    found[conv["name"]] = (n, branch, factors[branch], factors[1 - branch])
                    break
        return found

    # ------------------------------------------------------------------------------------------ building
    def _build(self, node: dict[str, Any]):
        op, a, p = node["op"], node.get("attrs", {}), self.model.params[node["name"]]
        ins = [self._zp.get(i) for i in node["inputs"]]
        zp = ins[0] if op in ("relu", "maxpool2d", "flatten", "dequantize_output") else self._out_zp(node)
        self._zp[node["outputs"][0]] = zp
        if op == "quantize_input":
            return self._build_input(a, p, zp)
        if op in ("conv2d", "linear"):
            if node["name"] in self._fusable:
                step = self._build_fused(node, a, p, ins[0])
                if step is not None:
                    return step
            return self._build_layer(node, a, p, ins[0], zp)
        if op == "requantize":
            return _requantize_step(a, zp)
        if op == "add":
            if node["name"] in self._fused:
                return self._fused[node["name"]]
            ca, cb = (a[k] * 2.0 ** -a["shift"] for k in ("multiplier_a", "multiplier_b"))
            bias = a["bias"] * 2.0 ** -a["shift"]

            def add(xs):
                v = _float(xs[0]) * ca if ca != 1 else _float(xs[0]).clone()
                v.add_(_float(xs[1]), alpha=cb)
                return _narrow_or_wide(v.add_(bias) if bias else v, a, zp)

            return add
        if op == "relu":
            return lambda xs: _Val(xs[0].t.clamp_min(xs[0].zp or 0), xs[0].zp)
        if op == "maxpool2d":
            return lambda xs: _Val(F.max_pool2d(xs[0].t, a["kernel_size"], a["stride"], a["padding"],
                                                a["dilation"], a["ceil_mode"]), xs[0].zp)
        if op in ("avgpool2d", "adaptive_avgpool"):
            return self._build_pool(op, a, zp)
        if op == "flatten":
            return lambda xs: _Val(torch.flatten(xs[0].t.contiguous(), a["start_dim"]), xs[0].zp)
        if op == "dequantize_output":
            return lambda xs: xs[0]
        raise LowbitError(f"fast path: op {op!r} is not supported")

    def _zp_of(self, node: dict[str, Any]) -> int | None:
        """Zero point of a node's output as the fast path holds it (transparent ops keep their input's)."""
        producer = {n["outputs"][0]: n for n in self.model.nodes}
        while node["op"] in ("relu", "maxpool2d", "flatten"):
            node = producer[node["inputs"][0]]
        return self._out_zp(node) if "lo" in node.get("attrs", {}) else None

    @staticmethod
    def _out_zp(node: dict[str, Any]) -> int | None:
        """Zero point of a narrow output (``-lo`` for signed codes), None for wide outputs."""
        lo, hi = node["attrs"]["lo"], node["attrs"]["hi"]
        zp = max(0, -lo)
        return zp if hi + zp <= 255 else None

    def _build_fused(self, node, a, p, zp_in):
        """The conv of a fusable residual add: its step defers, the add's step runs conv + shortcut (+ ReLU)."""
        add, branch, f_branch, f_short = self._fusable[node["name"]]
        aa = add["attrs"]
        fused_attrs = {**a, "lo": aa["lo"], "hi": aa["hi"]}
        step, path = layer_step(node["op"], fused_attrs, p, self._ranges[node["inputs"][0]], zp_in, None, self.vnni,
                                node["name"], sum_factor=f_branch / f_short)
        if path != "int8":
            return None
        self.paths[node["name"]] = f"int8 (+ residual add {add['name']})"
        zp = self._out_zp(add)
        lo, hi = (aa["lo"] + zp, aa["hi"] + zp) if zp is not None else (0, 0)

        def fused(xs):
            v = step(xs[branch].t, xs[1 - branch].t)
            xs[1 - branch].t = None  # the kernel wrote its sum into the shortcut's storage
            if zp is None:
                return v if f_short == 1 else _Val(v.t.mul_(f_short), None)
            q = _quantize_u8(v.t, 1.0 / f_short, zp)
            return _Val(_cl(q.clamp_(lo, hi) if lo > 0 or hi < 255 else q), zp)

        self._fused[add["name"]] = fused
        return lambda xs: _Deferred(xs[0])

    def _build_input(self, a, p, zp):
        if zp is None:
            raise LowbitError("fast path: the input codes do not fit in uint8")
        if "lut" in p:
            lut = (p["lut"] + zp).to(torch.uint8)  # [C, 256]
            flat = lut.reshape(-1).to(torch.uint8)

            def quantize_lut(xs):
                x = xs[0].t
                if lut.shape[0] == 1:
                    y = flat[x.to(torch.int64)]
                else:
                    offs = torch.arange(lut.shape[0]).reshape(1, -1, 1, 1) * 256
                    y = flat[x.to(torch.int64) + offs]
                return _Val(_cl(y), zp)

            return quantize_lut
        scale = torch.tensor(a["scale"], dtype=torch.float32)
        return lambda xs: _Val(_cl(((xs[0].t.float() / scale).clamp(a["lo"], a["hi"]).round() + zp)
                                   .to(torch.uint8)), zp)

    def _build_layer(self, node, a, p, zp_in, zp_out):
        if zp_in is None:
            raise LowbitError(f"fast path: layer {node['name']!r} reads a value that is not uint8 codes")
        step, path = layer_step(node["op"], a, p, self._ranges[node["inputs"][0]], zp_in, zp_out, self.vnni,
                                node["name"])
        self.paths[node["name"]] = path
        return step

    def _build_pool(self, op, a, zp):
        factor = a["multiplier"] * 2.0 ** -a["shift"]
        bias = a["bias"] * 2.0 ** -a["shift"]

        def pool(xs):
            x = _float(xs[0])
            if op == "avgpool2d":
                s = F.avg_pool2d(x, a["kernel_size"], a["stride"], a["padding"], divisor_override=1)
            else:
                oh, ow = a["output_size"]
                s = F.adaptive_avg_pool2d(x, (oh, ow)) * ((x.shape[-2] // oh) * (x.shape[-1] // ow))
            return _narrow_or_wide(s * factor + bias, a, zp)

        return pool

    # ------------------------------------------------------------------------------------------ running
    def run(self, x: torch.Tensor, trace: bool = False) -> _Val | dict[str, _Val]:
        """The output value (integer logits units, float32 or exact), or every node's value with ``trace``."""
        self.model._check_input(x)
        env = {self.model.manifest["inputs"][0]: _Val(x, None)}
        with torch.inference_mode():
            for node, step in zip(self.model.nodes, self._steps):
                env[node["outputs"][0]] = step([env[i] for i in node["inputs"]])
        return env if trace else env["logits"]

    def run_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer logits, rounded (exact when the last layer takes the exact path)."""
        return self.run(x).codes()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        v = self.run(x)
        return (_float(v).to(torch.float64) * self.model.output_scale).to(torch.float32)


def layer_step(op: str, a: dict[str, Any], p: dict[str, torch.Tensor], x_range: tuple[int, int], zp_in: int,
               zp_out: int | None, vnni: bool, name: str = "layer", sum_factor: float | None = None):
    """One conv/linear of the fast path: ``(step, path)`` with ``step([value]) -> value`` and the path taken
    (``"int8"``, or ``"exact (why)"``). Used by :class:`FastModel` and by the per-layer latency table.

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
    saturates = not vnni and 2 * (hi_x + zp_in) * w_max > INT16_MAX
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
    if zp_out is not None:
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

class _Deferred:
    """The output of a conv whose residual add runs it (fused): holds the conv's input until then."""

    def __init__(self, x: _Val):
        self.t = x.t
        self.zp = None


def _requantize_step(a: dict[str, Any], zp: int | None):
    """Wide float32 -> codes. With no bias, one fused ``quantize_per_tensor`` (round half to even of
    ``v / (1/M)``, saturating to uint8), then a clamp when the code range is narrower than uint8."""
    factor, bias = a["multiplier"] * 2.0 ** -a["shift"], a["bias"] * 2.0 ** -a["shift"]
    if zp is None or bias or factor <= 0:
        return lambda xs: _narrow_or_wide(_float(xs[0]) * factor + bias, a, zp)
    lo, hi = a["lo"] + zp, a["hi"] + zp
    clamp = lo > 0 or hi < 255

    def requant(xs):
        q = _quantize_u8(_float(xs[0]), 1.0 / factor, zp)
        return _Val(_cl(q.clamp_(lo, hi) if clamp else q), zp)

    return requant


def _quantize_u8(v: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """``clamp(round_half_even(v / scale) + zp, 0, 255)`` as uint8 in one fused pass (quantize_per_tensor,
    whose quantized dtype PyTorch flags as deprecated; the int_repr is what we keep)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(v, scale, zp, torch.quint8).int_repr()


def _float(v: _Val) -> torch.Tensor:
    return v.t if v.zp is None else v.t.to(torch.float32) - v.zp


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _narrow_or_wide(v: torch.Tensor, a: dict[str, Any], zp: int | None) -> _Val:
    """Round to codes (narrow, uint8 + zp) or keep float32 units (wide, only a ReLU applied)."""
    if zp is None:
        return _Val(v.clamp_min(0) if a["lo"] >= 0 else v, None)
    return _Val(_cl((v.round().clamp(a["lo"], a["hi"]) + zp).to(torch.uint8)), zp)


def compare(fast: FastModel, ref: IntegerModel, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per node with an integer output: fraction of outputs that differ from the reference, max difference."""
    got = fast.run(x, trace=True)
    want = ref.run_trace(x)
    out = {}
    for node in ref.nodes:
        name = node["outputs"][0]
        if node["op"] in ("dequantize_output",) or name not in want or isinstance(got[name], _Deferred) \
                or got[name].t is None:  # a fused conv's deferred output, or a shortcut the kernel overwrote
            continue
        d = (got[name].codes().reshape(want[name].shape) - want[name].to(torch.int64)).abs()
        out[node["name"]] = {"frac_diff": float((d > 0).double().mean()), "max_diff": int(d.max()),
                             "narrow": node.get("attrs", {}).get("out_bits") is not None}
    return out
