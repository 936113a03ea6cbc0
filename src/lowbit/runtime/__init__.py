"""Integer runtime: dyadic requantization (the one definition of integer rounding) and exact kernels."""

from lowbit.runtime.dyadic import requantize, round_shift, to_dyadic, to_dyadic_common, to_fixed
from lowbit.runtime.reference import (
    adaptive_avgpool_int,
    add_requant,
    avgpool_int,
    conv2d_int,
    linear_int,
    maxpool_int,
    relu_int,
    sumpool_int,
)

__all__ = [
    "adaptive_avgpool_int", "add_requant", "avgpool_int", "conv2d_int", "linear_int", "maxpool_int",
    "relu_int", "requantize", "round_shift", "sumpool_int", "to_dyadic", "to_dyadic_common", "to_fixed",
]
