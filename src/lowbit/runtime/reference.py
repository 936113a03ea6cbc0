"""Exact integer kernels of the reference runtime.

These define what an integer ``.lowbit`` model computes; fast backends are checked against them. All
codes have zero point 0 (LSQ quantizers are symmetric, or unsigned starting at 0), so zero padding in code
space is zero padding in real space.

Convolutions and matrix products run in floating point on integer-valued tensors. Every partial sum of
integer products is then an integer of magnitude at most ``K * max|x| * max|w|`` (``K`` = products per
output), and while that bound is below ``2^24`` (float32) or ``2^53`` (float64) every addition and
multiplication is exact, in any summation order, so the result equals int64 arithmetic while running on
BLAS (direct or GEMM convolutions: sums of products, never Winograd/FFT transforms). The bound is checked on
every call and picks float32 where it allows (4-bit codes up to ``K = 139810``, all of a ResNet-50), else
float64 (4-bit codes allow ``K`` up to 2^46; 8-bit codes up to 2^38).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.ir.dyadic import SUM_LIMIT, IntLike, requantize, round_shift, to_dyadic

EXACT_LIMIT = 2**53  # float64 represents every integer of smaller magnitude exactly
FLOAT32_EXACT_LIMIT = 2**24  # float32 likewise
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

Size2 = int | tuple[int, int]


def conv2d_int(x: torch.Tensor, w: torch.Tensor, stride: Size2 = 1, padding: Size2 = 0,
               groups: int = 1, dilation: Size2 = 1) -> torch.Tensor:
    """Integer 2-D convolution: ``x`` (N, C, H, W) codes, ``w`` (O, C/groups, kh, kw) codes -> int64 acc.

    No bias: a layer's bias is folded into its requantization bias.
    """
    k = w.shape[1] * w.shape[2] * w.shape[3]  # products summed per output
    dt = _exact_dtype(x, w, k, "conv2d_int")
    return F.conv2d(x.to(dt), w.to(dt), None, stride, padding, dilation, groups).to(torch.int64)


def linear_int(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Integer matrix product: ``x`` (..., K) codes, ``w`` (O, K) codes -> (..., O) int64 acc."""
    dt = _exact_dtype(x, w, w.shape[-1], "linear_int")
    return (x.to(dt) @ w.to(dt).T).to(torch.int64)


def matmul_int(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Integer batched matrix product of two code tensors: ``a`` (..., M, K) @ ``b`` (..., K, N) -> int64 acc."""
    _require_int(b, "matmul_int")
    dt = _exact_dtype(a, b, a.shape[-1], "matmul_int")
    return torch.matmul(a.to(dt), b.to(dt)).to(torch.int64)


def relu_int(x: torch.Tensor) -> torch.Tensor:
    """ReLU on codes with zero point 0 is ``max(x, 0)``; usually folded into ``lo = 0`` of a requantize."""
    return x.clamp_min(0)


def clamp_int(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Clamp of codes to ``[lo, hi]``: a real clamp to ``[a, b]`` (ReLU6, hardtanh) with ``lo = round(a / s)``,
    ``hi = round(b / s)``, exact since rounding is monotone (usually folded into a requantization instead)."""
    _require_int(x, "clamp_int")
    return x.clamp(lo, hi)


def upsample_nearest_int(x: torch.Tensor, scale: Size2) -> torch.Tensor:
    """Nearest upsampling by integer factors: output pixel ``(i, j)`` is input pixel ``(i // sh, j // sw)``."""
    _require_int(x, "upsample_nearest_int")
    sh, sw = _pair(scale)
    return x.repeat_interleave(sh, dim=-2).repeat_interleave(sw, dim=-1)


def maxpool_int(x: torch.Tensor, kernel_size: Size2, stride: Size2 | None = None, padding: Size2 = 0,
                dilation: Size2 = 1, ceil_mode: bool = False) -> torch.Tensor:
    """Max pooling of codes (exact: it selects values; the scale is positive so order is preserved).

    Padding never wins (it is ``-inf``, as in :func:`torch.nn.functional.max_pool2d`). Keeps ``x``'s dtype.
    """
    _require_int(x, "maxpool_int")
    out = F.max_pool2d(x.to(torch.float64), kernel_size, stride, padding, dilation, ceil_mode)
    return out.to(x.dtype)


def sumpool_int(x: torch.Tensor, kernel_size: Size2, stride: Size2 | None = None,
                padding: Size2 = 0) -> torch.Tensor:
    """Exact window sums of codes (zero padding counts as zeros) -> int64."""
    _require_int(x, "sumpool_int")
    kh, kw = _pair(kernel_size)
    _check_exact(x, torch.ones(1, dtype=torch.int64), kh * kw, "sumpool_int")
    s = F.avg_pool2d(x.to(torch.float64), (kh, kw), stride, padding,
                     count_include_pad=True, divisor_override=1)
    return s.to(torch.int64)


def avgpool_int(x: torch.Tensor, kernel_size: Size2, stride: Size2 | None = None, padding: Size2 = 0, *,
                multiplier: IntLike | None = None, shift: IntLike | None = None, bias: IntLike = 0,
                lo: int = INT32_MIN, hi: int = INT32_MAX) -> torch.Tensor:
    """Average pooling as a window sum followed by one dyadic requantization -> int32.

    Rounding: ``clamp(round_half_even(sum * m * 2^-shift + ...), lo, hi)`` exactly as :func:`requantize`.
    By default ``(m, shift) = to_dyadic(1 / (kh*kw))``, i.e. the output keeps the input scale; an exporter
    folds a change of scale in by passing ``to_dyadic(s_in / (s_out * kh * kw))``. The divisor is always
    the full window (``count_include_pad=True``).

    With the default multiplier and ``|sum| < 2^30`` the result equals the exact round-half-even of
    ``sum / (kh*kw)`` whenever that quotient is not a tie (always for an odd window, and a power-of-two
    window is exact, ties included): the multiplier's relative error ``2^-31`` moves the product by less
    than ``1 / (2*kh*kw)``, the distance from any non-tie quotient to the nearest half-integer.
    """
    kh, kw = _pair(kernel_size)
    if (multiplier is None) != (shift is None):
        raise ValueError("pass both multiplier and shift, or neither")
    if multiplier is None:
        multiplier, shift = to_dyadic(1.0 / (kh * kw))
    return requantize(sumpool_int(x, (kh, kw), stride, padding), multiplier, shift, bias, lo=lo, hi=hi)


def adaptive_avgpool_int(x: torch.Tensor, output_size: Size2, **requant) -> torch.Tensor:
    """Adaptive average pooling for evenly dividing sizes (incl. global pooling, ``output_size=1``).

    PyTorch's uneven adaptive windows have varying divisors, which one multiplier cannot express, so
    they are rejected. ``requant`` keywords are those of :func:`avgpool_int`.
    """
    oh, ow = _pair(output_size)
    h, w = x.shape[-2:]
    if oh <= 0 or ow <= 0 or h % oh or w % ow:
        raise ValueError(f"adaptive_avgpool_int needs output_size dividing the input: {(h, w)} -> {(oh, ow)}")
    k = (h // oh, w // ow)
    return avgpool_int(x, k, k, 0, **requant)


def add_requant(a: torch.Tensor, b: torch.Tensor, m_a: int, m_b: int, shift: int, *, bias: int = 0,
                lo: int, hi: int) -> torch.Tensor:
    """Residual add of two code tensors with different scales, requantized to the output scale -> int32.

    With ``s_a / s_out ~= m_a * 2^-shift`` and ``s_b / s_out ~= m_b * 2^-shift`` on one common shift
    (:func:`lowbit.ir.dyadic.to_dyadic_common`)::

        out = clamp(round_half_even((a*m_a + b*m_b + bias) * 2^-shift), lo, hi)

    Both terms are added in full precision and rounded once (no intermediate rounding per branch), so the
    only error is that of the two multipliers. ``lo = 0`` fuses a following ReLU. Exact in int64; the
    overflow bound ``max|a|*|m_a| + max|b|*|m_b| + |bias| < 2^63 - 2^61`` is checked (the rounding adds up to
    ``2^61`` more).
    """
    _require_int(a, "add_requant")
    _require_int(b, "add_requant")
    m_a, m_b, shift, bias = int(m_a), int(m_b), int(shift), int(bias)
    if not 0 <= shift <= 62:
        raise ValueError(f"shift must be in [0, 62], got {shift}")
    if not INT32_MIN <= lo <= hi <= INT32_MAX:
        raise ValueError(f"need -2^31 <= lo <= hi < 2^31, got lo={lo}, hi={hi}")
    a, b = a.to(torch.int64), b.to(torch.int64)
    bound = _max_abs(a) * abs(m_a) + _max_abs(b) * abs(m_b) + abs(bias)
    if bound >= SUM_LIMIT:
        raise ValueError(f"add_requant would overflow int64 (bound {bound} >= 2^63 - 2^61)")
    return round_shift(a * m_a + b * m_b + bias, shift).clamp_(lo, hi).to(torch.int32)


def _check_exact(x: torch.Tensor, w: torch.Tensor, k: int, what: str) -> int:
    """Raise unless ``k * max|x| * max|w| < 2^53`` (all partial sums exact in float64); returns the bound."""
    _require_int(x, what)
    _require_int(w, what)
    bound = k * _max_abs(x) * _max_abs(w)
    if bound >= EXACT_LIMIT:
        raise ValueError(f"{what}: |partial sums| may reach {bound} >= 2^53, beyond exact float64 integers")
    return bound


def _exact_dtype(x: torch.Tensor, w: torch.Tensor, k: int, what: str) -> torch.dtype:
    """float32 when every partial sum stays below 2^24, else float64 (checked to stay below 2^53)."""
    return torch.float32 if _check_exact(x, w, k, what) < FLOAT32_EXACT_LIMIT else torch.float64


def _max_abs(t: torch.Tensor) -> int:
    if not t.numel():
        return 0
    lo, hi = torch.aminmax(t)
    return max(-int(lo), int(hi))


def _require_int(t: torch.Tensor, what: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what} takes integer code tensors, got {t.dtype}")


def _pair(v: Size2) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
