"""Lowering: the captured float graph -> integer nodes with dyadic requantization constants.

Every integer value carries a *representation* (:class:`Rep`): real value = integer * ``scale``, clamped to
``[lo, hi]``. Two kinds exist:

* **narrow codes** (``bits`` set): exactly the codes a quantized layer's input quantizer (or a QuantAct's
  quantizer) produces (scale ``s_x``, range ``[-Q_N, Q_P]``, raised to 0 by a folded ReLU). A producer whose
  every reader is a quantized layer or QuantAct with the same quantizer requantizes its output straight into
  these codes, with one rounding, as the fake-quant model does.
* **wide values** (``bits`` None): int32 at a fine scale, used where a value has several readers (a residual
  stream feeding a conv, a shortcut and a downsample conv), feeds a residual add or a pool, or is the
  output. The scale is ``s_ref * 2^-16``, where ``s_ref`` is the input step of the first quantized layer
  that reads it (directly, or after the add/pool it feeds), so the requantization to that layer's codes is a
  pure rounding shift by 16 bits, and the residual stream keeps 16 fractional bits below the step of the
  codes made from it (the fake-quant model keeps shortcuts in float). A residual add whose shortcut is such a
  stream keeps the stream's scale, and so does the conv branch it adds: the add is an exact integer sum, and a
  stage of residual blocks carries one scale. Logits use ``bound / 2^30``, where ``bound`` is the largest
  |logit| the final layer can produce, so they never saturate.

Each producer is one requantization ``clamp(round_half_even((acc*m_c + b_c) * 2^-k_c), lo, hi)``:

* conv/linear (+ folded BN ``g_c*y + h_c``, + ReLU): ``M_c = g_c*s_x*s_w,c / s_out``,
  ``B_c = (g_c*bias_c + h_c) / s_out``; ``m_c, k_c`` from :func:`dyadic_affine`, ``b_c = round(B_c*2^k_c)``.
  The float model computes ``round(relu?(g_c*(s_x*s_w,c*acc + bias_c) + h_c) / s_out)``; the integer one
  differs only through the 31-bit multiplier (relative error <= 2^-31) and the 2^-k_c bias grid, i.e. only
  for values within ~2^-20 of a rounding tie. A negative ``gamma`` simply gives a negative ``m_c``. When the
  output is narrow codes, ``m_c`` is narrowed (:data:`EPILOGUE_MULTIPLIERS`) to the bits an int8 kernel's
  float32 epilogue computes exactly (~19 below the output step for 4-bit codes), where that moves no value by
  more than 2^-10 steps: the fast path then requantizes inside the kernel and writes uint8 codes.
* residual add: ``a*m_a + b*m_b`` on one common shift (``s_a/s_out``, ``s_b/s_out``), rounded once.
* average pool (``avg_pool2d``, adaptive, ``x.mean((2, 3))``): the exact integer window sum times
  ``s_in / (D * s_out)``, rounded once, where ``D`` is the divisor (the window size, or ``divisor_override``).
  Its input is a wide value (16 fractional bits below the step of its output codes), so the result is the
  fake-quant model's ``round(mean / s_out)`` except within ~2^-16 of a rounding tie. Padding counts as zeros.
* requantize (wide -> a layer's codes): ``s_in / s_x``.

A :class:`~lowbit.quant.QuantAct` (``QuantConfig.residual_bits`` puts one after each residual join's ReLU) is a
producer whose output is always its quantizer's codes, whoever reads them, and a sink that demands them like a
quantized layer: the add it alone reads requantizes straight into them, its ReLU folded, rounding once (the
QuantAct then emits no node; ``"activations"`` in the manifest names the value), so the residual stream is 8-bit
codes instead of a wide value. Readers that share the QuantAct's quantizer (``QuantConfig.share_residual_steps``:
a layer at the stream's bits) read the codes as they are; readers with a quantizer of their own (the next block's
4-bit conv1 after an 8-bit stream) get a codes->codes requantize ``s_q / s_x``: the fake-quant model rounds twice
there too (``q4(q8(x))``), and computes ``round(float32(float32(s_q*c) / s_x))``, which differs from the exact
``round(c*s_q/s_x)`` only where that is within ~2^-22 of a tie (of 256 codes, rarely one). Codes made for another
layer's quantizer are never requantized (the model never rounds them twice). The add's exact sum of a wide conv
branch and the codes ``c*s_q`` is the fake-quant model's float32 sum but for float32's ~2^-24 relative rounding;
the model's float32 rounds differ from the exact ones within ~2^-20 of a tie.

Ops that move values keep their input's representation: max pool, flatten (any view/reshape of trailing
dims), nearest upsampling by integer factors (each value repeated), ReLU and clamps. A clamp to real bounds
``[a, b]`` (ReLU6, hardtanh, ``clamp``) is a clamp of the integers to ``[round(a/s), round(b/s)]``, exact
because rounding is monotone: ``round(clamp(y, a, b) / s) = clamp(round(y / s), round(a / s), round(b / s))``
(narrow bounds rounded as the quantizer rounds a value, in float32). Folded into a producer it narrows the
producer's ``[lo, hi]``, so it costs nothing. ``torch.cat`` along channels joins values of one
representation: each input's producer requantizes to the codes (or wide scale) the concatenation's readers
need, or, where an input is read elsewhere too, one requantize node converts it first.

Batch norm is folded into the requantization, not into the weights: our models are fine-tuned with BN after
the quantized conv (the weight quantizer sees the unfolded weights), so the trained integer weight codes are
those of the unfolded conv, and BN becomes part of the per-channel affine map the requantization computes
anyway. Folding it into the weights before quantization would change the codes the model was trained with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.export.capture import JOINS, PRODUCERS, TRANSPARENT, FNode, users
from lowbit.ir.dyadic import (
    EPILOGUE_MAX_ERROR,
    INT32_MAX,
    INT32_MIN,
    MAX_SHIFT,
    acc_bounds,
    float32_epilogue_dyadic,
    float32_sum_epilogue_dyadic,
    to_dyadic,
    to_dyadic_common,
    to_fixed,
)
from lowbit.ir.format import pack_tensor
from lowbit.ir.graph import Node
from lowbit.ir.ops import op_spec
from lowbit.quant.modules import QuantConv2d

WIDE_FRAC_BITS = 16  # fractional bits of a wide value below the step of the codes made from it
LOGIT_BITS = 30  # logits use |value| <= 2^30 for the largest logit the last layer can produce
# A conv/linear that writes narrow codes gets multipliers an int8 kernel's float32 epilogue computes exactly
# (:func:`lowbit.ir.dyadic.float32_epilogue_dyadic`) wherever that moves no value by more than 2^-10 steps.
EPILOGUE_MULTIPLIERS = True
# A residual add into codes whose branch is a conv read by nothing else becomes one conv2d_add node (one rounding).
FUSE_RESIDUAL_ADDS = True


@dataclass(frozen=True)
class Rep:
    """How an integer value encodes a real one: ``real = int * scale``, ``lo <= int <= hi``."""

    scale: float
    lo: int
    hi: int
    bits: int | None = None  # narrow: the codes of a ``bits``-wide quantizer; None: a wide int32 value

    @property
    def wide(self) -> bool:
        return self.bits is None

    def with_relu(self) -> Rep:
        return Rep(self.scale, max(self.lo, 0), self.hi, self.bits)

    def clamped(self, lo: float | None, hi: float | None) -> Rep:
        """The representation of ``clamp(x, lo, hi)`` (real bounds, None: unbounded): the integer range
        narrowed to the codes of the bounds, rounded half to even as the quantizer rounds (float32 division for
        narrow codes), so a clamped value gets exactly the code the fake-quant model gives it."""

        def code(v: float) -> int:
            if self.wide:
                q = v / self.scale
            else:
                q = float(torch.tensor(v, dtype=torch.float32) / torch.tensor(self.scale, dtype=torch.float32))
            return min(max(round(q), self.lo), self.hi)  # round(): half to even

        return Rep(self.scale, self.lo if lo is None else code(lo), self.hi if hi is None else code(hi), self.bits)

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "lo": self.lo, "hi": self.hi, "bits": self.bits}


@dataclass
class Requant:
    """One requantization ``clamp(round_half_even((x*m + b) * 2^-k), lo, hi)`` (m, k, b per channel or not)."""

    m: torch.Tensor | int
    k: torch.Tensor | int
    b: torch.Tensor | int
    lo: int
    hi: int


@dataclass
class Program:
    """The lowered model: IR nodes + tensors, and what the simulation needs to replay it.

    ``value_of`` maps each FNode to the integer value holding its output; ``reps`` gives every integer
    value's representation; ``consts`` holds each producer's requantization (adds: ``(m_a, m_b, k)``
    attributes in ``attrs``) and ``edges[(source, reader)]`` the requantization inserted between them;
    ``converted`` the value already made from a value for a representation (readers with one quantizer share it);
    ``activations`` where each QuantAct's codes are (the manifest's ``"activations"``).
    """

    graph: list[Node] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    reps: dict[str, Rep] = field(default_factory=dict)
    value_of: dict[str, str] = field(default_factory=dict)
    consts: dict[str, Requant] = field(default_factory=dict)
    edges: dict[tuple[str, str], Requant] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    converted: dict[tuple[str, Rep], str] = field(default_factory=dict)
    activations: list[dict[str, Any]] = field(default_factory=list)
    fused: dict[str, tuple[str, str, torch.Tensor]] = field(default_factory=dict)  # add -> (conv, shortcut, m_r)
    epilogue_error: float = EPILOGUE_MAX_ERROR  # output steps a narrowed in-kernel multiplier may move a value
    pending: dict[str, str] = field(default_factory=dict)  # fused conv -> its input value, until its add


def quantizer_rep(module: torch.nn.Module) -> Rep:
    """The codes a quantized layer's input quantizer produces."""
    q = module.input_quantizer
    return Rep(float(q.scale), -q.q_n, q.q_p, q.bits)


def dyadic_affine(gain: np.ndarray | torch.Tensor, offset: np.ndarray | torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel ``(m, k, b)`` with ``m * 2^-k ~= gain`` and ``b = round(offset * 2^k)``, ``|b| <= 2^61``.

    Normally ``m`` is the 31-bit :func:`to_dyadic` multiplier. Two cases take a smaller shift (a less
    precise, denormal multiplier): gains below ``2^-31`` (a BN whose gamma is ~0), whose shift would exceed
    62, and large offsets whose ``offset * 2^k`` would pass ``2^61``. Either way the absolute error of
    ``m * acc * 2^-k`` stays below ``|acc| * 2^-(k+1)``.
    """
    g = torch.as_tensor(gain, dtype=torch.float64).reshape(-1)
    off = torch.as_tensor(offset, dtype=torch.float64).reshape(-1)
    tiny = g.abs() < 2.0**-31
    m, k = to_dyadic(torch.where(tiny, torch.zeros_like(g), g))
    k = torch.where(tiny, torch.full_like(k, MAX_SHIFT), k)
    log_b = torch.where(off != 0, torch.log2(off.abs()).ceil(), torch.full_like(off, -1000)).to(torch.int64)
    k_max = (60 - log_b).clamp(max=MAX_SHIFT)
    if int(k_max.min()) < 0:
        raise LowbitError(f"a requantization offset of {float(off.abs().max()):.3g} output steps cannot be "
                          f"represented in fixed point")
    reduce = tiny | (k > k_max)
    k = torch.minimum(k, k_max)
    m = torch.where(reduce, torch.from_numpy(np.rint(np.ldexp(g.numpy(), k.numpy()))).to(torch.int64), m)
    return m, k, torch.as_tensor(to_fixed(off, k), dtype=torch.int64).reshape(-1)


def lower(fnodes: list[FNode], pixel_input: dict[str, Any] | None, epilogue_error: float = EPILOGUE_MAX_ERROR
          ) -> Program:
    """Decide every value's representation, compute the dyadic constants and build the manifest graph.

    ``pixel_input``: ``{"mean": [...], "std": [...]}`` when the model reads uint8 pixels normalised as
    ``(p / 255 - mean) / std`` (the input quantization becomes a lookup table), None for float input.
    """
    byname = {n.name: n for n in fnodes}
    readers = users(fnodes)
    reps = _choose_reps(fnodes, byname, readers)
    _share_shortcut_scales(fnodes, byname, readers, reps)
    fused = _fused_adds(fnodes, byname, readers, reps) if FUSE_RESIDUAL_ADDS else {}
    branches = {branch for branch, _ in fused.values()}
    p = Program(epilogue_error=epilogue_error)
    for n in fnodes:
        if n.kind == "input":
            _emit_input(p, n, reps[n.name], _sinks(n.name, byname, readers)[0], pixel_input)
        elif n.kind == "qlayer" and n.name in branches:  # emitted with its residual add
            p.pending[n.name] = _needed(p, n.inputs[0], quantizer_rep(n.module), n.name, byname=byname)
        elif n.kind == "qlayer":
            _emit_qlayer(p, n, reps[n.name], byname)
        elif n.kind == "qact":
            _emit_qact(p, n, reps[n.name], byname)
        elif n.kind == "add" and n.name in fused:
            branch, shortcut = fused[n.name]
            _emit_qlayer(p, byname[branch], reps[n.name], byname, residual=(n, shortcut))
        elif n.kind == "add":
            _emit_add(p, n, reps[n.name])
        elif n.kind == "avgpool":
            _emit_avgpool(p, n, reps[n.name], byname)
        elif n.kind == "concat":
            _emit_concat(p, n, _concat_target(n, byname, readers, reps))
        elif n.kind in TRANSPARENT:
            _emit_transparent(p, n)
        elif n.kind == "output":
            _emit_output(p, n)
        else:  # pragma: no cover - capture() only makes the kinds above
            raise LowbitError(f"internal: unknown node kind {n.kind!r}")
    return p


# ------------------------------------------------------------------------------------- representations
CODE_SINKS = ("qlayer", "qact")  # readers that quantize what they read with a quantizer of their own


def _sinks(name: str, byname: dict[str, FNode], readers: dict[str, list[str]]) -> list[FNode]:
    """The non-transparent readers of ``name``'s value, looking through pools, flattens, clamps, upsampling and
    concatenations."""
    out = []
    for r in readers[name]:
        node = byname[r]
        out.extend(_sinks(r, byname, readers) if node.kind in TRANSPARENT or node.kind in JOINS else [node])
    return out


def _choose_reps(fnodes: list[FNode], byname: dict[str, FNode], readers: dict[str, list[str]]) -> dict[str, Rep]:
    """Representation of every producer's output, deciding readers first (reverse execution order)."""
    reps: dict[str, Rep] = {}
    for n in reversed(fnodes):
        if n.kind not in PRODUCERS:
            continue
        sinks = _sinks(n.name, byname, readers)
        codes = {quantizer_rep(s.module) for s in sinks if s.kind in CODE_SINKS}
        if not sinks:
            raise LowbitError(f"the output of {n.name!r} is never used{n.where}")
        if n.kind == "qact":
            rep = quantizer_rep(n.module)  # its own codes, whoever reads them (readers requantize them)
        elif all(s.kind in CODE_SINKS for s in sinks) and len(codes) == 1:
            rep = next(iter(codes))
        elif n.kind == "input":
            raise LowbitError("the model input must feed quantized layers (or QuantActs) that share one input "
                              f"quantizer (found readers {', '.join(s.name for s in sinks)})")
        elif sinks[0].kind == "output":
            if n.kind != "qlayer" or len(sinks) > 1:
                raise LowbitError(f"the model output must come straight from a quantized conv/linear layer, "
                                  f"found {n.kind} {n.name!r}{n.where}")
            rep = Rep(_logit_scale(n), INT32_MIN, INT32_MAX)
        else:
            rep = Rep(_wide_scale(sinks[0], reps), INT32_MIN, INT32_MAX)
        reps[n.name] = rep.clamped(*n.bounds) if n.bounds is not None else rep
    return reps


def _share_shortcut_scales(fnodes: list[FNode], byname: dict[str, FNode], readers: dict[str, list[str]],
                           reps: dict[str, Rep]) -> None:
    """A residual add whose shortcut is a wide value read elsewhere too keeps the shortcut's scale, and so does
    the conv branch it adds (read by nothing else): the add is then an exact integer sum, and a residual stage
    carries one scale from block to block (in execution order, so chains of blocks follow)."""
    for n in fnodes:
        if n.kind != "add" or not reps[n.name].wide:
            continue
        sources = [_source(i, byname) for i in n.inputs]
        for shortcut, branch in (sources, sources[::-1]):
            if reps[shortcut.name].wide and len(_sinks(shortcut.name, byname, readers)) > 1 \
                    and branch.kind == "qlayer" and readers[branch.name] == [n.name]:
                scale = reps[shortcut.name].scale
                for node in (n, branch):  # folded clamps in units of the new scale
                    wide = Rep(scale, INT32_MIN, INT32_MAX)
                    reps[node.name] = wide.clamped(*node.bounds) if node.bounds is not None else wide
                break


def _fused_adds(fnodes: list[FNode], byname: dict[str, FNode], readers: dict[str, list[str]], reps: dict[str, Rep]
                ) -> dict[str, tuple[str, str]]:
    """Residual adds into codes (``add -> (conv branch, shortcut input)``) whose branch is a quantized conv that
    nothing else reads and that clamps nothing before the add (its first such input): lowered as one conv2d_add."""
    out = {}
    for n in fnodes:
        if n.kind != "add" or reps[n.name].wide:
            continue
        for branch, shortcut in (n.inputs, n.inputs[::-1]):
            b = byname[branch]
            if b.kind == "qlayer" and isinstance(b.module, QuantConv2d) and readers[branch] == [n.name] \
                    and b.bounds is None and branch != shortcut:
                out[n.name] = (branch, shortcut)
                break
    return out


def _source(name: str, byname: dict[str, FNode]) -> FNode:
    """The producer behind ``name``, looking back through transparent nodes."""
    node = byname[name]
    while node.kind in TRANSPARENT:
        node = byname[node.inputs[0]]
    return node


def _wide_scale(sink: FNode, reps: dict[str, Rep]) -> float:
    """Fine scale for a value read by ``sink``: 2^-16 of the step of the codes the stream ends in."""
    if sink.kind in CODE_SINKS:
        return quantizer_rep(sink.module).scale * 2.0**-WIDE_FRAC_BITS
    r = reps[sink.name]  # an add or a pool, decided already
    return r.scale if r.wide else r.scale * 2.0**-WIDE_FRAC_BITS


def _layer_terms(n: FNode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight codes, per-channel real gain per accumulator unit, per-channel real offset, s_w) in float64."""
    m = n.module
    w_codes = m.weight_quantizer.codes(m.weight.detach()).to(torch.int32)
    c = w_codes.shape[0]
    s_x = float(m.input_quantizer.scale)
    s_w = m.weight_quantizer.scale.double().expand(c) if m.weight_quantizer.scale.dim() == 0 else \
        m.weight_quantizer.scale.double().reshape(c)
    g = n.gain if n.gain is not None else torch.ones(c, dtype=torch.float64)
    h = n.offset if n.offset is not None else torch.zeros(c, dtype=torch.float64)
    bias = m.bias.detach().double() if m.bias is not None else torch.zeros(c, dtype=torch.float64)
    return w_codes, g * s_x * s_w, g * bias + h, s_w


def _logit_scale(n: FNode) -> float:
    """``bound / 2^30`` where ``bound`` is the largest |output| the layer can produce from its code ranges."""
    w, gain, offset, _ = _layer_terms(n)
    x = quantizer_rep(n.module)
    k = w[0].numel()
    w_max = w.reshape(w.shape[0], -1).abs().amax(1).double()
    bound = float((gain.abs() * k * max(abs(x.lo), abs(x.hi)) * w_max + offset.abs()).max())
    return bound * 2.0**-LOGIT_BITS if bound > 0 else 1.0


# ------------------------------------------------------------------------------------------- emission
def _add_node(p: Program, op: str, name: str, inputs: list[str], rep: Rep | None, attrs: dict[str, Any],
              params: dict[str, tuple[torch.Tensor, dict[str, Any]]] | None = None, output: str | None = None
              ) -> str:
    """Append an IR node of a registered op (its tensors stored as ``name.role``); returns its output value."""
    op_spec(op)
    out = output or name
    node = Node(op, name, inputs, [out], attrs)
    for role, (tensor, entry) in (params or {}).items():
        key = f"{name}.{role}"
        p.tensors[key], p.entries[key] = tensor, entry
        node.params[role] = key
    p.graph.append(node)
    if rep is not None:
        p.reps[out] = rep
    return out


def _int_entry(t: torch.Tensor, dtype: str) -> tuple[torch.Tensor, dict[str, Any]]:
    t = t.to(getattr(torch, dtype)).contiguous()
    return t, {"dtype": dtype, "shape": list(t.shape)}


def _range_attrs(rep: Rep) -> dict[str, Any]:
    return {"lo": rep.lo, "hi": rep.hi, "out_scale": rep.scale, "out_bits": rep.bits}


def _emit_input(p: Program, n: FNode, rep: Rep, reader: FNode, pixel_input: dict[str, Any] | None) -> None:
    q = reader.module.input_quantizer
    attrs = {"bits": rep.bits, "signed": bool(q.signed), "scale": rep.scale, **_range_attrs(rep)}
    params = None
    if pixel_input is not None:
        params = {"lut": _int_entry(pixel_lut(q, n.shape[1], pixel_input["mean"], pixel_input["std"]), "int16")}
    value = _add_node(p, "quantize_input", "quantize_input", ["input"], rep, attrs, params, output=n.name)
    p.value_of[n.name] = value


def pixel_lut(quantizer: torch.nn.Module, channels: int, mean, std) -> torch.Tensor:
    """Codes of every uint8 pixel value per channel: ``quantizer.codes((p / 255 - mean_c) / std_c)``.

    Computed with the same float32 operations as :func:`lowbit.data.iterate` and the quantizer's own
    ``codes``, so the table is bit-identical to normalising and quantizing each image.
    """
    mean, std = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    p = torch.arange(256, dtype=torch.float32) / 255.0
    return torch.stack([quantizer.codes((p - mean[c]) / std[c]) for c in range(channels)]).to(torch.int32)


def _per_channel(v, channels: int, what: str) -> list[float]:
    v = [float(v)] * channels if isinstance(v, (int, float)) else [float(x) for x in v]
    if len(v) == 1:
        v = v * channels
    if len(v) != channels:
        raise LowbitError(f"input normalisation {what} has {len(v)} values for {channels} channels")
    return v


def _needed(p: Program, source: str, target: Rep, reader: str, name: str | None = None, *,
            byname: dict[str, FNode] | None = None, node_name: str | None = None) -> str:
    """The integer value of FNode ``source`` in representation ``target``, requantizing if needed.

    Wide values are requantized for a layer; codes only where they are a QuantAct's (``byname`` given to look
    back through transparent nodes): the fake-quant model rounds them again in the reader's quantizer too. Codes
    made for another quantizer are refused (that would be a second rounding the model does not make). A
    concatenation (``name`` given) may also convert codes into a wide value. ``node_name`` names the requantize
    node (default ``{reader}.requantize``); readers that need the same conversion share one node."""
    value = p.value_of[source]
    rep = p.reps[value]
    if (rep.bits, rep.scale) == (target.bits, target.scale) and target.lo <= rep.lo <= rep.hi <= target.hi:
        return value  # already these codes (a folded ReLU may have narrowed the range)
    from_qact = byname is not None and _source(source, byname).kind == "qact"
    if not rep.wide and name is None and not from_qact:
        raise LowbitError(f"internal: {reader!r} reads codes of {source!r} made for another quantizer")
    m, k = to_dyadic(rep.scale / target.scale)
    rq = Requant(m, k, 0, target.lo, target.hi)
    p.edges[(source, reader)] = rq
    if (value, target) in p.converted:
        return p.converted[(value, target)]
    out = _add_node(p, "requantize", name or node_name or f"{reader}.requantize", [value], target,
                    {"multiplier": m, "shift": k, "bias": 0, **_range_attrs(target)})
    p.converted[(value, target)] = out
    return out


def _emit_qlayer(p: Program, n: FNode, rep: Rep, byname: dict[str, FNode],
                 residual: tuple[FNode, str] | None = None) -> None:
    """A conv/linear node; with ``residual = (add, shortcut)`` the conv2d_add node of a fused residual add, named
    after the conv, whose output is the add's value in the add's representation ``rep``."""
    m = n.module
    x_rep = quantizer_rep(m)
    x = p.pending.pop(n.name) if residual else _needed(p, n.inputs[0], x_rep, n.name, byname=byname)
    w_codes, gain, offset, s_w = _layer_terms(n)
    g, off = gain / rep.scale, offset / rep.scale
    mult, shift, bias = dyadic_affine(g, off)
    reach = acc_bounds(w_codes, (p.reps[x].lo, p.reps[x].hi))  # bounds the epilogue windows below
    inputs, op, out, extra = [x], "conv2d" if isinstance(m, QuantConv2d) else "linear", None, {}
    if residual:
        add, shortcut = residual
        r = p.value_of[shortcut]
        r_rep = p.reps[r]
        mult, shift, bias, m_r = _common_shift(g, off, r_rep.scale / rep.scale, mult, shift, bias)
        if EPILOGUE_MULTIPLIERS and not r_rep.wide:
            mult, shift, bias, m_r = float32_sum_epilogue_dyadic(g, off, r_rep.scale / rep.scale, rep.lo, rep.hi,
                                                                 max(0, -rep.lo), max(abs(r_rep.lo), abs(r_rep.hi)),
                                                                 mult, shift, bias, m_r, p.epilogue_error, reach)
        inputs, op, out = [x, r], "conv2d_add", add.name
        extra = {"residual_multiplier": _int_entry(m_r, "int32")}
        p.fused[add.name] = (n.name, shortcut, m_r)
    elif EPILOGUE_MULTIPLIERS and not rep.wide:
        mult, shift, bias = float32_epilogue_dyadic(g, off, rep.lo, rep.hi, max(0, -rep.lo), mult, shift, bias,
                                                    p.epilogue_error, reach)
    p.consts[n.name] = Requant(mult, shift, bias, rep.lo, rep.hi)
    w_bits = m.weight_quantizer.bits
    params = {"weight": pack_tensor(w_codes, w_bits, signed=True), "multiplier": _int_entry(mult, "int32"),
              "shift": _int_entry(shift, "int8"), "bias": _int_entry(bias, "int64"), **extra}
    attrs: dict[str, Any] = {"w_bits": w_bits, "a_bits": x_rep.bits, **_range_attrs(rep)}
    if op != "linear":
        attrs.update(stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation), groups=m.groups)
    if residual:
        attrs["residual_scale"] = r_rep.scale
    attrs["in_shape"], attrs["out_shape"] = list(byname[n.inputs[0]].shape), list(n.shape)
    p.value_of[out or n.name] = _add_node(p, op, n.name, inputs, rep, attrs, params, output=out)
    in_shape = byname[n.inputs[0]].shape
    p.layers.append({"name": n.name, "op": op, "w_bits": w_bits, "a_bits": x_rep.bits,
                     "params": w_codes.numel(), "macs": int(w_codes[0].numel() * math.prod(n.shape[1:])),
                     "in_shape": list(in_shape), "out_shape": list(n.shape), "folded": list(n.folded),
                     "x_scale": x_rep.scale, "w_scale": float(s_w.max()), "per_channel": bool(s_w.numel() > 1
                                                                                       and (s_w != s_w[0]).any())})


def _common_shift(gain: torch.Tensor, offset: torch.Tensor, residual: float, m: torch.Tensor, k: torch.Tensor,
                  b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, k, b)`` of a conv and ``m_r ~= residual * 2^k`` on each channel's one shift: ``k`` lowered where the
    residual's normalised 31-bit multiplier needs a smaller shift, so that ``|m|, |m_r| < 2^31``."""
    _, k_r = to_dyadic(residual)
    k = torch.minimum(k, torch.full_like(k, k_r))
    m = torch.from_numpy(np.rint(np.ldexp(gain.double().numpy(), k.numpy()))).to(torch.int64)
    b = torch.as_tensor(to_fixed(offset.double(), k), dtype=torch.int64).reshape(-1)
    m_r = torch.from_numpy(np.rint(np.ldexp(np.full(k.shape, residual), k.numpy()))).to(torch.int64)
    return m, k, b, m_r


def _emit_qact(p: Program, n: FNode, rep: Rep, byname: dict[str, FNode]) -> None:
    """A QuantAct's codes: its input's producer made them already where the QuantAct is its only reader (no node),
    else one requantize node named after it (from a wide value, or from another QuantAct's codes)."""
    value = _needed(p, n.inputs[0], rep, n.name, byname=byname, node_name=n.name)
    p.value_of[n.name] = value
    p.activations.append({"name": n.name, "value": value, "bits": rep.bits, "scale": rep.scale, "lo": rep.lo,
                          "hi": rep.hi})


def _emit_add(p: Program, n: FNode, rep: Rep) -> None:
    a, b = (p.value_of[i] for i in n.inputs)
    ra, rb = p.reps[a], p.reps[b]
    (m_a, m_b), k = to_dyadic_common([ra.scale / rep.scale, rb.scale / rep.scale], bits=30)
    attrs = {"multiplier_a": int(m_a), "multiplier_b": int(m_b), "shift": int(k), "bias": 0, **_range_attrs(rep)}
    p.attrs[n.name] = attrs
    p.value_of[n.name] = _add_node(p, "add", n.name, [a, b], rep, attrs)


def _emit_avgpool(p: Program, n: FNode, rep: Rep, byname: dict[str, FNode]) -> None:
    x = p.value_of[n.inputs[0]]
    r_in = p.reps[x]
    h, w = byname[n.inputs[0]].shape[-2:]
    if "output_size" in n.attrs:
        oh, ow = (d if d is not None else s for d, s in zip(n.attrs["output_size"], (h, w)))
        if h % oh or w % ow:
            raise LowbitError(f"adaptive pool {n.name!r}: output {oh}x{ow} does not divide the input {h}x{w} "
                              f"(uneven windows have several divisors; one requantization cannot express them)"
                              f"{n.where}")
        op, geometry, window = "adaptive_avgpool", {"output_size": [oh, ow]}, (h // oh) * (w // ow)
    else:
        op = "avgpool2d"
        geometry = {key: n.attrs[key] for key in ("kernel_size", "stride", "padding")}
        window = geometry["kernel_size"][0] * geometry["kernel_size"][1]
    divisor = n.attrs.get("divisor", window)
    bits = 31 - max(0, math.ceil(math.log2(window)))  # |sum| <= window * 2^31, so |sum * m| < 2^62
    m, k = to_dyadic(r_in.scale / (divisor * rep.scale), bits=bits)
    p.consts[n.name] = Requant(m, k, 0, rep.lo, rep.hi)
    attrs = {**geometry, "multiplier": m, "shift": k, "bias": 0, **_range_attrs(rep)}
    p.value_of[n.name] = _add_node(p, op, n.name, [x], rep, attrs)


def _emit_transparent(p: Program, n: FNode) -> None:
    x = p.value_of[n.inputs[0]]
    rep = p.reps[x]
    if n.kind == "maxpool":
        p.value_of[n.name] = _add_node(p, "maxpool2d", n.name, [x], rep, dict(n.attrs))
    elif n.kind == "flatten":
        p.value_of[n.name] = _add_node(p, "flatten", n.name, [x], rep, dict(n.attrs))
    elif n.kind == "relu":
        p.value_of[n.name] = _add_node(p, "relu", n.name, [x], rep.with_relu(), {})
    elif n.kind == "clamp":
        out = rep.clamped(n.attrs["min"], n.attrs["max"])
        p.attrs[n.name] = {"lo": out.lo, "hi": out.hi}
        p.value_of[n.name] = _add_node(p, "clamp", n.name, [x], out, {"lo": out.lo, "hi": out.hi})
    elif n.kind == "upsample":
        p.value_of[n.name] = _add_node(p, "upsample_nearest", n.name, [x], rep, {"scale": list(n.attrs["scale"])})
    else:
        p.value_of[n.name] = x


def _concat_target(n: FNode, byname: dict[str, FNode], readers: dict[str, list[str]], reps: dict[str, Rep]
                   ) -> Rep:
    """The representation a concatenation's readers need: their codes, or a wide value at their fine scale."""
    sinks = _sinks(n.name, byname, readers)
    if not sinks:
        raise LowbitError(f"the output of {n.name!r} is never used{n.where}")
    codes = {quantizer_rep(s.module) for s in sinks if s.kind in CODE_SINKS}
    if all(s.kind in CODE_SINKS for s in sinks) and len(codes) == 1:
        return next(iter(codes))
    if sinks[0].kind == "output":
        raise LowbitError(f"the model output must come straight from a quantized conv/linear layer, found "
                          f"concat {n.name!r}{n.where}")
    return Rep(_wide_scale(sinks[0], reps), INT32_MIN, INT32_MAX)


def _emit_concat(p: Program, n: FNode, target: Rep) -> None:
    """Join the inputs along channels; an input in another representation is requantized to ``target`` first
    (normally every input's producer already made ``target``, having looked through the concatenation)."""
    values = [p.value_of[i] for i in n.inputs]
    if len({(p.reps[v].scale, p.reps[v].bits) for v in values}) > 1:
        values = [_needed(p, src, target, n.name, name=f"{n.name}.requantize{j}") for j, src in enumerate(n.inputs)]
    reps = [p.reps[v] for v in values]
    rep = Rep(reps[0].scale, min(r.lo for r in reps), max(r.hi for r in reps), reps[0].bits)
    p.value_of[n.name] = _add_node(p, "concat", n.name, values, rep, {"axis": 1, **_range_attrs(rep)})


def _emit_output(p: Program, n: FNode) -> None:
    x = p.value_of[n.inputs[0]]
    _add_node(p, "dequantize_output", "dequantize_output", [x], None, {"scale": p.reps[x].scale},
              output="logits")
