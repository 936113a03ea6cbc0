"""QuantConfig: how layers are quantized (the *which bits* lives in :class:`lowbit.quant.Plan`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError
from lowbit.quant.quantizers import SUPPORTED_BITS

METHODS = ("lsq", "faq", "minmax")
SIGNED_INPUTS = ("auto", "signed", "unsigned")
ACTIVATION_INITS = ("mean", "mse", "percentile")
# Fields added after checkpoints existed: left out of to_dict() at their default so old fingerprints still match.
_NEW_DEFAULTS = {"quantize_matmuls": False, "activation_init": "mean", "residual_bits": None}


def _bits_table(name: str, table: Any, lo: float, hi: float) -> dict[int, float] | None:
    """Validate a ``{bits: value}`` mapping; keys may be strings (JSON turns int keys into strings)."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise LowbitError(f"QuantConfig.{name} must be a mapping {{bits: value}}, got {type(table).__name__}")
    out = {}
    for k, v in table.items():
        try:
            bits = int(k)
        except (TypeError, ValueError):
            bits = None
        if bits not in SUPPORTED_BITS:
            raise LowbitError(f"QuantConfig.{name}: key {k!r} is not a supported bit width {SUPPORTED_BITS}")
        number = isinstance(v, numbers.Real) and not isinstance(v, bool)
        if not number or not (lo < v <= hi) or not math.isfinite(v):
            raise LowbitError(f"QuantConfig.{name}[{bits}] = {v!r}: must be a number in ({lo}, {hi}]")
        out[bits] = float(v)
    return out


@dataclass(frozen=True)
class QuantConfig:
    """How quantized layers get their steps. Serialises with :meth:`to_dict` / :meth:`from_dict`.

    Args:
        method: ``"lsq"`` (learned step), ``"faq"`` (fixed, calibrated step) or ``"minmax"`` (baseline).
        per_channel: one weight step per output channel (axis 0) instead of one per tensor.
        faq_weight_std_multiple: ``{bits: k}`` overriding FAQ's weight clip ``k·std(w)`` per precision.
        faq_percentiles: ``{bits: p}`` overriding FAQ's activation percentile of ``|x|`` per precision.
        faq_power_of_two: round FAQ ranges up to powers of two and split them into the 2^b levels, so steps
            are powers of two (the paper's fixed-point quantizer).
        minmax_mse: MinMax picks the step minimising the quantisation MSE instead of ``max|x|/Q_P``.
        signed_inputs: input quantizers' signedness: ``"auto"`` (signed if a calibration input has any
            negative value, e.g. a normalised image or a transformer residual stream), ``"signed"`` or
            ``"unsigned"``. Weights are always signed.
        quantize_matmuls: also quantize the two attention matmuls (Q·Kᵀ and softmax·V) of Hugging Face
            attention blocks, both inputs at the activation bits of the block's query projection
            (:class:`lowbit.quant.modules.QuantMatmul`, patched in by :mod:`lowbit.models.hf`).
        activation_init: how an LSQ *input* step starts: ``"mean"`` (the paper's ``2·mean|x|/sqrt(Q_P)`` on the
            first batch), or, robust to the outliers of transformer activations, ``"mse"`` (the step minimising
            the quantization MSE over all calibration batches) or ``"percentile"`` (FAQ's percentile of ``|x|``
            over ``Q_P``). Matters most after calibration alone (post-training); QAT then learns the step.
        residual_bits: also fake-quantize the residual stream at these bits: the output of every residual add
            (tensor + tensor, after the ReLU/clamp that follows it) and the shortcut operand of an add into a conv
            branch get a :class:`lowbit.quant.modules.QuantAct` (:func:`lowbit.quant.residual.quantize_residuals`),
            so QAT learns them and an integer backend can carry the stream as narrow codes instead of int32. None
            (the default) keeps residual adds float.
            Needs a forward that ``torch.fx`` can trace; ``quantize_`` then returns a new model.
        share_residual_steps: with ``residual_bits``, a conv/linear that reads a residual QuantAct's codes at its
            own input bits takes that QuantAct's quantizer instead of rounding the codes again with a step of its
            own, so the stream feeds the next int8 kernels without a requantization (one step per stream value, as
            in PyTorch's int8 models). A checkpoint whose layer has a step of its own (saved before this option, or
            after :func:`lowbit.quant.reset_layer_`) loads with that layer's own step.
    """

    method: str = "lsq"
    per_channel: bool = False
    faq_weight_std_multiple: dict[int, float] | None = None
    faq_percentiles: dict[int, float] | None = None
    faq_power_of_two: bool = False
    minmax_mse: bool = False
    signed_inputs: str = "auto"
    quantize_matmuls: bool = False
    activation_init: str = "mean"
    residual_bits: int | None = None
    share_residual_steps: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise LowbitError(f"unknown quantization method {self.method!r}: choose one of "
                              f"{', '.join(METHODS)}")
        if self.signed_inputs not in SIGNED_INPUTS:
            raise LowbitError(f"QuantConfig.signed_inputs={self.signed_inputs!r}: choose one of "
                              f"{', '.join(SIGNED_INPUTS)}")
        if self.activation_init not in ACTIVATION_INITS:
            raise LowbitError(f"QuantConfig.activation_init={self.activation_init!r}: choose one of "
                              f"{', '.join(ACTIVATION_INITS)}")
        rb = self.residual_bits
        if rb is not None and (isinstance(rb, bool) or not isinstance(rb, numbers.Integral)
                               or rb not in SUPPORTED_BITS):
            raise LowbitError(f"QuantConfig.residual_bits={rb!r}: choose one of "
                              f"{', '.join(map(str, SUPPORTED_BITS))}, or None to keep residual adds float")
        if rb is not None:
            object.__setattr__(self, "residual_bits", int(rb))
        for name in ("per_channel", "faq_power_of_two", "minmax_mse", "quantize_matmuls", "share_residual_steps"):
            if not isinstance(getattr(self, name), bool):
                raise LowbitError(f"QuantConfig.{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "faq_weight_std_multiple",
                           _bits_table("faq_weight_std_multiple", self.faq_weight_std_multiple, 0, math.inf))
        object.__setattr__(self, "faq_percentiles",
                           _bits_table("faq_percentiles", self.faq_percentiles, 0, 100))

    @property
    def input_signed(self) -> bool | None:
        """``signed_inputs`` as the quantizer's ``signed`` argument (None = decide at calibration)."""
        return {"auto": None, "signed": True, "unsigned": False}[self.signed_inputs]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, default in _NEW_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        if self.residual_bits is None:
            del d["share_residual_steps"]  # means nothing without a quantized stream
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        if not isinstance(d, dict):
            raise LowbitError(f"quantization config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LowbitError(f"unknown quantization config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


__all__ = ["ACTIVATION_INITS", "METHODS", "SIGNED_INPUTS", "QuantConfig"]
