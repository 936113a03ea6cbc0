"""Bit widths: the one definition that quantizers, plans, cost models, the search and the exporter import.

A width is an int from :data:`SUPPORTED_BITS`; ``None`` means the tensor stays float, which cost models
count as :data:`FLOAT_BITS`.
"""

from __future__ import annotations

import numbers

from lowbit.errors import LowbitError

SUPPORTED_BITS = (2, 3, 4, 8)
FLOAT_BITS = 32  # an unquantized (fp32) weight or activation; also how presets spell float ("w4a32")

Bits = int | None  # a width from SUPPORTED_BITS, or None for float


def check_bits(bits: object) -> int:
    """Return ``bits`` as an int, or raise :class:`LowbitError` if it is not a supported precision."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in SUPPORTED_BITS:
        raise LowbitError(f"unsupported bits {bits!r}: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    return int(bits)


__all__ = ["FLOAT_BITS", "SUPPORTED_BITS", "Bits", "check_bits"]
