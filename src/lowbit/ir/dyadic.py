"""Dyadic fixed-point requantization: the one definition shared by the lowering, every backend and the simulation.

Between two integer layers the float chain ``s_w*s_x*acc (+bias) -> BN -> ReLU -> next quantizer`` is, per
output channel ``c``, an affine map followed by round and clamp::

    codes = clamp(round(M_c * acc + B_c), lo, hi)

In integers ``M_c`` becomes a dyadic number ``m_c * 2^-k_c`` (an int32 multiplier and a right shift) and
``B_c`` a bias ``b_c = round(B_c * 2^k_c)`` in the same fixed-point units, so the whole step is::

    codes = clamp(round_half_even((acc*m_c + b_c) / 2^k_c), lo, hi)          (exact, in int64)

Rounding rule: the final division by ``2^k`` rounds to nearest with ties to even ("banker's rounding":
2.5 -> 2, 3.5 -> 4, -2.5 -> -2, -0.5 -> 0), computed exactly from the floor quotient and the remainder.
Ties to even is what ``torch.round`` does in the fake quantizers, what every PyTorch quantized CPU engine
(x86, fbgemm, onednn, qnnpack) does in its requantization (measured by ``bench/fastpath_probe.py``) and what
ONNX ``QuantizeLinear`` specifies; with one rule everywhere, the reference runtime, the simulation, training
and the fast kernels can agree bit for bit. It is the only rounding used by the integer backends.

Overflow bound: with ``|acc| * |m| < 2^62`` (e.g. int32 accumulators and int32 multipliers, or wider sums
with proportionally narrower multipliers), ``|b| <= 2^61`` and ``0 <= k <= 62``, ``|acc*m + b| < 2^62 + 2^61``
and the rounding adds less than ``2^61``, so int64 never overflows. :func:`requantize` checks these
conditions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

MAX_SHIFT = 62
PRODUCT_LIMIT = 2**62  # |acc| * |m| < PRODUCT_LIMIT
MULTIPLIER_LIMIT = 2**31  # |m| < MULTIPLIER_LIMIT (int32 multipliers)
BIAS_LIMIT = 2**61  # |b| <= BIAS_LIMIT
SUM_LIMIT = 2**63 - 2**61  # |sum of terms| < SUM_LIMIT: room for round_shift's offset (< 2^61) in int64
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

ScaleLike = float | Sequence[float] | np.ndarray | torch.Tensor
IntLike = int | torch.Tensor


def to_dyadic(scale: ScaleLike, bits: int = 31) -> tuple[IntLike, IntLike]:
    """Approximate ``scale`` by ``multiplier * 2^-shift`` with a normalised ``bits``-bit multiplier.

    ``|multiplier|`` lies in ``[2^(bits-1), 2^bits)`` and carries the sign of ``scale`` (a folded BN
    ``gamma`` may be negative), so the relative error is at most ``2^-bits`` (``2^-31`` by default).
    A zero scale gives multiplier 0 and shift ``bits - 1`` (the shift of scale 1.0), which keeps a bias
    in that channel at the same fixed-point precision as elsewhere. Arrays are converted elementwise
    (per channel, each with its own shift).

    Returns:
        ``(multiplier, shift)``: Python ints for a scalar input, otherwise two int64 tensors of the
        input's shape.

    Raises:
        ValueError: a non-finite scale, or one whose shift would leave ``[0, 62]`` (for ``bits=31``:
            ``|scale| < 2^-32`` or ``|scale| >= 2^31``).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 31:
        raise ValueError(f"multiplier bits must be an int in [1, 31], got {bits!r}")
    s, scalar = _as_float64(scale)
    if not np.isfinite(s).all():
        raise ValueError(f"scale must be finite, got {s[~np.isfinite(s)][0]}")
    mant, exp = np.frexp(s)  # s = mant * 2^exp, 0.5 <= |mant| < 1 (mant = 0 for s = 0)
    m = np.rint(np.ldexp(mant, bits))  # |m| in [2^(bits-1), 2^bits], exact scaling then one rounding
    shift = bits - exp.astype(np.int64)
    carry = np.abs(m) == 2.0**bits  # rounding reached the next power of two: renormalise
    m = np.where(carry, m / 2, m)
    shift = np.where(carry, shift - 1, shift)
    shift = np.where(s == 0, bits - 1, shift)
    bad = (shift < 0) | (shift > MAX_SHIFT)
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        where = "" if scalar else f" (element {i})"
        raise ValueError(f"scale {s.reshape(-1)[i]:.6g}{where} is not representable as a {bits}-bit "
                         f"multiplier with shift in [0, {MAX_SHIFT}]: |scale| must be in "
                         f"[2^{bits - 1 - MAX_SHIFT}, 2^{bits}) or exactly 0")
    if scalar:
        return int(m), int(shift)
    return torch.from_numpy(m.astype(np.int64)), torch.from_numpy(shift.astype(np.int64))


def to_dyadic_common(scales: ScaleLike, bits: int = 31) -> tuple[torch.Tensor, int]:
    """Several scales on ONE shift: ``scales[i] ~= multipliers[i] * 2^-shift``, all ``|m| < 2^bits``.

    Used where integer terms must be added before a single rounding (a residual add). The largest scale
    gets a normalised multiplier; smaller ones keep the same absolute error ``<= 2^-(shift+1)``.
    """
    s, _ = _as_float64(scales)
    s = s.reshape(-1)
    nonzero = s[s != 0]
    if nonzero.size == 0:
        return torch.zeros(s.shape, dtype=torch.int64), bits - 1
    _, shifts = to_dyadic(torch.from_numpy(nonzero), bits)
    shift = int(shifts.min())
    m = np.rint(np.ldexp(s, shift))  # the largest |scale| rounds to its normalised multiplier, < 2^bits
    return torch.from_numpy(m.astype(np.int64)), shift


def to_fixed(value: ScaleLike, shift: IntLike) -> IntLike:
    """``round(value * 2^shift)`` (nearest, ties to even) as int64: a float bias in fixed-point units.

    Raises:
        ValueError: a non-finite value or a result beyond ``|b| <= 2^61`` (the overflow bound).
    """
    v, scalar = _as_float64(value)
    k = np.asarray(shift.numpy() if isinstance(shift, torch.Tensor) else shift, dtype=np.int32)
    if not np.isfinite(v).all():
        raise ValueError("fixed-point value must be finite")
    b = np.rint(np.ldexp(v, k))  # exact scaling by a power of two, then one rounding
    if (np.abs(b) > BIAS_LIMIT).any():
        raise ValueError(f"bias {v.reshape(-1)[np.argmax(np.abs(b).reshape(-1))]:.6g} times 2^shift exceeds "
                         f"2^61 in fixed point: the requantization would overflow int64")
    if scalar and b.ndim == 0:
        return int(b)
    return torch.from_numpy(b.astype(np.int64))


def round_shift(x: torch.Tensor, shift: IntLike) -> torch.Tensor:
    """``x / 2^shift`` rounded to nearest, ties to even, exactly in int64 (``shift`` >= 0, scalar or broadcast).

    With ``q = x >> shift`` (the floor quotient) and ``c = 2^(shift-1) - 1``, the result is
    ``(x + c + (q & 1)) >> shift``: a remainder above one half carries into ``q + 1``, one below does not, and
    an exact half carries only when ``q`` is odd, which makes the result even. ``shift = 0`` returns ``x``.
    The caller guarantees ``|x| < 2^63 - 2^61`` (see the module docstring).
    """
    shift = torch.as_tensor(shift, dtype=torch.int64)
    x = x.to(torch.int64)
    pos = (shift > 0).to(torch.int64)
    c = ((pos << (shift - 1).clamp_min(0)) - pos)  # 2^(shift-1) - 1, or 0 for shift 0
    odd = (x >> shift).bitwise_and_(pos)
    return (x + c).add_(odd).bitwise_right_shift_(shift)


def requantize(acc: torch.Tensor, multiplier: IntLike, shift: IntLike, bias: IntLike = 0, *,
               lo: int, hi: int, axis: int = 1) -> torch.Tensor:
    """``clamp(round_half_even((acc*m + b) * 2^-shift), lo, hi)`` computed exactly in int64; returns int32.

    Args:
        acc: integer accumulators (int32 conv sums, or wider window sums) with ``|acc| * |m| < 2^62``.
        multiplier, shift, bias: per tensor (ints or 0-d) or per channel (1-D of length ``acc.shape[axis]``).
            ``bias`` is in the fixed-point units of its channel (:func:`to_fixed` with the same shift).
        lo, hi: the output code range (``lo = 0`` also applies a ReLU).
        axis: the channel axis: 1 for NCHW and for ``(N, C)`` linear outputs, -1 for ``(..., C)``.

    Raises:
        ValueError: a float ``acc``, or a value outside the bounds that guarantee no int64 overflow.
    """
    if acc.dtype.is_floating_point or acc.dtype == torch.bool:
        raise ValueError(f"acc must be an integer tensor, got {acc.dtype}")
    if not lo <= hi or lo < -(2**31) or hi >= 2**31:
        raise ValueError(f"need -2^31 <= lo <= hi < 2^31, got lo={lo}, hi={hi}")
    acc = acc.to(torch.int64)
    m, k, b = (_per_channel(p, acc, axis, name) for p, name in
               ((multiplier, "multiplier"), (shift, "shift"), (bias, "bias")))
    if int(m.min()) <= -MULTIPLIER_LIMIT or int(m.max()) >= MULTIPLIER_LIMIT:
        raise ValueError("|multiplier| must be < 2^31 (int32)")
    max_acc = max(-int(acc.min()), int(acc.max())) if acc.numel() else 0
    if max_acc * int(m.abs().max()) >= PRODUCT_LIMIT:
        raise ValueError(f"|acc| * |multiplier| must be < 2^62 (max |acc| {max_acc}): int64 could overflow")
    if int(k.min()) < 0 or int(k.max()) > MAX_SHIFT:
        raise ValueError(f"shift must be in [0, {MAX_SHIFT}]")
    if int(b.min()) < -BIAS_LIMIT or int(b.max()) > BIAS_LIMIT:
        raise ValueError("|bias| must be <= 2^61 in fixed-point units")
    return round_shift((acc * m).add_(b), k).clamp_(lo, hi).to(torch.int32)


def requantize_sum(acc: torch.Tensor, multiplier: IntLike, shift: IntLike, bias: IntLike, residual: torch.Tensor,
                   residual_multiplier: IntLike, *, lo: int, hi: int, axis: int = 1) -> torch.Tensor:
    """A conv's accumulators plus a residual value on one shift, rounded once (a fused residual add)::

        clamp(round_half_even((acc*m + b + r*m_r) * 2^-shift), lo, hi)

    exactly in int64; ``m, shift, b, m_r`` per tensor or per channel along ``axis``, ``residual`` of ``acc``'s shape.
    Raises ValueError where ``max|acc*m| + max|b| + max|r*m_r|`` could overflow int64 (``>= 2^63 - 2^61``, which
    leaves room for the rounding offset) or a constant is out of its range."""
    if residual.dtype.is_floating_point or residual.dtype == torch.bool:
        raise ValueError(f"residual must be an integer tensor, got {residual.dtype}")
    if residual.shape != acc.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and accumulators {tuple(acc.shape)} differ in shape")
    acc, r = acc.to(torch.int64), residual.to(torch.int64)
    m, k, b, mr = (_per_channel(v, acc, axis, name) for v, name in
                   ((multiplier, "multiplier"), (shift, "shift"), (bias, "bias"), (residual_multiplier,
                                                                                   "residual multiplier")))
    if max(int(m.abs().max()), int(mr.abs().max())) >= MULTIPLIER_LIMIT:
        raise ValueError("|multiplier| and |residual multiplier| must be < 2^31 (int32)")
    if int(k.min()) < 0 or int(k.max()) > MAX_SHIFT:
        raise ValueError(f"shift must be in [0, {MAX_SHIFT}]")
    if not lo <= hi or lo < -(2**31) or hi >= 2**31:
        raise ValueError(f"need -2^31 <= lo <= hi < 2^31, got lo={lo}, hi={hi}")
    bound = _max(acc) * int(m.abs().max()) + int(b.abs().max()) + _max(r) * int(mr.abs().max())
    if bound >= SUM_LIMIT:
        raise ValueError(f"|acc*m + b + r*m_r| may reach 2^{math.log2(bound):.1f}: int64 could overflow")
    return round_shift((acc * m).add_(b).add_(r * mr), k).clamp_(lo, hi).to(torch.int32)


def _max(t: torch.Tensor) -> int:
    return max(-int(t.min()), int(t.max())) if t.numel() else 0


def _per_channel(p: IntLike, acc: torch.Tensor, axis: int, name: str) -> torch.Tensor:
    """A scalar or 1-D per-channel parameter as int64, shaped to broadcast along ``acc``'s ``axis``."""
    try:
        t = torch.as_tensor(p)
    except (RuntimeError, OverflowError, ValueError):
        raise ValueError(f"{name} {p} does not fit in int64") from None
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer, got {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() == 1 and t.ndim <= 1:
        return t.reshape(())
    if acc.ndim == 0:
        raise ValueError(f"per-channel {name} needs an acc with a channel axis")
    axis = axis % acc.ndim
    if t.ndim != 1 or t.numel() != acc.shape[axis]:
        raise ValueError(f"per-channel {name} must be 1-D of length {acc.shape[axis]} (acc axis {axis}), "
                         f"got shape {tuple(t.shape)}")
    return t.reshape((-1,) + (1,) * (acc.ndim - axis - 1))


def _as_float64(x: ScaleLike) -> tuple[np.ndarray, bool]:
    """(float64 array, was it a Python/0-d scalar). float32 inputs convert exactly."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().to(torch.float64).numpy()
        return arr, False
    arr = np.asarray(x, dtype=np.float64)
    return arr, arr.ndim == 0


# --------------------------------------------------------------------- requantization in a float32 epilogue
# An int8 kernel (oneDNN) can requantize in its float32 epilogue and write uint8 codes: with scale
# ``s = m * 2^-k``, bias ``beta = b * 2^-k``, a clip to ``[lo, hi]`` and output zero point ``zp`` it computes
# ``rne(clip(s*float(acc) + beta, lo, hi) + zp)`` (a multiply and an add, or one fused multiply-add). Every value
# there is a multiple of ``2^-k``; float32 holds such a value exactly while its magnitude is below
# ``2^(24-k)``. :func:`float32_epilogue_exact` checks that this holds wherever it matters, which makes the
# epilogue equal to :func:`requantize`; :func:`float32_epilogue_dyadic` picks constants for which it holds.
FLOAT32_SIGNIFICAND = 2**24
EPILOGUE_MAX_ERROR = 2.0**-10  # narrowed multipliers may move a value by at most this many output steps


def acc_bounds(w: torch.Tensor, x_range: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, the least and greatest accumulator ``sum(x * w)`` of integer weights ``w`` (output
    channels first) for ``x`` in ``x_range`` (zero padding included), as int64 tensors."""
    lo_x, hi_x = min(0, x_range[0]), max(0, x_range[1])
    w = w.to(torch.int64).reshape(w.shape[0], -1)
    pos, neg = w.clamp_min(0).sum(1), w.clamp_max(0).sum(1)
    return pos * lo_x + neg * hi_x, pos * hi_x + neg * lo_x


def float32_epilogue_exact(m: torch.Tensor, k: torch.Tensor, b: torch.Tensor, lo: int, hi: int, zp: int,
                           acc_lo: torch.Tensor, acc_hi: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per channel: does a float32 epilogue ``rne(clip(|s|*float(acc') + beta, lo, hi) + zp)`` with
    ``s = m*2^-k``, ``beta = b*2^-k``, ``acc' = sign(m)*acc`` equal ``requantize(acc, m, k, b, lo, hi) + zp`` for
    every ``acc`` in ``[acc_lo, acc_hi]``? Returns the per-channel verdict and, if any channel fails, why.

    The argument: let the *window* be the accumulators whose exact value ``t = (acc'*|m| + b) * 2^-k`` lies in
    ``[lo - 1 - |s|, hi + 1 + |s|]``. If (1) ``|m| < 2^24``, (2) ``|acc'*m| < 2^24`` and (3) ``|acc'*|m| + b| <
    2^24`` on the window, (4) ``|b| < 2^24`` and (5) ``(max(|lo + zp|, |hi + zp|) + 1) * 2^k < 2^24``, then the
    scale, the bias, the product, the sum (or the single rounding of a fused multiply-add) and the zero-point
    add are all exact float32 values, so the kernel rounds the exact ``t + zp``; with (6) ``zp`` even, rounding
    half to even (the MXCSR default the conversion uses) gives ``rne(t) + zp``, and the clip to integer bounds
    commutes with rounding. Outside the window both sides are non-decreasing in ``acc'`` and already at
    ``lo``/``hi`` at its ends (consecutive accumulators move ``t`` by ``|s|``), so they saturate alike. A channel
    with ``m = 0`` is the constant ``rne(b*2^-k)`` clipped: exact under (4) and (5)."""
    m, k, b = (torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in (m, k, b))
    acc_lo, acc_hi = torch.as_tensor(acc_lo).to(torch.int64), torch.as_tensor(acc_hi).to(torch.int64)
    am, lim = m.abs(), FLOAT32_SIGNIFICAND
    if int(k.max()) > 40:  # every product below would pass int64; and (5) fails anyway
        return torch.zeros_like(m, dtype=torch.bool), f"shift {int(k.max())}: the multiplier has too many bits"
    p2 = torch.ones_like(k) << k
    safe = am.clamp_min(1)
    w_lo = -((b + am - (lo - 1) * p2) // safe)  # ceil(((lo-1)*2^k - b - |m|) / |m|)
    w_hi = ((hi + 1) * p2 - b + am) // safe
    neg = m < 0
    a_lo, a_hi = torch.where(neg, -acc_hi, acc_lo), torch.where(neg, -acc_lo, acc_hi)
    w_lo, w_hi = torch.maximum(w_lo, a_lo), torch.minimum(w_hi, a_hi)
    empty = w_lo > w_hi
    a_max = torch.where(empty, 0, torch.maximum(w_lo.abs(), w_hi.abs()))
    t_max = torch.where(empty, 0, torch.maximum((w_lo * am + b).abs(), (w_hi * am + b).abs()))
    checks = (("the multiplier needs more than 24 bits", am < lim),
              ("|acc*m| may reach 2^24 on the accumulators that round into [lo, hi]", a_max * am < lim),
              ("|acc*m + b| may reach 2^24 there", t_max < lim),
              ("|bias| * 2^k reaches 2^24", b.abs() < lim),
              ("(code + zero point) * 2^k may reach 2^24", (max(abs(lo + zp), abs(hi + zp)) + 1) * p2 < lim),
              ("odd output zero point (ties would round to its parity)", torch.full_like(neg, zp % 2 == 0)))
    return _verdict(checks, neg)


def _verdict(checks, like: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per channel: every ``(reason, condition)`` holds; and the first reason that fails somewhere."""
    ok = torch.ones_like(like, dtype=torch.bool)
    for _, c in checks:
        ok &= c
    return ok, next((reason for reason, c in checks if not bool(c.all())), "")


def float32_epilogue_dyadic(gain: torch.Tensor, offset: torch.Tensor, lo: int, hi: int, zp: int,
                            m: torch.Tensor, k: torch.Tensor, b: torch.Tensor, max_error: float = EPILOGUE_MAX_ERROR,
                            acc: tuple[torch.Tensor, torch.Tensor] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, k, b)`` for ``gain``/``offset`` (real multiplier and bias, output steps) narrowed, per channel, to
    the largest shift for which :func:`float32_epilogue_exact` holds whatever the accumulators, where that moves
    no value by more than ``max_error`` output steps; other channels keep the given ``m, k, b``.

    On the window the exact value and ``acc*s`` stay within ``top = max(|lo|, |hi|) + 2 + |gain| + |offset|``
    output steps, so ``k = floor(log2((2^24 - 1) / top))`` (also bounded by the zero-point condition). The
    multiplier then carries ``k`` bits below the output step, a rounding of at most ``2^-(k+1)`` per accumulator
    unit: at most ``top / |gain| * 2^-(k+1)`` steps on the window (the values that are not clipped); a zero gain
    moves nothing.

    ``acc = (acc_lo, acc_hi)``, the accumulators the layer can produce per channel (from its weights and input
    codes), bounds the window too: a channel with a small gain, whose window ``top / |gain|`` is wider than what
    its accumulators reach, gets the shift its real range allows and the error of that range (the shift is lowered
    where :func:`float32_epilogue_exact` on those bounds still refuses)."""
    g, off = torch.as_tensor(gain, dtype=torch.float64), torch.as_tensor(offset, dtype=torch.float64)
    top = (max(abs(lo), abs(hi)) + 2.0) + g.abs() + off.abs()
    window = top / g.abs().clamp_min(1e-300)
    if acc is not None:
        reach = _reach(acc, g)
        window = torch.minimum(window, reach)
        top = torch.minimum(top, reach * g.abs() + off.abs() + 2.0)
    top = torch.maximum(top, torch.full_like(top, max(abs(lo + zp), abs(hi + zp)) + 1.0))
    k_e = torch.floor(torch.log2((FLOAT32_SIGNIFICAND - 1) / top)).to(torch.int64).clamp(0, MAX_SHIFT)
    k_e = torch.minimum(k_e, k)
    ok = torch.ones_like(k_e, dtype=torch.bool)
    for attempt in range(8 if acc is not None else 1):
        m_e = torch.round(torch.ldexp(g, k_e)).to(torch.int64)
        b_e = torch.round(torch.ldexp(off, k_e)).to(torch.int64)
        if acc is None:
            break
        ok, _ = float32_epilogue_exact(m_e, k_e, b_e, lo, hi, zp, *acc)
        if bool(ok.all()) or attempt == 7:
            break
        k_e = torch.where(ok, k_e, (k_e - 1).clamp_min(0))
    use = (_narrowing_error(window, g, k_e) <= max_error) & ok & (zp % 2 == 0)
    return torch.where(use, m_e, m), torch.where(use, k_e, k), torch.where(use, b_e, b)


def _narrowing_error(window: torch.Tensor, g: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Output steps by which the multiplier and bias rounded to ``k`` bits may move ``g*acc + offset`` for
    ``|acc| <= window``: ``(window + 1) * 2^-(k+1)``; a zero gain's multiplier 0 is exact (a batch norm whose gamma
    is 0, as ResNets initialise the last one of each block), so only its bias moves it."""
    return (torch.where(g == 0, torch.zeros_like(window), window) + 1) * torch.ldexp(torch.ones_like(g), -(k + 1))


def _reach(acc: tuple[torch.Tensor, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per channel, the largest ``|acc|`` within ``acc = (acc_lo, acc_hi)``, as float64 shaped like ``like``."""
    lo, hi = (torch.as_tensor(t, dtype=torch.float64).reshape(-1) for t in acc)
    return torch.maximum(lo.abs(), hi.abs()).expand_as(like)


def float32_sum_epilogue_exact(m: torch.Tensor, k: torch.Tensor, b: torch.Tensor, mr: torch.Tensor, lo: int, hi: int,
                               zp: int, acc_lo: torch.Tensor, acc_hi: torch.Tensor, r_lo: int, r_hi: int, zp_r: int
                               ) -> tuple[torch.Tensor, str]:
    """:func:`float32_epilogue_exact` for an int8 kernel with a residual *sum* post-op (oneDNN's ``sum``: the
    residual codes ``r`` stored as ``r + zp_r`` in the output buffer, read with one float32 scale ``S``):
    ``rne(relu?(|s|*float(acc') + beta + S*float(r_stored - zp_r)) + zp)`` against
    :func:`requantize_sum` ``(acc, m, k, b, r, m_r)``, for ``acc`` in ``[acc_lo, acc_hi]`` and ``r`` in
    ``[r_lo, r_hi]``. Per channel verdict, and why not if any channel fails.

    The argument is the one of :func:`float32_epilogue_exact` with a third term: ``S = m_r*2^-k`` must be the same
    number on every channel (one scale), so that ``S*r`` is a multiple of ``2^-k`` too; every value is then exact in
    float32 while ``|acc'*|m|| + |b| + |r*m_r| < 2^24`` (whatever order the kernel adds the three terms in, or
    fuses a multiply-add), checked on the accumulators that can round into ``[lo, hi]`` for some ``r`` (the
    window: t rises with ``acc'`` and with ``r``, so it spans from the lowest accumulator that reaches
    ``lo - 1 - |s|`` with the largest ``r`` to the highest that stays below ``hi + 1 + |s|`` with the smallest).
    Outside the window the float32 result is monotone in each argument (float rounding is monotone) and its ends
    are exact, so both sides saturate alike. ``m_r >= 0`` (scales are positive)."""
    m, k, b, mr = (torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in (m, k, b, mr))
    acc_lo, acc_hi = torch.as_tensor(acc_lo).to(torch.int64), torch.as_tensor(acc_hi).to(torch.int64)
    lim = FLOAT32_SIGNIFICAND
    no = torch.zeros_like(m, dtype=torch.bool)
    if int(k.max()) > 40:
        return no, f"shift {int(k.max())}: the multiplier has too many bits"
    if int(mr.min()) < 0:
        return no, "negative residual multiplier"
    p2 = torch.ones_like(k) << k
    s_num, s_den = mr, p2  # S = m_r * 2^-k as a fraction: the same on every channel
    if not bool((s_num * s_den[0] == s_num[0] * s_den).all()):
        return no, "the residual scale m_r*2^-k differs between channels (the sum post-op has one scale)"
    am, safe = m.abs(), m.abs().clamp_min(1)
    rz_lo, rz_hi = r_lo, r_hi  # the residual values (r_stored - zp_r = r)
    # window of acc' over every r: from (lo - 1)*2^k - b - |m| - r_hi*m_r up to (hi + 1)*2^k - b + |m| - r_lo*m_r
    w_lo = -((b + am + rz_hi * mr - (lo - 1) * p2) // safe)
    w_hi = ((hi + 1) * p2 - b + am - rz_lo * mr) // safe
    neg = m < 0
    a_lo, a_hi = torch.where(neg, -acc_hi, acc_lo), torch.where(neg, -acc_lo, acc_hi)
    w_lo, w_hi = torch.maximum(w_lo, a_lo), torch.minimum(w_hi, a_hi)
    empty = w_lo > w_hi
    a_max = torch.where(empty, 0, torch.maximum(w_lo.abs(), w_hi.abs()))
    r_max = max(abs(rz_lo), abs(rz_hi))
    checks = (("the multiplier or the residual multiplier needs more than 24 bits", (am < lim) & (mr < lim)),
              ("|acc*m| + |b| + |r*m_r| may reach 2^24 on the accumulators that round into [lo, hi]",
               a_max * am + b.abs() + r_max * mr < lim),
              ("(code + zero point) * 2^k may reach 2^24", (max(abs(lo + zp), abs(hi + zp)) + 1) * p2 < lim),
              ("odd output zero point (ties would round to its parity)", torch.full_like(neg, zp % 2 == 0)))
    return _verdict(checks, neg)


def float32_sum_epilogue_dyadic(gain: torch.Tensor, offset: torch.Tensor, residual: float, lo: int, hi: int,
                                zp: int, r_max: int, m: torch.Tensor, k: torch.Tensor, b: torch.Tensor,
                                mr: torch.Tensor, max_error: float = EPILOGUE_MAX_ERROR,
                                acc: tuple[torch.Tensor, torch.Tensor] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`float32_epilogue_dyadic` for a fused residual add: ``(m, k, b, m_r)`` narrowed on every channel so that
    :func:`float32_sum_epilogue_exact` holds whatever the accumulators and residual codes ``|r| <= r_max``, with one
    residual scale ``S = M*2^-K`` (``K`` the smallest channel shift, ``m_r = M*2^(k-K)``), where that moves no
    value by more than ``max_error`` output steps; else all four unchanged (a kernel needs every
    channel). The window bound of each channel is ``top = max(|lo|, |hi|) + 2 + |gain| + 2|offset| +
    2*residual*r_max``; the error ``top / |gain| * 2^-(k+1)`` of the multiplier (none for a zero gain) plus
    ``r_max * 2^-(K+1)`` of ``S``.
    ``acc``: the accumulators' reach per channel, as in :func:`float32_epilogue_dyadic`."""
    g, off = torch.as_tensor(gain, dtype=torch.float64), torch.as_tensor(offset, dtype=torch.float64)
    top = (max(abs(lo), abs(hi)) + 2.0) + g.abs() + 2 * off.abs() + 2 * residual * r_max
    window = top / g.abs().clamp_min(1e-300)
    if acc is not None:
        reach = _reach(acc, g)
        window = torch.minimum(window, reach)
        top = torch.minimum(top, reach * g.abs() + 2 * off.abs() + 2 * residual * r_max + 2.0)
    top = torch.maximum(top, torch.full_like(top, max(abs(lo + zp), abs(hi + zp)) + 1.0))
    k_e = torch.floor(torch.log2((FLOAT32_SIGNIFICAND - 1) / top)).to(torch.int64).clamp(0, MAX_SHIFT)
    k_e = torch.minimum(k_e, torch.as_tensor(k, dtype=torch.int64))
    ok = torch.ones_like(k_e, dtype=torch.bool)
    for attempt in range(8 if acc is not None else 1):
        big_k = int(k_e.min())
        big_m = round(residual * 2.0**big_k)
        m_e = torch.round(torch.ldexp(g, k_e)).to(torch.int64)
        b_e = torch.round(torch.ldexp(off, k_e)).to(torch.int64)
        mr_e = torch.full_like(k_e, big_m) << (k_e - big_k)
        if acc is None:
            break
        ok, _ = float32_sum_epilogue_exact(m_e, k_e, b_e, mr_e, lo, hi, zp, *acc, -r_max, r_max, 0)
        if bool(ok.all()) or attempt == 7:
            break
        k_e = torch.where(ok, k_e, (k_e - 1).clamp_min(0))
    err = _narrowing_error(window, g, k_e) + r_max * 2.0 ** -(big_k + 1)
    if not bool(((err <= max_error) & ok).all()) or zp % 2 or big_m == 0:
        return m, k, b, mr
    return m_e, k_e, b_e, mr_e
