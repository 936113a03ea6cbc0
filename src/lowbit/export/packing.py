"""Bit packing lives in :mod:`lowbit.ir.packing`; this module keeps the old import path."""

from lowbit.ir.packing import SUPPORTED_BITS, code_range, pack, packed_nbytes, unpack

__all__ = ["SUPPORTED_BITS", "code_range", "pack", "packed_nbytes", "unpack"]
