"""GPU path: a ``.lowbit`` model with each conv/linear as one exact tensor-core GEMM.

Same graph, same integers as :class:`~lowbit.runtime.engine.IntegerModel` (the definition); only the
accumulator of each conv/linear is computed differently. A convolution becomes a GEMM through im2col
(``(N*Ho*Wo, K) @ (K, O)``, grouped convolutions one GEMM per group), and the GEMM runs on one of three paths:

* **fp8** (``torch._scaled_mm``, e4m3 x e4m3 -> float32, scales 1, ``use_fast_accum=False``): when every
  input and weight code is an integer of magnitude <= 16 (exactly representable in e4m3, which has 3 mantissa
  bits: 16 = 2^4 is, 17 is not), i.e. codes of 4 bits or fewer, and ``K * max|x| * max|w| < 2^24``, so every
  partial sum is an integer that float32 holds exactly, in any summation order. Measured bit-exact on an H100
  for K = 64 ... 16384 including all-saturated operands, and wrong with fast accumulation (research notes
  performance.md, section 8), hence also ``K <= 16384`` here (:data:`FP8_MEASURED_K`).
* **int8** (``torch._int_mm``, int8 x int8 -> int32): 8-bit codes (and anything fp8 refuses that int8 holds).
  Unsigned 8-bit activations 0..255 do not fit int8, so they enter as ``x - 128`` and the accumulator gets
  ``128 * sum_k w`` back per output channel (exact: ``sum (x-128) w + 128 sum w = sum x w``, im2col zero
  padding included); needs ``K * max|x - offset| * max|w| < 2^31``.
* **reference**: everything else: the reference kernels on the CPU; on CUDA the same im2col GEMM in float64
  (exact below 2^53, checked like the reference does; cuDNN float32 convolutions may use TF32 or Winograd).

Operands follow the kernels' layout rules: the first operand row-major, the second column-major (the
transposed view of a contiguous ``(N, K)`` weight), ``K`` and ``N`` zero-padded to multiples of 16 (fp8) or 8
(int8), and ``M > 16`` for int8 (zero rows added). Zero padding adds zero products, so it keeps every result
exact. Requantization is the reference's dyadic integer arithmetic (:func:`~lowbit.ir.dyadic.round_shift`
in int64, on the device) with its overflow bounds checked once per layer from the declared code ranges, so
no per-call host synchronisation is needed.

``emulate=True`` runs the same code on the CPU: fp8 operands are really cast to ``torch.float8_e4m3fn`` (and
checked to round-trip, which proves representability) and multiplied in float32, int8 operands multiplied in
int64 and checked to fit int32. Under the bounds above every partial sum is exact whatever the order of
summation, so the emulation computes exactly what the tensor cores compute: a CPU test of the GPU arithmetic.

    gpu = GpuModel(IntegerModel.load("m.lowbit"))          # CUDA
    logits = gpu(images_uint8.cuda())
    GpuModel(model, emulate=True).run_int(x)               # CPU emulation, equal to model.run_int(x)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.ir.dyadic import BIAS_LIMIT, PRODUCT_LIMIT, requantize, requantize_sum, round_shift
from lowbit.ir.graph import Node
from lowbit.ir.kernels import kernel, kernel_or_fallback
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.reference import FLOAT32_EXACT_LIMIT, _check_exact, conv2d_int, linear_int

FP8 = torch.float8_e4m3fn
FP8_MAX_INT = 16  # every integer of magnitude <= 16 is exact in e4m3; 17 is not
FP8_MEASURED_K = 16384  # largest K measured bit-exact on H100 with use_fast_accum=False (performance.md §8)
FP8_ALIGN, INT8_ALIGN = 16, 8  # _scaled_mm: K, N multiples of 16; _int_mm: K, N multiples of 8
INT8_MIN_M = 17  # _int_mm on CUDA needs more than 16 rows
INT32_LIMIT = 2**31
PATHS = ("fp8", "int8", "reference")


# ----------------------------------------------------------------------------------------- exactness rules
def fp8_bounds_ok(k: int, max_a: int, max_b: int) -> bool:
    """Whether a K-term integer dot product stays exact in float32 accumulation: ``k*max_a*max_b < 2^24``.

    Every partial sum is then an integer below 2^24, which float32 represents exactly, so the result does not
    depend on the summation order (tensor-core tiling, split-K). Measured on an H100 with
    ``use_fast_accum=False``: exact for K up to 16384 (performance.md §8); fast accumulation is not.
    """
    return k * max_a * max_b < FLOAT32_EXACT_LIMIT


def fp8_representable(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` survives a round trip through float8 e4m3 unchanged."""
    if not t.numel():
        return True
    wide = t.to(torch.float64)
    return bool(torch.equal(wide.to(FP8).to(torch.float64), wide))


def fp8_exact(a_codes: torch.Tensor, b_codes: torch.Tensor) -> bool:
    """Whether ``a_codes @ b_codes.T`` ((M, K) and (N, K) integer codes) is exact on fp8 tensor cores:
    every code representable in e4m3, :func:`fp8_bounds_ok` for ``K = a_codes.shape[-1]``, and ``K`` within
    what was measured exact (``FP8_MEASURED_K``), the same rule :func:`plan_layer` applies."""
    for t in (a_codes, b_codes):
        if t.dtype.is_floating_point and not torch.equal(t, t.round()):
            return False
    return (a_codes.shape[-1] <= FP8_MEASURED_K and fp8_representable(a_codes) and fp8_representable(b_codes)
            and fp8_bounds_ok(a_codes.shape[-1], _max_abs(a_codes), _max_abs(b_codes)))


def int8_offset(lo: int, hi: int) -> int | None:
    """The offset that brings codes in ``[lo, hi]`` (and the im2col padding 0) into int8, or None.

    0 for signed codes within [-128, 127]; 128 for unsigned 8-bit codes (0..255 -> -128..127).
    """
    if -128 <= lo and hi <= 127:
        return 0
    if 0 <= lo and hi <= 255:
        return 128
    return None


@dataclass(frozen=True)
class LayerPath:
    """Which GEMM a conv/linear runs on and why; ``bound`` is ``K * max|x| * max|w|`` from declared ranges."""

    path: str  # "fp8", "int8" or "reference"
    why: str
    k: int
    bound: int
    offset: int = 0  # int8 path: subtracted from the input codes, added back as offset * sum(w)

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


def plan_layer(k: int, x_range: tuple[int, int], w_bits: int, *, fp8: bool = True,
               multiplier_max: int = 0) -> LayerPath:
    """The path of one conv/linear with ``k`` products per output, input codes in ``x_range`` and signed
    ``w_bits``-bit weights. ``fp8=False``: no fp8 tensor cores (before sm_89). ``multiplier_max``: the largest
    requantization ``|m|``, for the int64 overflow bound of the epilogue."""
    lo_x, hi_x = x_range
    bound = k * max(abs(lo_x), abs(hi_x)) * (1 << (w_bits - 1))
    ranges = f"x in [{lo_x}, {hi_x}], {w_bits}-bit w"
    path = _gemm_path(k, lo_x, hi_x, w_bits, fp8, ranges, bound)
    if path.path != "reference" and bound * multiplier_max >= PRODUCT_LIMIT:  # the epilogue is unchecked
        return LayerPath("reference", f"{ranges}: |acc| * |m| may reach 2^62 (checked requantize)", k, bound)
    return path


def _gemm_path(k: int, lo_x: int, hi_x: int, w_bits: int, fp8: bool, ranges: str, bound: int) -> LayerPath:
    max_x, max_w = max(abs(lo_x), abs(hi_x)), 1 << (w_bits - 1)
    refused = ""
    if max_x <= FP8_MAX_INT and max_w <= FP8_MAX_INT:
        if not fp8:
            refused = "no fp8 tensor cores on this device; "
        elif not fp8_bounds_ok(k, max_x, max_w):
            refused = f"fp8 refused: K*max|x|*max|w| = {bound} >= 2^24; "
        elif k > FP8_MEASURED_K:
            refused = f"fp8 refused: K = {k} > {FP8_MEASURED_K}, beyond the K measured exact; "
        else:
            return LayerPath("fp8", f"{ranges} exact in e4m3, K*max|x|*max|w| = {bound} < 2^24", k, bound)
    offset = int8_offset(lo_x, hi_x)
    if offset is None or w_bits > 8:
        return LayerPath("reference", f"{refused}{ranges} do not fit int8 (even offset by 128)", k, bound)
    max_a8 = max(abs(lo_x - offset), abs(hi_x - offset), offset)  # offset: a zero-padding code becomes -offset
    if k * max_a8 * max_w >= INT32_LIMIT:
        return LayerPath("reference", f"{refused}K*max|x-{offset}|*max|w| = {k * max_a8 * max_w} >= 2^31 "
                                      "would overflow int32", k, bound)
    how = f"x - {offset} in int8, + {offset}*sum(w)" if offset else "int8 codes"
    return LayerPath("int8", f"{refused}{ranges}: {how}, |int32 sums| <= {k * max_a8 * max_w}", k, bound, offset)


# ------------------------------------------------------------------------------------------------ GEMMs
def fp8_mm(a: torch.Tensor, b: torch.Tensor, *, emulate: bool = False, one: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``a @ b`` for e4m3 ``a`` (M, K) row-major and ``b`` (K, N) column-major, K and N multiples of 16 ->
    float32 (M, N); exact integers when :func:`fp8_bounds_ok`. ``emulate``: float32 matmul on the CPU."""
    _check_operands(a, b, FP8, FP8_ALIGN, 1)
    if emulate:
        return a.to(torch.float32) @ b.to(torch.float32)
    if one is None:
        one = torch.ones((), dtype=torch.float32, device=a.device)
    return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=False)


def int8_mm(a: torch.Tensor, b: torch.Tensor, *, emulate: bool = False) -> torch.Tensor:
    """``a @ b`` for int8 ``a`` (M > 16, K) row-major and ``b`` (K, N) column-major, K and N multiples of 8
    -> int32 (M, N), as ``torch._int_mm``. ``emulate``: int64 matmul, checked to fit int32 (no wrap-around)."""
    _check_operands(a, b, torch.int8, INT8_ALIGN, INT8_MIN_M)
    if emulate:
        out = a.to(torch.int64) @ b.to(torch.int64)
        if out.numel() and _max_abs(out) >= INT32_LIMIT:
            raise ValueError("int8_mm: a sum leaves int32, which _int_mm would wrap")
        return out.to(torch.int32)
    return torch._int_mm(a, b)


def fp8_codes_mm(x: torch.Tensor, w: torch.Tensor, *, emulate: bool = False) -> torch.Tensor:
    """Exact ``x @ w.T`` for integer codes ``x`` (M, K) and ``w`` (N, K) on the fp8 path (padded) -> int64.

    Raises:
        ValueError: the product is not exact on fp8 (:func:`fp8_exact`).
    """
    if not fp8_exact(x, w):
        raise ValueError("fp8_codes_mm: codes beyond e4m3 or K*max|x|*max|w| >= 2^24")
    m, n = x.shape[0], w.shape[0]
    a = _padded(x, m, _round_up(x.shape[1], FP8_ALIGN), FP8)
    b = _padded(w, _round_up(n, FP8_ALIGN), a.shape[1], FP8)
    return fp8_mm(a, b.t(), emulate=emulate)[:, :n].to(torch.int64)


def int8_codes_mm(x: torch.Tensor, w: torch.Tensor, *, offset: int = 0, emulate: bool = False) -> torch.Tensor:
    """Exact ``x @ w.T`` on the int8 path -> int64: ``x - offset`` and ``w`` must fit int8 (``offset=128``
    for unsigned 8-bit codes), and their int32 sums must not overflow (checked in emulation only)."""
    m, n, k = x.shape[0], w.shape[0], x.shape[1]
    a = _padded(x.to(torch.int64) - offset, max(m, INT8_MIN_M), _round_up(k, INT8_ALIGN), torch.int8)
    b = _padded(w, _round_up(n, INT8_ALIGN), a.shape[1], torch.int8)
    acc = int8_mm(a, b.t(), emulate=emulate)[:m, :n].to(torch.int64)
    return acc + offset * w.to(torch.int64).sum(1) if offset else acc


def _check_operands(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, align: int, min_m: int) -> None:
    """The layout rules of the CUDA kernels, enforced in emulation too so CPU tests cover them."""
    (m, k), (k2, n) = a.shape, b.shape
    if a.dtype != dtype or b.dtype != dtype:
        raise ValueError(f"operands must be {dtype}, got {a.dtype} and {b.dtype}")
    if k != k2 or k % align or n % align or m < min_m:
        raise ValueError(f"GEMM ({m}x{k}) @ ({k2}x{n}) needs K, N multiples of {align} and M >= {min_m}")
    if not a.is_contiguous() or b.stride(0) != 1 or (n > 1 and b.stride(1) < k):
        raise ValueError("the first operand must be row-major and the second column-major")


def _padded(t: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros((rows, cols), dtype=dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]].copy_(t)
    return out


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _max_abs(t: torch.Tensor) -> int:
    if not t.numel():
        return 0
    lo, hi = torch.aminmax(t.to(torch.float64) if t.dtype == FP8 else t)
    return int(max(-lo.item(), hi.item()))


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------------------------- layers
def _im2col(x: torch.Tensor, kernel: tuple[int, int], stride: Any, padding: Any, dilation: Any, fill: float,
            out: torch.Tensor) -> tuple[int, int]:
    """Write the im2col matrix of ``x`` (N, C, H, W) into ``out[:, :K]`` (rows n*Ho*Wo, columns in (kh, kw, C)
    order, the weight's ``permute(0, 2, 3, 1)``), converting to ``out``'s dtype in the same copy; ``fill`` is
    the padding value. Returns (Ho, Wo)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, _pair(stride), _pair(padding), _pair(dilation)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=fill)
    n, c, h, w = x.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    patches = x.as_strided((n, ho, wo, kh, kw, c), (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, s_c),
                           x.storage_offset())
    out[: n * ho * wo, : kh * kw * c].view(n, ho, wo, kh, kw, c).copy_(patches)
    return ho, wo


class _Layer:
    """One conv/linear on its path: prepared (padded, cast, on the device) weights and requantization."""

    def __init__(self, node: Node, p: dict[str, torch.Tensor], x_range: tuple[int, int],
                 device: torch.device, fp8: bool, emulate: bool, epilogue: Any, r_range: tuple[int, int] = (0, 0)):
        a = node.attrs
        self.node, self.a, self.op, self.emulate, self.x_range = node, a, node.op, emulate, x_range
        w = p["weight"].to(torch.int64)
        self.conv = self.op != "linear"
        self.groups = a.get("groups", 1) if self.conv else 1
        self.kernel = tuple(w.shape[2:]) if self.conv else (1, 1)
        self.out_channels = w.shape[0]
        k = w[0].numel()
        mult_max = int(p["multiplier"].to(torch.int64).abs().max())
        self.info = plan_layer(k, x_range, a["w_bits"], fp8=fp8, multiplier_max=mult_max)
        if self.groups > 1 and self.info.path != "reference":
            self.info = LayerPath(self.info.path, f"{self.info.why} ({self.groups} groups, one GEMM each)",
                                  self.info.k, self.info.bound, self.info.offset)
        self.m, self.k, self.b = (p[r].to(device=device, dtype=torch.int64) for r in ("multiplier", "shift", "bias"))
        # conv2d_add: the residual's multiplier, added before the one rounding (as int64 terms: |r*m_r| < 2^62)
        self.mr = p["residual_multiplier"].to(device=device, dtype=torch.int64) if "residual_multiplier" in p else None
        if int(self.b.abs().max()) > BIAS_LIMIT:
            raise LowbitError(f"layer {node.name!r}: |bias| > 2^61")
        if self.mr is not None and self.info.path != "reference":  # the unchecked epilogue's int64 bound
            r_term = max(abs(r_range[0]), abs(r_range[1])) * int(self.mr.abs().max())
            if self.info.bound * mult_max + int(self.b.abs().max()) + r_term >= 2**63 - 2**61:
                self.info = LayerPath("reference", f"{self.info.why}; with the residual |acc*m + b + r*m_r| may "
                                                   "overflow int64 (checked requantize)", k, self.info.bound)
        self.lo, self.hi = a["lo"], a["hi"]
        self.lo_hi = torch.tensor([self.lo, self.hi], dtype=torch.int64, device=device)  # tensors: no recompiles
        self.epilogue = epilogue
        path = self.info.path
        self.w_ref = p["weight"].to(device)
        if path == "reference":
            return
        # (O, C/g, kh, kw) -> per group (O/g, K) with K in (kh, kw, C) order, zero-padded
        align, dtype = (FP8_ALIGN, FP8) if path == "fp8" else (INT8_ALIGN, torch.int8)
        mat = w.permute(0, 2, 3, 1).reshape(w.shape[0], k) if self.conv else w
        og = w.shape[0] // self.groups
        self.k_pad, self.n_pad = _round_up(k, align), _round_up(og, align)
        self.w_t = []  # per group: (K_pad, N_pad) column-major views of contiguous (N_pad, K_pad)
        for g in range(self.groups):
            wg = _padded(mat[g * og:(g + 1) * og], self.n_pad, self.k_pad, dtype)
            self.w_t.append(wg.to(device).t())
        self.gemm_dtype = dtype
        self.corr = (self.info.offset * mat.sum(1)).to(device) if self.info.offset else None
        # activations are converted on the way into the GEMM buffer: bf16 holds every code <= 256 exactly
        self.carrier = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.one = torch.ones((), dtype=torch.float32, device=device)

    def __call__(self, x: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        if self.info.path == "reference":
            return self._reference(x, r)
        offset = self.info.offset
        if self.info.path == "int8":
            xc = x.to(torch.int32) - offset if offset else x.to(torch.int32)  # int8 range by plan_layer
        else:
            xc = x.to(self.carrier)
        n = x.shape[0]
        og = self.out_channels // self.groups
        cg = x.shape[1] // self.groups if self.conv else x.shape[1]
        outs, hw = [], None
        for g in range(self.groups):
            xg = xc[:, g * cg:(g + 1) * cg] if self.groups > 1 else xc
            if self.conv:
                ho, wo = _out_hw(x.shape[-2:], self.kernel, self.a)
                rows = n * ho * wo
            else:
                rows = n
            m_pad = max(rows, INT8_MIN_M) if self.info.path == "int8" else rows
            buf = torch.empty((m_pad, self.k_pad), dtype=self.gemm_dtype, device=x.device)
            raw = buf.view(torch.uint8) if buf.dtype == FP8 else buf  # e4m3 zero is the zero byte
            raw[:, self.info.k:].zero_()
            raw[rows:].zero_()
            if self.conv:
                hw = _im2col(xg, self.kernel, self.a["stride"], self.a["padding"], self.a["dilation"], -offset, buf)
            else:
                buf[:rows, : self.info.k].copy_(xg)
            if self.emulate and self.info.path == "fp8":
                self._check_fp8_codes(xg)
            if self.info.path == "fp8":
                acc = fp8_mm(buf, self.w_t[g], emulate=self.emulate, one=self.one)
            else:
                acc = int8_mm(buf, self.w_t[g], emulate=self.emulate)
            outs.append(acc[:rows, :og])
        acc = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        extra = None
        if r is not None:  # the residual in the GEMM's (N*Ho*Wo, O) layout, times its multiplier
            extra = r.permute(0, 2, 3, 1).reshape(acc.shape).to(torch.int64) * self.mr
        y = self.epilogue(acc, self.corr, self.m, self.b, self.k, self.lo_hi[0], self.lo_hi[1], extra)
        if self.conv:
            return y.view(n, *hw, self.out_channels).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
        return y

    def _check_fp8_codes(self, x: torch.Tensor) -> None:
        """Emulation only: the codes cast into the e4m3 buffer are exact there and within the declared range
        the bound was computed from."""
        lo, hi = self.x_range
        if x.numel() and (not fp8_representable(x) or int(x.min()) < lo or int(x.max()) > hi):
            raise LowbitError(f"layer {self.node.name!r}: input codes leave the declared range [{lo}, {hi}] "
                              "or are not exact in e4m3")

    def _reference(self, x: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """The reference kernels (CPU), or on CUDA the im2col GEMM in float64, exact below 2^53 (checked)."""
        a, name = self.a, self.node.name
        if x.device.type == "cpu":
            if self.conv:
                acc = conv2d_int(x, self.w_ref, a["stride"], a["padding"], a["groups"], a["dilation"])
            else:
                acc = linear_int(x, self.w_ref)
        else:
            w = self.w_ref.to(torch.int64)
            _check_exact(x, w, w[0].numel(), name)
            acc = self._float64_gemm(x, w)
        if r is not None:
            return requantize_sum(acc, self.m, self.k, self.b, r, self.mr, lo=self.lo, hi=self.hi, axis=1)
        return requantize(acc, self.m, self.k, self.b, lo=self.lo, hi=self.hi, axis=1 if self.conv else -1)

    def _float64_gemm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.op == "linear":
            return (x.to(torch.float64) @ w.to(torch.float64).T).to(torch.int64)
        n, og, cg = x.shape[0], w.shape[0] // self.groups, w.shape[1]
        ho, wo = _out_hw(x.shape[-2:], self.kernel, self.a)
        outs = []
        for g in range(self.groups):
            buf = torch.empty((n * ho * wo, self.info.k), dtype=torch.float64, device=x.device)
            _im2col(x[:, g * cg:(g + 1) * cg].to(torch.float64), self.kernel, self.a["stride"], self.a["padding"],
                    self.a["dilation"], 0.0, buf)
            wg = w[g * og:(g + 1) * og].permute(0, 2, 3, 1).reshape(og, -1).to(torch.float64)
            outs.append(buf @ wg.T)
        acc = torch.cat(outs, 1).to(torch.int64)
        return acc.view(n, ho, wo, -1).permute(0, 3, 1, 2)


def _epilogue(acc: torch.Tensor, corr: torch.Tensor | None, m: torch.Tensor, b: torch.Tensor, k: torch.Tensor,
              lo: torch.Tensor, hi: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulator (float32 integers or int32) -> int64, + int8 offset correction, dyadic requantization:
    :func:`~lowbit.ir.dyadic.requantize` without its per-call checks (bounded once per layer); ``extra`` (a fused
    residual's ``r*m_r``) is added before the rounding, as :func:`~lowbit.ir.dyadic.requantize_sum`."""
    acc = acc.to(torch.int64)
    if corr is not None:
        acc = acc + corr
    x = acc * m + b
    if extra is not None:
        x = x + extra
    return round_shift(x, k).clamp(lo, hi).to(torch.int32)


@functools.cache
def _compiled_epilogue():
    """One compiled epilogue for every layer and model (dynamic shapes; lo/hi are tensors: no recompiles)."""
    return torch.compile(_epilogue, dynamic=True)


def _out_hw(hw: torch.Size, kernel: tuple[int, int], a: dict[str, Any]) -> tuple[int, int]:
    (h, w), (kh, kw) = hw, kernel
    (sh, sw), (ph, pw), (dh, dw) = _pair(a["stride"]), _pair(a["padding"]), _pair(a["dilation"])
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


# ------------------------------------------------------------------------------------------------ model
class GpuModel:
    """``GpuModel(IntegerModel)``: the reference runtime's graph with conv/linear layers on tensor cores.

    Bit-exact with ``model.run_int`` by construction (see the module docstring); :meth:`layer_paths` tells
    which GEMM each layer takes and why. Inputs may live anywhere; they are moved to ``device``.

    Args:
        model: the loaded ``.lowbit`` model (validated by its loader).
        device: a CUDA device; fp8 needs compute capability 8.9+ (Ada, Hopper), else int8 takes those layers.
        emulate: run on the CPU, emulating the fp8/int8 GEMMs exactly (tests, machines without a GPU).
        compile: fuse each layer's requantization (several int64 passes in eager) into one Inductor kernel.
    """

    def __init__(self, model: IntegerModel, device: str | torch.device = "cuda", emulate: bool = False,
                 compile: bool = False):
        self.model = model
        self.emulate = emulate
        self.device = torch.device("cpu") if emulate else torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise LowbitError("CUDA is not available: GpuModel(model, emulate=True) checks the same arithmetic "
                              "on the CPU")
        fp8 = emulate or self.device.type != "cuda" or torch.cuda.get_device_capability(self.device) >= (8, 9)
        ranges = model.value_ranges()
        epilogue = _compiled_epilogue() if compile else _epilogue
        self.layers: dict[str, _Layer] = {}
        for node in model.nodes:
            if node.op in ("conv2d", "conv2d_add", "linear"):
                r_range = ranges[node.inputs[1]] if node.op == "conv2d_add" else (0, 0)
                self.layers[node.name] = _Layer(node, model.params[node.name], ranges[node.inputs[0]],
                                                self.device, fp8, emulate, epilogue, r_range)
        p = model.params[model.nodes[0].name]
        self._lut = p["lut"].to(self.device, torch.int64).reshape(-1) if "lut" in p else None
        self._steps = [kernel_or_fallback("gpu", node.op) for node in model.nodes]

    def layer_paths(self) -> dict[str, LayerPath]:
        """Per conv/linear node: the path (``fp8``, ``int8``, ``reference``), why, K and the sum bound."""
        return {name: layer.info for name, layer in self.layers.items()}

    # ------------------------------------------------------------------------------------------ running
    @property
    def output_scale(self) -> float:
        return self.model.output_scale

    def run_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer logits (int32, on the device)."""
        return self.run_trace(x)["logits"]

    def run_trace(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every integer value of the graph, by value name, as :meth:`IntegerModel.run_trace` (on the device)."""
        self.model._check_input(x)
        env = {self.model.graph.inputs[0]: x.to(self.device)}
        with torch.inference_mode():
            for node, (step, own) in zip(self.model.nodes, self._steps):
                xs = [env[i] for i in node.inputs]
                # an op without a gpu kernel: the reference kernel itself, on the device
                env[node.output] = step(self, node, xs) if own else step(node, self.model.params[node.name], xs)
        return env

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits: the integer logits times the output scale (as the reference runtime)."""
        return (self.run_int(x).to(torch.float64) * self.output_scale).to(torch.float32)

    def _quantize_input(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        """The reference's input quantizer with its lookup table on the device."""
        if self._lut is not None:
            c = torch.arange(x.shape[1], device=x.device).reshape(1, -1, *([1] * (x.dim() - 2))) * 256
            return self._lut[c + x.to(torch.int64)].to(torch.int32)
        a = node.attrs
        scale = torch.tensor(a["scale"], dtype=torch.float32, device=x.device)
        return (x.to(torch.float32) / scale).clamp(a["lo"], a["hi"]).round().to(torch.int32)


# ------------------------------------------------------------------------------------------------ kernels
# A gpu kernel runs a node: ``kernel(gpu_model, node, inputs) -> output``; other ops run the reference kernel.
@kernel("quantize_input", backend="gpu")
def _gpu_input(gm: GpuModel, node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    return gm._quantize_input(node, xs[0])


@kernel("conv2d", backend="gpu")
@kernel("linear", backend="gpu")
def _gpu_layer(gm: GpuModel, node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    return gm.layers[node.name](xs[0])


@kernel("conv2d_add", backend="gpu")
def _gpu_conv_add(gm: GpuModel, node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    return gm.layers[node.name](xs[0], xs[1])


@kernel("dequantize_output", backend="gpu")
def _gpu_output(gm: GpuModel, node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0]
