"""Quantization core: fake quantizers (LSQ, FAQ, MinMax), quantized layers, precision plans, workflow.

Typical use::

    from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
    quantize_(model, Plan.preset("w4a4", model), QuantConfig(method="lsq"))
    calibrate_(model, batches)          # before building the optimizer
"""

from lowbit.quant.api import build_quantized, calibrate_, plan_of, quant_layers, quantize_, reset_layer_
from lowbit.quant.config import QuantConfig
from lowbit.quant.modules import QuantConv2d, QuantLinear, make_quantizer
from lowbit.quant.plan import Plan, is_quantizable, parse_bits, quantizable_layers
from lowbit.quant.quantizers import (
    SUPPORTED_BITS,
    FaqQuantizer,
    LsqQuantizer,
    MinMaxQuantizer,
    fake_quant,
    qrange,
    quant_codes,
)
from lowbit.quant.ste import grad_scale, round_ste

__all__ = [
    "SUPPORTED_BITS",
    "FaqQuantizer",
    "LsqQuantizer",
    "MinMaxQuantizer",
    "Plan",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "build_quantized",
    "calibrate_",
    "fake_quant",
    "grad_scale",
    "is_quantizable",
    "make_quantizer",
    "parse_bits",
    "plan_of",
    "qrange",
    "quant_codes",
    "quant_layers",
    "quantizable_layers",
    "quantize_",
    "reset_layer_",
    "round_ste",
]
