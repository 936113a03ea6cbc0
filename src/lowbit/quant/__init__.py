"""Quantization core: fake quantizers (LSQ, FAQ, MinMax), quantized layers, precision plans, workflow.

Typical use::

    from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
    quantize_(model, Plan.preset("w4a4", model), QuantConfig(method="lsq"))
    calibrate_(model, batches)          # before building the optimizer
"""

from lowbit.quant.api import (
    build_quantized,
    calibrate_,
    plan_of,
    quant_acts,
    quant_layers,
    quant_matmuls,
    quantize_,
    reset_layer_,
)
from lowbit.quant.bits import FLOAT_BITS, SUPPORTED_BITS, Bits, check_bits
from lowbit.quant.config import QuantConfig
from lowbit.quant.modules import QuantAct, QuantConv2d, QuantLinear, QuantMatmul, make_quantizer
from lowbit.quant.plan import (
    Plan,
    edge_layers,
    execution_order,
    is_quantizable,
    is_transformer,
    layer_roles,
    parse_bits,
    quantizable_layers,
)
from lowbit.quant.quantizers import (
    FaqQuantizer,
    LsqQuantizer,
    MinMaxQuantizer,
    fake_quant,
    qrange,
    quant_codes,
)
from lowbit.quant.residual import quantize_residuals
from lowbit.quant.ste import grad_scale, round_ste

__all__ = [
    "FLOAT_BITS",
    "SUPPORTED_BITS",
    "Bits",
    "FaqQuantizer",
    "LsqQuantizer",
    "MinMaxQuantizer",
    "Plan",
    "QuantAct",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatmul",
    "build_quantized",
    "calibrate_",
    "check_bits",
    "edge_layers",
    "execution_order",
    "fake_quant",
    "grad_scale",
    "is_quantizable",
    "is_transformer",
    "layer_roles",
    "make_quantizer",
    "parse_bits",
    "plan_of",
    "qrange",
    "quant_acts",
    "quant_codes",
    "quant_layers",
    "quant_matmuls",
    "quantizable_layers",
    "quantize_",
    "quantize_residuals",
    "reset_layer_",
    "round_ste",
]
