"""Probe: requantize inside oneDNN's int8 conv (uint8 output) exactly, and what it saves at batch 64.

Today the fast path asks ``qconv2d_pointwise`` for float32 accumulators (every scale 1: exact while
``|acc| < 2^24``) and requantizes them in a compiled graph (float64). PyTorch's own int8 lets the kernel scale,
add the bias, clamp and round, and write uint8. This script asks whether the kernel's float32 epilogue can be
made *provably* equal to the reference ``clamp(round_half_even((acc*m + b) * 2^-k), lo, hi)``, and what it
buys.

Exactness argument (see :func:`fused_exact`): with ``x_scale = 1``, ``output_scale = 1`` (PyTorch then sets
neither a source nor a destination scale), per-channel weight scales ``s_c`` and a float32 bias ``beta_c``,
oneDNN computes per output ``u8(sat(rne(clip(s_c*float(acc) + beta_c, lo, hi) + zp)))`` (a multiply and an
add, or one fused multiply-add, depending on ISA and kernel). Take ``s_c = m_c * 2^-k_c`` and
``beta_c = b_c * 2^-k_c``. Every value involved is then an integer multiple of ``2^-k_c``, and a float32 holds
such a value exactly while its magnitude times ``2^k_c`` is below ``2^24``. Hence, if (1) ``|m_c| < 2^24``,
(2) ``|acc*m_c| < 2^24`` and (3) ``|acc*m_c + b_c| < 2^24`` for every accumulator in the *window* (those whose
exact result lies within ``[lo - 1, hi + 1]``, plus one step), and (4) ``(max(|lo + zp|, |hi + zp|) + 1) *
2^k_c < 2^24`` (the zero point is added before rounding), then the product, the sum (or the FMA) and the
zero-point add are exact, the clip to integer bounds commutes with rounding, the conversion rounds half to even
(MXCSR default), and the result equals the reference for every accumulator of the window. Outside the window
both sides are non-decreasing in ``acc`` (``m_c >= 0``; a negative channel is run with its weights negated) and
already at ``lo``/``hi`` at the window's ends, so they saturate alike. The zero point must be even, or a tie
``n + 1/2`` would round to the parity of ``n + zp`` instead of ``n``.

Condition (2) is what costs: the window spans ``(V + |B|) / s`` accumulators (``V`` ~ the output range, ``B``
the bias in output steps, ``s`` the multiplier), so ``m_c`` may carry only ~``24 - log2(V + |B|)`` bits after
the binary point of the output step: a *narrow multiplier* (:func:`narrow_dyadic`), a change of the lowering's
numbers, measured below (``--accuracy``) against the 31-bit ones.

Run: ``python bench/u8_requant_probe.py [--runs 7] [--threads 1] [--exact-only] [--isa-subprocesses]``.
Timing is side by side in one process, medians, one thread; the exactness check runs under every ISA oneDNN can
be capped to here (``ONEDNN_MAX_CPU_ISA`` subprocesses) when ``--isa-subprocesses`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lowbit.ir.dyadic import requantize

LIMIT = 2**24
# ResNet-18 at 224x224: the convs of one residual block per stage, (c_in, c_out, k, stride, h_in)
SHAPES = {
    "layer1 3x3 64->64 @56": (64, 64, 3, 1, 56),
    "layer2 3x3 64->128 s2 @56": (64, 128, 3, 2, 56),
    "layer2 3x3 128->128 @28": (128, 128, 3, 1, 28),
    "layer3 3x3 256->256 @14": (256, 256, 3, 1, 14),
    "layer4 3x3 512->512 @7": (512, 512, 3, 1, 7),
    "down 1x1 128->256 s2 @28": (128, 256, 1, 2, 28),
}


# ------------------------------------------------------------------------------------------ the exact rule
def narrow_dyadic(gain: torch.Tensor, offset: torch.Tensor, lo: int, hi: int, zp: int, acc_max: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel ``(m, k, b)`` for ``gain`` (real multiplier) and ``offset`` (real bias, output steps) with the
    largest shift ``k`` that keeps :func:`fused_exact` true: the *narrow multiplier* a lowering option would
    write. ``acc_max``: per-channel bound of |acc| (limits the window when the layer cannot reach it)."""
    g, off = gain.double().abs(), offset.double()
    v = max(abs(lo), abs(hi)) + 2
    window = torch.minimum(v + off.abs(), acc_max.double() * g + off.abs())  # max |acc*s| on the window
    top = torch.maximum(window, torch.full_like(window, max(abs(lo + zp), abs(hi + zp)) + 1.0))
    top = torch.maximum(top, v + off.abs())
    k = torch.floor(torch.log2((LIMIT - 1) / top)).to(torch.int64).clamp(0, 62)
    m = torch.round(gain.double() * 2.0**k).to(torch.int64)
    b = torch.round(off * 2.0**k).to(torch.int64)
    return m, k, b


def fused_exact(m: torch.Tensor, k: torch.Tensor, b: torch.Tensor, lo: int, hi: int, zp: int, acc_lo: torch.Tensor,
                acc_hi: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per channel: whether the kernel's float32 epilogue provably equals the reference (conditions (1)-(4) of
    the module docstring, on the window of accumulators), and the first failing condition overall."""
    m, k, b = m.to(torch.int64), k.to(torch.int64), b.to(torch.int64)
    am = m.abs()
    # window: accumulators whose exact value (acc*m + b) * 2^-k lies in [lo - 1 - s, hi + 1 + s]; for m > 0
    # acc in [ceil(((lo-1)*2^k - b - m)/m), floor(((hi+1)*2^k - b + m)/m)], clipped to the reachable range
    p2 = torch.ones_like(k) << k
    sgn_b = b  # the kernel computes acc'*|m| + b with acc' = sign(m)*acc
    safe = am.clamp_min(1)
    w_lo = -((-((lo - 1) * p2 - sgn_b - am)) // safe)
    w_hi = ((hi + 1) * p2 - sgn_b + am) // safe
    if (m < 0).any():  # a negated channel: the kernel sees -acc
        acc_lo, acc_hi = torch.where(m < 0, -acc_hi, acc_lo), torch.where(m < 0, -acc_lo, acc_hi)
    w_lo, w_hi = torch.maximum(w_lo, acc_lo), torch.minimum(w_hi, acc_hi)
    a_max = torch.maximum(w_lo.abs(), w_hi.abs())
    ok_m = am < LIMIT
    ok_prod = a_max * am < LIMIT
    ok_sum = torch.maximum((w_lo * am + sgn_b).abs(), (w_hi * am + sgn_b).abs()) < LIMIT
    ok_bias = b.abs() < LIMIT
    ok_zp = (max(abs(lo + zp), abs(hi + zp)) + 1) * p2 < LIMIT
    ok_even = zp % 2 == 0
    ok = ok_m & ok_prod & ok_sum & ok_bias & ok_zp & ok_even
    why = "exact" if bool(ok.all()) else next(
        w for w, c in (("multiplier needs > 24 bits", ok_m), ("|acc*m| may reach 2^24", ok_prod),
                       ("|acc*m + b| may reach 2^24", ok_sum), ("|b| >= 2^24", ok_bias),
                       ("(code + zp) * 2^k may reach 2^24", ok_zp),
                       ("odd zero point", torch.tensor(ok_even))) if not bool(c.all()))
    return ok, why


def fused_conv(w: torch.Tensor, m, k, b, lo: int, hi: int, zp_in: int, zp_out: int, geometry):
    """The uint8-output oneDNN conv with the requantization folded in: ``x_u8 -> codes + zp_out`` (uint8)."""
    stride, padding = geometry
    sign = torch.where(m < 0, -1, 1)
    w8 = (w.to(torch.int64) * sign.reshape(-1, 1, 1, 1)).to(torch.int8).contiguous()
    p2 = torch.pow(2.0, -k.double())
    s32 = (m.abs().double() * p2).to(torch.float32)
    zero = s32 == 0
    s32 = torch.where(zero, torch.ones_like(s32), s32)  # oneDNN needs nonzero scales: zero the weights instead
    w8[zero] = 0
    beta = (b.double() * p2).to(torch.float32)
    assert torch.equal(s32.double(), torch.where(zero, 1.0, m.abs().double() * p2)), "scale not exact in float32"
    assert torch.equal(beta.double(), b.double() * p2), "bias not exact in float32"
    wzp = torch.zeros(w.shape[0], dtype=torch.int64)
    packed = torch.ops.onednn.qconv_prepack(w8, s32, 1.0, zp_in, [stride] * 2, [padding] * 2, [1, 1], 1, None)

    def run(x):
        return torch.ops.onednn.qconv2d_pointwise(x, 1.0, zp_in, packed, s32, wzp, beta, [stride] * 2, [padding] * 2,
                                                  [1, 1], 1, 1.0, zp_out, torch.uint8, "hardtanh",
                                                  [float(lo), float(hi)], "")

    return run


def acc_conv(w: torch.Tensor, zp_in: int, geometry):
    """Today's path: the int32 accumulators as exact float32 (every scale 1, no bias, no post-op)."""
    stride, padding = geometry
    c = w.shape[0]
    ones, wzp = torch.ones(c), torch.zeros(c, dtype=torch.int64)
    packed = torch.ops.onednn.qconv_prepack(w.to(torch.int8).contiguous(), ones, 1.0, zp_in, [stride] * 2,
                                            [padding] * 2, [1, 1], 1, None)

    def run(x):
        return torch.ops.onednn.qconv2d_pointwise(x, 1.0, zp_in, packed, ones, wzp, None, [stride] * 2,
                                                  [padding] * 2, [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")

    return run


# ------------------------------------------------------------------------------------------------ exactness
def exactness(seed: int = 0) -> dict:
    """Random codes, tie-heavy and extreme cases at several shapes: uint8 output vs the reference formula."""
    g = torch.Generator().manual_seed(seed)
    cases, total, bad = [], 0, 0
    for name, (cin, cout, ks, stride, h), x_bits, out in [
        ("3x3 64->64 relu 4-bit", (64, 64, 3, 1, 12), 4, (0, 15)),
        ("3x3 128->96 signed 4-bit out", (128, 96, 3, 1, 9), 4, (-8, 7)),
        ("1x1 256->128 s2 relu 2-bit out", (256, 128, 1, 2, 10), 4, (0, 3)),
        ("3x3 32->64 8-bit in, 4-bit out", (32, 64, 3, 1, 10), 8, (0, 15)),
        ("3x3 64->64 relu 8-bit out", (64, 64, 3, 1, 10), 4, (0, 255)),
    ]:
        lo, hi = out
        zp_out = -lo
        x_hi = (1 << x_bits) - 1
        for kind in ("random", "ties", "extreme"):
            w = torch.randint(-8, 8, (cout, cin, ks, ks), generator=g)
            if kind == "extreme":  # all-max inputs, all-max / all-min weights on half the channels
                x = torch.full((2, cin, h, h), x_hi)
                x[1] = torch.randint(0, x_hi + 1, (cin, h, h), generator=g)
                w[: cout // 4] = 7
                w[cout // 4: cout // 2] = -8
            else:
                x = torch.randint(0, x_hi + 1, (2, cin, h, h), generator=g)
            acc = F.conv2d(x.double(), w.double(), None, stride, ks // 2).to(torch.int64)
            w_abs = w.reshape(cout, -1)
            acc_hi = w_abs.clamp_min(0).sum(1) * x_hi
            acc_lo = w_abs.clamp_max(0).sum(1) * x_hi
            acc_max = torch.maximum(acc_hi.abs(), acc_lo.abs())
            spread = acc.double().std((0, 2, 3)).clamp_min(1.0)
            gain = (hi - lo + 1) / (4 * spread) * torch.where(torch.rand(cout, generator=g) < 0.2, -1.0, 1.0)
            offset = (torch.rand(cout, generator=g) * 2 - 1) * 6
            m, k, b = narrow_dyadic(gain, offset, lo, hi, zp_out, acc_max)
            if kind == "ties":  # multipliers with few bits and biases on half steps: ties everywhere
                k = torch.full_like(k, 8)
                m = torch.randint(1, 40, (cout,), generator=g) * torch.where(gain < 0, -1, 1)
                b = torch.randint(-300, 300, (cout,), generator=g) * 2 + 128  # ... + 2^(k-1): many exact ties
            ok, why = fused_exact(m, k, b, lo, hi, zp_out, acc_lo, acc_hi)
            ref = requantize(acc, m, k, b, lo=lo, hi=hi, axis=1).to(torch.int64)
            xs = (x.to(torch.uint8)).contiguous(memory_format=torch.channels_last)
            got = fused_conv(w, m, k, b, lo, hi, 0, zp_out, (stride, ks // 2))(xs).to(torch.int64) - zp_out
            d = got != ref
            mask = ok.reshape(1, -1, 1, 1).expand_as(d)
            n_checked = int(mask.sum())
            n_bad = int((d & mask).sum())
            ties = int(((acc * m.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)) % (1 << k.reshape(1, -1, 1, 1))
                        == (1 << (k.reshape(1, -1, 1, 1) - 1))).sum())
            cases.append({"case": f"{name} / {kind}", "channels_proved": f"{int(ok.sum())}/{cout}", "why": why,
                          "values_checked": n_checked, "ties": ties, "differ_proved": n_bad,
                          "differ_unproved": int((d & ~mask).sum()), "k": [int(k.min()), int(k.max())],
                          "m_bits": int(math.ceil(math.log2(int(m.abs().max()) + 1)))})
            total, bad = total + n_checked, bad + n_bad
    return {"cases": cases, "values_checked": total, "differ": bad, "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


# ------------------------------------------------------------------------------------------------ timing
def timing(runs: int, batch: int) -> list[dict]:
    from lowbit.runtime.fastpath import _Requant

    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (cin, cout, ks, stride, h) in SHAPES.items():
        x = torch.randint(0, 16, (batch, cin, h, h), generator=g).to(torch.uint8)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randint(-8, 8, (cout, cin, ks, ks), generator=g)
        geometry = (stride, ks // 2)
        acc_max = (w.abs().reshape(cout, -1).sum(1) * 15)
        gain = torch.full((cout,), 1.0 / 64) * (1 + torch.rand(cout, generator=g))
        offset = (torch.rand(cout, generator=g) * 2 - 1) * 4
        m, k, b = narrow_dyadic(gain, offset, 0, 15, 0, acc_max)
        acc_op = acc_conv(w, 0, geometry)
        rq = _Requant(m, k, b, 0, 15, acc_max, 1, 4)

        def glue(a, rq=rq):
            return rq(a.to(torch.float64)).to(torch.uint8)

        glue_c = torch.compile(glue, dynamic=False)
        fused = fused_conv(w, m, k, b, 0, 15, 0, 0, geometry)
        acc = acc_op(x)
        assert torch.equal(glue_c(acc), fused(x)), name
        variants = {"fp32 acc (kernel)": lambda f=acc_op, x=x: f(x),
                    "compiled requant (glue)": lambda f=glue_c, a=acc: f(a),
                    "u8 fused (kernel)": lambda f=fused, x=x: f(x)}
        times = {v: [] for v in variants}
        for _ in range(2):
            for f in variants.values():
                f()
        for _ in range(runs):
            for v, f in variants.items():
                t0 = time.perf_counter()
                f()
                times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        today = med["fp32 acc (kernel)"] + med["compiled requant (glue)"]
        rows.append({"layer": name, **{f"{v} ms": round(t, 2) for v, t in med.items()},
                     "today ms": round(today, 2), "fused vs today": round(today / med["u8 fused (kernel)"], 2)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--exact-only", action="store_true")
    ap.add_argument("--isa-subprocesses", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the exactness result as one JSON line")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ex = exactness()
    if args.json:
        print(json.dumps(ex))
        return
    for c in ex["cases"]:
        print(c)
    print(f"default ISA: {ex['differ']} of {ex['values_checked']} proved values differ", flush=True)
    if args.isa_subprocesses:
        for isa in ("AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_AMX"):
            env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa)
            out = subprocess.run([sys.executable, __file__, "--json"], env=env, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            unproved = sum(c["differ_unproved"] for c in r["cases"])
            print(f"ONEDNN_MAX_CPU_ISA={isa}: {r['differ']} of {r['values_checked']} proved values differ "
                  f"({unproved} differ where unproved)", flush=True)
    if not args.exact_only:
        timing(args.runs, args.batch)


if __name__ == "__main__":
    main()
