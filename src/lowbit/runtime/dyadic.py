"""Dyadic requantization lives in :mod:`lowbit.ir.dyadic` (shared by the lowering and every backend); this
module keeps the old import path."""

from lowbit.ir.dyadic import (
    BIAS_LIMIT,
    MAX_SHIFT,
    MULTIPLIER_LIMIT,
    PRODUCT_LIMIT,
    IntLike,
    ScaleLike,
    requantize,
    round_shift,
    to_dyadic,
    to_dyadic_common,
    to_fixed,
)

__all__ = ["BIAS_LIMIT", "MAX_SHIFT", "MULTIPLIER_LIMIT", "PRODUCT_LIMIT", "IntLike", "ScaleLike", "requantize",
           "round_shift", "to_dyadic", "to_dyadic_common", "to_fixed"]
