"""Uniform symmetric fake quantizers: LSQ (learned step), FAQ (calibrated fixed step), MinMax (baseline).

All three share one pure function, :func:`fake_quant`, and differ only in where the step ``s`` comes from:

    v̄ = round(clip(v / s, -Q_N, Q_P))      integer code, what an integer kernel consumes
    v̂ = s · v̄                               fake-quant value, what training sees

Clip comes *before* round, exactly as in LSQ (Esser et al., ICLR 2020), so with a straight-through
round the gradients are the paper's:

    ∂v̂/∂v = 1 inside (-Q_N, Q_P), 0 outside
    ∂v̂/∂s = -v/s + round(v/s) inside,  -Q_N below,  Q_P above

(At exactly v/s = -Q_N or Q_P the inside branch applies: ``torch.clamp`` passes gradient at its bounds.
This is a measure-zero set where the paper's two branches are the two one-sided limits.)

Life cycle: a quantizer is created uninitialised; ``lowbit.quant.calibrate_`` puts it in *observe* mode,
where forward returns its input unchanged and records statistics, then fixes the step. Forward before
that is a programming error and raises ``RuntimeError``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.quant.bits import SUPPORTED_BITS, check_bits
from lowbit.quant.ste import clamp_min_ste, grad_scale, round_ste

ROLES = ("weight", "activation")
STEP_EPS = 1e-8

# FAQ clips weights at k·std(w). The paper's multiple was not found (methods.md §2.1); these defaults
# widen the range with the number of levels so that 8-bit barely clips and 2-bit clips hard. With the step
# 2kσ/2^b they give, for Gaussian weights, steps within 10% of the MSE-optimal uniform step at 2-4 bits.
FAQ_STD_MULTIPLE = {8: 8.0, 4: 3.0, 3: 2.5, 2: 2.0}
# FAQ activation range: 99.99th percentile of |x| for 8-bit, 99.9th for 4-bit and below (methods.md §2.1).
FAQ_PERCENTILE = {8: 99.99, 4: 99.9, 3: 99.9, 2: 99.9}
# MinMax with mse=True searches the step among these fractions of max|x| / Q_P.
MSE_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(2, 21))
# Activation samples kept per calibration batch for the MinMax MSE search (a strided subsample).
MSE_SAMPLES_PER_BATCH = 1 << 16


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """LSQ code range ``(Q_N, Q_P)``: codes lie in ``[-Q_N, Q_P]``.

    Signed: ``(2^(b-1), 2^(b-1) - 1)``, two's complement. Unsigned: ``(0, 2^b - 1)``.
    """
    bits = check_bits(bits)
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quant(x: Tensor, s: Tensor, q_n: int, q_p: int) -> Tensor:
    """``s · round(clip(x / s, -Q_N, Q_P))`` with a straight-through round; ``s`` broadcasts against ``x``."""
    return fake_quant_range(x, s, -q_n, q_p)


def fake_quant_range(x: Tensor, s: Tensor, q_min: int | Tensor, q_max: int | Tensor) -> Tensor:
    """:func:`fake_quant` with the code range given as ``q_min = -Q_N``, ``q_max = Q_P``: ints or 0-d tensors.

    The quantizers pass tensors (their ``q_min``/``q_max`` buffers), so a compiled graph takes the bits as
    inputs rather than constants and serves every precision plan of a network. Same values and gradients
    either way.
    """
    v = x / s
    v = v.clamp(q_min, q_max)
    v = round_ste(v)
    return v * s


@torch.no_grad()
def quant_codes(x: Tensor, s: Tensor, q_n: int, q_p: int) -> Tensor:
    """The integer codes ``round(clip(x / s, -Q_N, Q_P))`` as ``torch.int32``."""
    return (x / s).clamp(-q_n, q_p).round().to(torch.int32)


def _broadcast(s: Tensor, x: Tensor, axis: int) -> Tensor:
    """View a per-channel step ``[C]`` so it broadcasts along ``axis`` of ``x``; a scalar stays as is."""
    if s.dim() == 0:
        return s
    shape = [1] * x.dim()
    shape[axis] = -1
    return s.view(shape)


def _rows(x: Tensor, axis: int) -> Tensor:
    """``x`` as ``[C, M]`` with one row per channel along ``axis``."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _ceil_pow2(x: Tensor) -> Tensor:
    """The smallest power of two ``>= x`` (elementwise, ``x > 0``)."""
    p = torch.exp2(torch.log2(x).ceil())
    return torch.where(p < x, 2 * p, p)  # log2 may round down to an integer just above a power of two


def _percentile(x: Tensor, p: float) -> Tensor:
    """Nearest-rank ``p``-th percentile of ``x`` (``kthvalue``: unlike ``torch.quantile``, no size limit)."""
    flat = x.reshape(-1).float()
    k = math.ceil(round(p * flat.numel() / 100, 6))  # round: 99.9% of 10000 is 9990, not 9990.000000000002
    k = min(max(k, 1), flat.numel())
    return flat.kthvalue(k).values


def _mse_step(rows: Tensor, base: Tensor, q_n: int, q_p: int) -> Tensor:
    """Among ``MSE_FRACTIONS`` of ``base`` (``[C]``), the step with the least ``||x - Q(x)||²`` per row of ``rows``."""
    rows = rows.float()
    steps = torch.tensor(MSE_FRACTIONS, device=base.device)[:, None] * base  # [K, C]
    steps = steps.clamp_min(STEP_EPS)
    err = torch.stack([(fake_quant(rows, s[:, None], q_n, q_p) - rows).square().sum(1) for s in steps])  # [K, C]
    return steps.gather(0, err.argmin(0, keepdim=True))[0]


def _strided_sample(rows: Tensor, old: Tensor | None) -> Tensor:
    """At most ``MSE_SAMPLES_PER_BATCH`` values of each batch, appended to the earlier batches' sample."""
    stride = max(1, rows.numel() // MSE_SAMPLES_PER_BATCH)
    sample = rows[:, ::stride]
    return sample if old is None else torch.cat([old, sample], 1)


class _Quantizer(nn.Module):
    """Shared machinery: code range, observe mode, state, forward. Subclasses only say how to get the step.

    State that must survive ``state_dict`` round trips lives in buffers (``step``, ``initialized``,
    ``is_signed``); Python mirrors of the two flags keep forward free of device syncs and are refreshed
    on load. The code range is both Python ints (``q_n``, ``q_p``: calibration, export) and two 0-d
    non-persistent buffers (``q_min = -Q_N``, ``q_max = Q_P``, in the step's dtype) that forward reads: forward
    touches no Python value derived from ``bits``, so ``torch.compile`` traces one graph for every precision
    plan of a network (and checkpoints keep the keys they always had).
    """

    method: ClassVar[str]
    # For the same data the initial step scales as Q_P ** -exponent (LSQ: 1/sqrt(Q_P); range/Q_P: 1/Q_P).
    _step_exponent: ClassVar[float]

    def __init__(self, bits: int, signed: bool | None, per_channel: bool = False, channel_axis: int = 0,
                 *, role: str = "weight"):
        super().__init__()
        if role not in ROLES:
            raise LowbitError(f"unknown quantizer role {role!r}: choose 'weight' or 'activation'")
        if per_channel and role != "weight":
            raise LowbitError("per-channel steps are supported for weights only")
        self.bits = check_bits(bits)
        self.role = role
        self.per_channel = bool(per_channel)
        self.channel_axis = channel_axis
        self._signed_request = signed  # None: decided from the calibration data (any negative value)
        self.signed = signed
        self._ready = False
        self.observing = False
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("is_signed", torch.tensor(bool(signed)))
        self.register_buffer("q_min", torch.zeros(()), persistent=False)
        self.register_buffer("q_max", torch.zeros(()), persistent=False)
        self._refresh_range()
        self._reset_stats()

    # --- code range and step ---------------------------------------------------------------------
    @property
    def q_n(self) -> int:
        return qrange(self.bits, self._resolved_signed())[0]

    @property
    def q_p(self) -> int:
        return qrange(self.bits, self._resolved_signed())[1]

    @property
    def scale(self) -> Tensor:
        """The effective (strictly positive) step, detached: shape ``[]`` or ``[C]``."""
        return self.step.detach().clamp_min(self._eps())

    def _eps(self) -> float:
        return max(STEP_EPS, torch.finfo(self.step.dtype).tiny)

    def _resolved_signed(self) -> bool:
        if self.signed is None:
            self._not_ready()
        return self.signed

    def _refresh_range(self) -> None:
        """Copy ``(-Q_N, Q_P)`` into the ``q_min``/``q_max`` buffers (zeros while signedness is undecided)."""
        q_n, q_p = (0, 0) if self.signed is None else qrange(self.bits, self.signed)
        self.q_min.fill_(-q_n)
        self.q_max.fill_(q_p)

    def set_step_(self, step: Tensor | float) -> None:
        """Set the step (any shape: ``[]`` or ``[C]``) and mark the quantizer initialised."""
        if self.signed is None:
            raise RuntimeError("signedness undecided (signed=None): calibrate, or pass signed=True/False")
        step = torch.as_tensor(step).to(self.step).clamp_min(self._eps())
        self.step.data = self._finalize_step(step)
        self.initialized.fill_(True)
        self.is_signed.fill_(self._resolved_signed())
        self._refresh_range()
        self._ready = True

    def _finalize_step(self, step: Tensor) -> Tensor:
        return step

    # --- calibration -----------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        self._n_observed = 0
        self._saw_negative = False
        self._stats: dict[str, Tensor] = {}

    def observe(self, x: Tensor) -> None:
        """Record statistics of one calibration tensor (used by ``calibrate_``; no effect on the step yet)."""
        x = x.detach()
        self._saw_negative = self._saw_negative or bool((x < 0).any())
        self._n_observed += 1
        self._observe_values(x)

    def finish_observation_(self) -> None:
        """Fix the step from everything observed since the last reset, then clear the statistics."""
        if self._n_observed == 0:
            raise RuntimeError(f"{type(self).__name__} observed no data; nothing to initialise from")
        if self._signed_request is None:
            self.signed = self._saw_negative
        self.set_step_(self._compute_step())
        self._reset_stats()

    def init_from_(self, x: Tensor) -> None:
        """Initialise the step from one tensor (a weight, or one batch of inputs)."""
        self._reset_stats()
        self.observe(x)
        self.finish_observation_()

    def init_from_step_(self, old_step: Tensor, old_q_p: int) -> None:
        """Initialise from a step learned at another precision, as the init rule would scale it.

        Same data, new Q_P: LSQ's ``2·mean|v|/sqrt(Q_P)`` scales by ``sqrt(old_Q_P / Q_P)``; a fixed range
        divided into ``Q_P`` steps (MinMax, LSQ's percentile and mse inits) by ``old_Q_P / Q_P``, into
        ``Q_P + 1`` (FAQ's 2^b levels) by ``(old_Q_P + 1) / (Q_P + 1)``.
        """
        if self.signed is None:
            raise RuntimeError("init_from_step_ needs a quantizer with known signedness")
        self.set_step_(old_step.detach() * self._step_ratio(old_q_p))

    def _step_ratio(self, old_q_p: int) -> float:
        """New step / old step for the same data when Q_P changes from ``old_q_p`` to this quantizer's."""
        return (old_q_p / self.q_p) ** self._step_exponent

    def _observe_values(self, x: Tensor) -> None:
        raise NotImplementedError

    def _compute_step(self) -> Tensor:
        raise NotImplementedError

    # --- forward ---------------------------------------------------------------------------------
    def _not_ready(self):
        raise RuntimeError(f"{type(self).__name__}(bits={self.bits}, role={self.role}) is not initialised: "
                           "call lowbit.quant.calibrate_(model, batches) first, before making the optimizer")

    def _forward_step(self, x: Tensor) -> Tensor:
        return self.step

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantised ``x``; in observe mode ``x`` unchanged (activations recorded, weights not)."""
        if self.observing:
            if self.role == "activation":
                self.observe(x)
            return x
        if not self._ready:
            self._not_ready()
        s = _broadcast(self._forward_step(x), x, self.channel_axis)
        return fake_quant_range(x, s, self.q_min, self.q_max)

    def codes(self, x: Tensor) -> Tensor:
        """Integer codes ``v̄`` of ``x`` (``torch.int32``), so that ``forward(x) == codes(x) * scale``."""
        if not self._ready:
            self._not_ready()
        return quant_codes(x, _broadcast(self.scale, x, self.channel_axis), self.q_n, self.q_p)

    # --- state -----------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A per-channel step only gets its shape [C] at initialisation; adopt the saved shape first.
        key = prefix + "step"
        if key in state_dict and state_dict[key].shape != self.step.shape:
            self.step.data = self.step.data.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)
        if self._ready:
            self.signed = bool(self.is_signed)
            self._refresh_range()

    def extra_repr(self) -> str:
        signed = "auto" if self.signed is None else self.signed
        extra = f", channel_axis={self.channel_axis}" if self.per_channel else ""
        return f"bits={self.bits}, signed={signed}, role={self.role}, per_channel={self.per_channel}{extra}"


class LsqQuantizer(_Quantizer):
    """LSQ: the step is an ``nn.Parameter`` learned by backprop, with its gradient scaled by ``g``.

    ``g = 1/sqrt(N·Q_P)`` keeps step updates on the scale of weight updates (LSQ §2.2). ``N`` is the
    number of weights per step (the whole tensor, or one output channel when per-channel) for weights,
    and for activations the number of features *per example*, ``x.numel() // x.shape[0]``. The batch
    dimension is deliberately left out: the paper's N_F counts "features in a layer", while code that uses
    ``x.numel()`` makes ``g`` sqrt(batch) times smaller and ties it to the batch size (methods.md pitfall 2).

    Init: ``s0 = 2·mean(|v|)/sqrt(Q_P)`` (per channel when ``per_channel``), weights from the weight
    tensor, activations from the first calibration batch. In forward the step is clamped to at least
    ``1e-8`` with a straight-through clamp, so it never reaches zero or flips sign (pitfall 3) yet keeps
    its gradient and can recover.
    """

    method = "lsq"

    def __init__(self, bits: int, signed: bool | None, per_channel: bool = False, channel_axis: int = 0,
                 *, role: str = "weight", init: str = "mean"):
        super().__init__(bits, signed, per_channel, channel_axis, role=role)
        if init not in ("mean", "mse", "percentile"):
            raise LowbitError(f"unknown LSQ init {init!r}: choose mean, mse or percentile")
        # Outlier-robust inits apply to activations; weights keep the paper's rule (their steps are learned anyway).
        self.init = init if role == "activation" else "mean"
        self.step = nn.Parameter(torch.ones(()))

    def _observe_values(self, x: Tensor) -> None:
        if self.init == "mse":  # every batch: max|x| and a strided sample for the MSE search
            rows = x.reshape(1, -1)
            amax = rows.abs().amax(1)
            self._stats["amax"] = torch.maximum(self._stats["amax"], amax) if "amax" in self._stats else amax
            self._stats["sample"] = _strided_sample(rows, self._stats.get("sample"))
        elif self.init == "percentile":  # every batch, averaged as FAQ does
            self._stats["sum"] = self._stats.get("sum", 0) + _percentile(x.abs(), FAQ_PERCENTILE[self.bits])
        elif "mean_abs" not in self._stats:  # the paper: the first batch only
            abs_x = _rows(x, self.channel_axis).abs() if self.per_channel else x.abs().reshape(1, -1)
            mean_abs = abs_x.mean(1)
            self._stats["mean_abs"] = mean_abs if self.per_channel else mean_abs[0]

    def _compute_step(self) -> Tensor:
        if self.init == "mse":
            base = self._stats["amax"].float() / self.q_p
            return _mse_step(self._stats["sample"], base, self.q_n, self.q_p)[0]
        if self.init == "percentile":
            return self._stats["sum"] / self._n_observed / self.q_p
        return 2 * self._stats["mean_abs"] / math.sqrt(self.q_p)

    def _step_ratio(self, old_q_p: int) -> float:
        # mean: 2·mean|v|/sqrt(Q_P). percentile and mse divide a range into Q_P steps (mse's optimum also narrows
        # the range as bits fall, so its rescale is approximate: calibrate with batches for its exact init).
        return (old_q_p / self.q_p) ** (0.5 if self.init == "mean" else 1.0)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", init={self.init}" if self.init != "mean" else "")

    def _forward_step(self, x: Tensor) -> Tensor:
        if self.role == "activation":
            n = x[0].numel() if x.dim() > 1 else x.numel()
        else:
            n = x.numel() // self.step.numel()
        s = clamp_min_ste(self.step, self._eps())
        # g = 1/sqrt(N·Q_P) from the q_max buffer, in float64 as Python computes it, then rounded to the step's
        # dtype as the multiply by a Python float rounds it: bit-identical to the constant, yet a graph input.
        g = torch.reciprocal(torch.sqrt(self.q_max.double() * n)).to(s.dtype)
        return grad_scale(s, g)


class FaqQuantizer(_Quantizer):
    """FAQ: a fixed step (a buffer, never trained) from calibration; only the round is straight-through.

    Activations: range = ``percentile``-th percentile of ``|x|``, computed per calibration batch of the
    unquantised network and averaged over batches (the paper pushes 5 batches; the average keeps memory
    flat where concatenating would not). Default 99.99 for 8-bit, 99.9 for 4 bits and below.
    Weights: range = ``std_multiple · std(w)`` (per channel when ``per_channel``); the paper's multiple
    was not found, see ``FAQ_STD_MULTIPLE`` for the defaults.

    Step: weights split ``[-range, range]`` into the 2^b levels (methods.md §2.1), ``2·range / 2^b`` =
    ``range / (Q_P + 1)``, so the codes span ``[-range, range - step]``. Activations divide by ``Q_P``, so
    the top code lands on the percentile, as in MinMax. ``power_of_two=True`` is the paper's fixed-point
    quantizer, parameterised by the position of the least significant bit: the *range* is rounded up to
    a power of two 2^m (for activations, "round y_max up to a power of two and derive l from it") and
    split into the 2^b levels, so the step is the power of two ``2^m / (Q_P + 1)`` for both roles.
    """

    method = "faq"

    def __init__(self, bits: int, signed: bool | None, per_channel: bool = False, channel_axis: int = 0,
                 *, role: str = "weight", percentile: float | None = None, std_multiple: float | None = None,
                 power_of_two: bool = False):
        super().__init__(bits, signed, per_channel, channel_axis, role=role)
        self.percentile = FAQ_PERCENTILE[self.bits] if percentile is None else float(percentile)
        self.std_multiple = FAQ_STD_MULTIPLE[self.bits] if std_multiple is None else float(std_multiple)
        if not 0 < self.percentile <= 100:
            raise LowbitError(f"FAQ percentile must be in (0, 100], got {self.percentile}")
        if not self.std_multiple > 0:
            raise LowbitError(f"FAQ std multiple must be positive, got {self.std_multiple}")
        self.power_of_two = bool(power_of_two)
        self.register_buffer("step", torch.ones(()))

    def _observe_values(self, x: Tensor) -> None:
        if self.role == "weight":
            w = _rows(x, self.channel_axis) if self.per_channel else x.reshape(1, -1)
            rng = self.std_multiple * w.float().std(1, correction=0)
            self._stats["range"] = rng if self.per_channel else rng[0]
        else:
            self._stats["sum"] = self._stats.get("sum", 0) + _percentile(x.abs(), self.percentile)

    def _compute_step(self) -> Tensor:
        rng = self._stats["range"] if self.role == "weight" else self._stats["sum"] / self._n_observed
        if self.power_of_two:
            rng = _ceil_pow2(rng)
        return rng / self._steps_in_range(self.q_p)

    def _steps_in_range(self, q_p: int) -> int:
        """How many steps make the range: the 2^b levels (``Q_P + 1``), or ``Q_P`` for plain activations."""
        return q_p + 1 if self.role == "weight" or self.power_of_two else q_p

    def _step_ratio(self, old_q_p: int) -> float:
        # Same range, new precision: the step scales with the number of steps in the range (for
        # power_of_two a ratio of powers of two, so the step stays one).
        return self._steps_in_range(old_q_p) / self._steps_in_range(self.q_p)

    def _finalize_step(self, step: Tensor) -> Tensor:
        # A step set directly (set_step_) must still be a fixed-point LSB. Rounding it up is rounding the
        # range up: the range is step · (Q_P + 1), and Q_P + 1 is a power of two.
        return _ceil_pow2(step) if self.power_of_two else step

    def extra_repr(self) -> str:
        stat = f"std_multiple={self.std_multiple}" if self.role == "weight" else f"pct={self.percentile}"
        return f"{super().extra_repr()}, {stat}, power_of_two={self.power_of_two}"


class MinMaxQuantizer(_Quantizer):
    """Post-training baseline: fixed step ``max|x| / Q_P`` over all calibration data.

    ``mse=True`` instead picks, among ``MSE_FRACTIONS`` of that step, the one minimising ``||x - Q(x)||²``:
    on the whole weight (per channel when ``per_channel``), or for activations on a strided subsample of
    every batch (at most ``MSE_SAMPLES_PER_BATCH`` values each) so memory stays bounded.
    """

    method = "minmax"
    _step_exponent = 1.0

    def __init__(self, bits: int, signed: bool | None, per_channel: bool = False, channel_axis: int = 0,
                 *, role: str = "weight", mse: bool = False):
        super().__init__(bits, signed, per_channel, channel_axis, role=role)
        self.mse = bool(mse)
        self.register_buffer("step", torch.ones(()))

    def _observe_values(self, x: Tensor) -> None:
        rows = _rows(x, self.channel_axis) if self.per_channel else x.reshape(1, -1)
        amax = rows.abs().amax(1)
        self._stats["amax"] = torch.maximum(self._stats["amax"], amax) if "amax" in self._stats else amax
        if self.mse:
            if self.role == "weight":
                self._stats["sample"] = rows
            else:
                self._stats["sample"] = _strided_sample(rows, self._stats.get("sample"))

    def _compute_step(self) -> Tensor:
        base = self._stats["amax"].float() / self.q_p  # [C] (or [1] per tensor)
        if self.mse:
            base = _mse_step(self._stats["sample"], base, self.q_n, self.q_p)
        return base if self.per_channel else base[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mse={self.mse}"


__all__ = [
    "FAQ_PERCENTILE", "FAQ_STD_MULTIPLE", "ROLES", "SUPPORTED_BITS", "FaqQuantizer", "LsqQuantizer",
    "MinMaxQuantizer", "check_bits", "fake_quant", "fake_quant_range", "qrange", "quant_codes",
]
