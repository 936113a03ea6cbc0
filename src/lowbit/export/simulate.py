"""The integer-consistent simulation: the fine-tuned PyTorch model evaluated with the export's arithmetic.

It is a second, independent implementation of what an exported model computes, used to check the runtime
bit for bit. It shares only the lowering's decisions (each value's scale and the dyadic constants); it
walks the captured graph of the PyTorch model rather than the file's graph, takes weight codes from the
model's own weight quantizers rather than the packed file, quantizes the input with the model's own input
quantizer after the data pipeline's normalisation rather than a lookup table, and rounds with a
floor-division/remainder formula rather than the runtime's shifts. Products are exact integer sums computed
in float64 (exact below 2^53, which the runtime checks on every call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.export.capture import JOINS, TRANSPARENT, FNode
from lowbit.export.exporter import Lowered
from lowbit.export.lower import Requant
from lowbit.quant.modules import QuantConv2d


def round_half_even_div(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``v / 2^k`` rounded to nearest, ties to even, for int64 ``v`` and ``0 <= k <= 62`` (broadcast)."""
    d = torch.ones_like(k) << k
    q = torch.div(v, d, rounding_mode="floor")
    twice_r = 2 * (v - q * d)  # 2r < 2^63 since r < 2^62
    return q + ((twice_r > d) | ((twice_r == d) & (q % 2 == 1))).to(torch.int64)


def apply(v: torch.Tensor, rq: Requant, axis: int | None = None) -> torch.Tensor:
    """``clamp(round_half_even((v*m + b) / 2^k), lo, hi)`` with per-channel constants along ``axis``."""
    m, k, b = (torch.as_tensor(t, dtype=torch.int64) for t in (rq.m, rq.k, rq.b))
    if axis is not None and m.dim() == 1:
        shape = [1] * v.dim()
        shape[axis] = -1
        m, k, b = (t.reshape(shape) for t in (m, k, b))
    return round_half_even_div(v.to(torch.int64) * m + b, k).clamp(rq.lo, rq.hi)


class Simulation:
    """``Simulation(lowered).run_int(x)``: integer logits (int64) of the model under the export's arithmetic.

    ``x`` is what the exported model takes: uint8 pixels (normalised here as the data pipeline does) or
    float input.
    """

    def __init__(self, lowered: Lowered):
        self.lowered = lowered
        self.program = lowered.program
        self.fnodes = lowered.fnodes
        self._branches = {branch for branch, _, _ in self.program.fused.values()}

    def run_int(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for n in self.fnodes:
                if n.kind == "output":
                    return env[n.inputs[0]]
                env[n.name] = self._node(n, env, x)
        raise LowbitError("internal: the captured graph has no output")  # pragma: no cover

    def _node(self, n: FNode, env: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        p = self.program
        if n.kind == "input":
            return self._quantize_input(n, x)
        if n.kind == "qlayer":
            src = n.inputs[0]
            codes = env[src]
            if (src, n.name) in p.edges:
                codes = apply(codes, p.edges[(src, n.name)])
            w = n.module.weight_quantizer.codes(n.module.weight.detach()).to(torch.float64)
            if isinstance(n.module, QuantConv2d):
                m = n.module
                acc = F.conv2d(codes.to(torch.float64), w, None, m.stride, m.padding, m.dilation, m.groups)
                if n.name in self._branches:  # a fused residual add rounds it with the shortcut: accumulators
                    return acc.to(torch.int64)
                return apply(acc.to(torch.int64), p.consts[n.name], axis=1)
            acc = codes.to(torch.float64) @ w.T
            return apply(acc.to(torch.int64), p.consts[n.name], axis=-1)
        if n.kind == "qact":  # its input's codes already, or one requantization of them
            src = n.inputs[0]
            return apply(env[src], p.edges[(src, n.name)]) if (src, n.name) in p.edges else env[src]
        if n.kind == "add" and n.name in p.fused:  # (acc*m + b + r*m_r) / 2^k, rounded once
            branch, shortcut, m_r = p.fused[n.name]
            rq = p.consts[branch]
            m, k, b = (torch.as_tensor(t, dtype=torch.int64).reshape(1, -1, 1, 1) for t in (rq.m, rq.k, rq.b))
            total = env[branch] * m + b + env[shortcut].to(torch.int64) * m_r.reshape(1, -1, 1, 1)
            return round_half_even_div(total, k).clamp(rq.lo, rq.hi)
        if n.kind == "add":
            at = p.attrs[n.name]
            a, b = (env[i].to(torch.int64) for i in n.inputs)
            total = a * at["multiplier_a"] + b * at["multiplier_b"] + at["bias"]
            return round_half_even_div(total, torch.tensor(at["shift"])).clamp(at["lo"], at["hi"])
        if n.kind == "avgpool":
            v = env[n.inputs[0]].to(torch.float64)
            if "output_size" in n.attrs:
                oh, ow = (d if d is not None else s for d, s in zip(n.attrs["output_size"], v.shape[-2:]))
                kh, kw = v.shape[-2] // oh, v.shape[-1] // ow
                sums = v.reshape(*v.shape[:-2], oh, kh, ow, kw).sum(dim=(-3, -1))
            else:
                sums = F.avg_pool2d(v, n.attrs["kernel_size"], n.attrs["stride"], n.attrs["padding"],
                                    divisor_override=1)
            return apply(sums.to(torch.int64), p.consts[n.name])
        if n.kind == "concat":
            parts = [apply(env[i], p.edges[(i, n.name)]) if (i, n.name) in p.edges else env[i] for i in n.inputs]
            return torch.cat([v.to(torch.int64) for v in parts], dim=1)
        v = env[n.inputs[0]]
        if n.kind == "maxpool":
            a = n.attrs
            return F.max_pool2d(v.to(torch.float64), a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                a["ceil_mode"]).to(torch.int64)
        if n.kind == "flatten":
            return torch.flatten(v, n.attrs["start_dim"])
        if n.kind == "relu":
            return v.clamp_min(0)
        if n.kind == "clamp":
            return v.clamp(p.attrs[n.name]["lo"], p.attrs[n.name]["hi"])
        if n.kind == "upsample":  # output pixel (i, j) is input pixel (i // sh, j // sw)
            sh, sw = n.attrs["scale"]
            rows = torch.arange(v.shape[-2] * sh) // sh
            cols = torch.arange(v.shape[-1] * sw) // sw
            return v[..., rows, :][..., cols]
        raise LowbitError(f"internal: cannot simulate {n.kind} {n.name!r}")  # pragma: no cover

    def _quantize_input(self, n: FNode, x: torch.Tensor) -> torch.Tensor:
        reader = next(r for r in self.fnodes if r.kind in ("qlayer", "qact") and _reads(self.fnodes, r, n.name))
        spec = self.lowered.input
        if spec["dtype"] == "uint8":
            x = normalize_pixels(x, spec["mean"], spec["std"])
        return reader.module.input_quantizer.codes(x).to(torch.int64)


def normalize_pixels(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """``(p / 255 - mean_c) / std_c`` in float32 with scalar operands, as :func:`lowbit.data.iterate` does."""
    x = x.to(torch.float32) / 255.0
    if len(mean) == 1 and len(std) == 1:
        return (x - mean[0]) / std[0]
    return torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(x.shape[1])], dim=1)


def _reads(fnodes: list[FNode], node: FNode, source: str) -> bool:
    """Does ``node`` read ``source``, directly or through transparent nodes (flatten, pools, clamps, concat)?"""
    byname = {f.name: f for f in fnodes}
    todo = list(node.inputs)
    while todo:
        name = todo.pop()
        if name == source:
            return True
        if byname[name].kind in TRANSPARENT or byname[name].kind in JOINS:
            todo.extend(byname[name].inputs)
    return False


# ----------------------------------------------------------------------------------------------- encoders
class _Codes:
    """Integer codes travelling through the replay (moved by reshapes and transposes, never by float ops)."""

    def __init__(self, t: torch.Tensor):
        self.t = t


class EncoderSimulation:
    """``EncoderSimulation(lowered).run_trace(inputs)``: the integer values of an exported encoder, computed by
    replaying the *traced program* of the PyTorch model (its own ATen float glue) with the export's integer
    arithmetic at each quantized layer: codes from the model's own quantizers, weight codes from its weight
    quantizers, exact products in float64 and the lowering's dyadic constants rounded by the floor-division
    formula. Keys are the file's value names (``quantize``, ``linear`` and ``matmul`` outputs, ``"logits"``)."""

    def __init__(self, lowered):
        self.lowered = lowered
        self.steps = lowered.program.steps

    def run_int(self, inputs) -> torch.Tensor:
        return self.run_trace(inputs)["logits"]

    def run_trace(self, inputs) -> dict[str, torch.Tensor]:
        from torch import fx

        from lowbit.export.encoder import _IDENTITY, _MOVES, QLINEAR, QMATMUL

        cap, steps, trace = self.lowered.capture, self.steps, {}

        def codes(x, step, i: int) -> torch.Tensor:
            if isinstance(x, _Codes):
                return x.t
            q = [step.module.input_quantizer] if step.kind == "linear" else \
                [step.module.a_quantizer, step.module.b_quantizer]
            c = q[i].codes(x).to(torch.int64)
            trace[step.inputs[i]] = c
            return c

        def finish(y: torch.Tensor, step) -> object:
            trace[step.node] = y
            if step.out == "codes":
                return _Codes(y)
            if step.out == "logits":
                trace["logits"] = y
            return (y.to(torch.float64) * step.out_scale).to(torch.float32)

        class Replay(fx.Interpreter):
            def run_node(self, n):
                if n.op == "call_module" and n.target.startswith("_guards"):
                    return None
                return super().run_node(n)

            def call_function(self, target, args, kwargs):
                if target is QLINEAR:
                    step = steps[args[1]]
                    m = step.module
                    x = codes(args[0], step, 0)
                    w = m.weight_quantizer.codes(m.weight.detach()).to(torch.float64)
                    return finish(apply((x.to(torch.float64) @ w.T).to(torch.int64), step.requant, axis=-1), step)
                if target is QMATMUL:
                    step = steps[args[2]]
                    a, b = codes(args[0], step, 0), codes(args[1], step, 1)
                    acc = torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int64)
                    return finish(apply(acc, step.requant), step)
                if args and isinstance(args[0], _Codes):
                    if target not in _MOVES:
                        raise LowbitError(f"internal: {target} applied to integer codes")
                    if target in _IDENTITY:
                        return args[0]
                    return _Codes(target(args[0].t, *args[1:], **kwargs))
                return super().call_function(target, args, kwargs)

        from lowbit.export.encoder import active

        ex = {k: inputs[k] for k in cap.inputs}
        with active(cap.modules), torch.no_grad():
            Replay(cap.gm).run(*[ex[k] for k in cap.inputs])
        return trace
