"""Bit-packing of integer codes into a little-endian bit stream.

A packed tensor is a 1-D ``uint8`` tensor. Code ``i`` of ``bits`` width occupies stream bits
``[i*bits, (i+1)*bits)``, least significant bit first, and stream bit ``j`` is bit ``j % 8`` of byte
``j // 8``. Signed codes are stored as ``bits``-wide two's complement. So 3-bit codes cross byte
boundaries (8 codes fill exactly 3 bytes), and the unused high bits of the last byte are zero. The shape is
not stored: the caller keeps it (the ``.lowbit`` manifest does), and codes are flattened in row-major order.

Packing works on groups of ``lcm(8, bits) / bits`` codes that fill whole bytes, so it is a handful of
vectorised shifts whatever the width, and no Python loop runs per element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.quant.bits import SUPPORTED_BITS


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """(lowest, highest) code of a ``bits``-wide integer: [-2^(b-1), 2^(b-1)-1] or [0, 2^b-1]."""
    _check_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` width: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"number of codes must be >= 0, got {n}")
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor | np.ndarray | Sequence[int], bits: int, signed: bool) -> torch.Tensor:
    """Pack integer codes (any shape, flattened row-major) into a 1-D ``uint8`` tensor.

    Raises:
        LowbitError: unsupported ``bits``.
        ValueError: a non-integer dtype, or a code outside :func:`code_range`.
    """
    lo, hi = code_range(bits, signed)
    v = _as_int64(codes).reshape(-1)
    if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
        bad = v[(v < lo) | (v > hi)][0].item()
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"code {bad} is out of range for {bits}-bit {kind} codes [{lo}, {hi}]")
    n = v.numel()
    group, group_bytes = _group(bits)
    u = v & ((1 << bits) - 1)  # two's complement in `bits` bits
    u = torch.nn.functional.pad(u, (0, -n % group)).reshape(-1, group)
    word = (u << (torch.arange(group) * bits)).sum(dim=1)  # (G,), < 2^24: the group's bits, LSB first
    out = (word[:, None] >> (torch.arange(group_bytes) * 8)) & 0xFF  # (G, group_bytes)
    return out.reshape(-1)[: packed_nbytes(n, bits)].to(torch.uint8)


def unpack(packed: torch.Tensor | np.ndarray | bytes, bits: int, n: int, signed: bool,
           dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Unpack ``n`` codes from a stream written by :func:`pack`; returns a 1-D tensor of ``dtype``.

    Raises:
        ValueError: the byte length is not ``packed_nbytes(n, bits)``, the padding bits are not zero
            (a corrupt or misdeclared tensor), or ``dtype`` cannot hold the code range.
    """
    lo, hi = code_range(bits, signed)
    if dtype.is_floating_point or dtype == torch.bool or not (
            torch.iinfo(dtype).min <= lo and hi <= torch.iinfo(dtype).max):
        raise ValueError(f"dtype {dtype} cannot hold {bits}-bit {'signed' if signed else 'unsigned'} codes")
    if isinstance(packed, (bytes, bytearray, memoryview)):
        packed = torch.tensor(np.frombuffer(bytes(packed), dtype=np.uint8))
    elif isinstance(packed, np.ndarray):
        packed = torch.from_numpy(np.ascontiguousarray(packed))
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed data must be uint8, got {packed.dtype}")
    nbytes = packed_nbytes(n, bits)
    if packed.numel() != nbytes:
        raise ValueError(f"{n} codes of {bits} bits need {nbytes} bytes, got {packed.numel()}")
    group, group_bytes = _group(bits)
    b = packed.reshape(-1).to(torch.int64)
    b = torch.nn.functional.pad(b, (0, -nbytes % group_bytes)).reshape(-1, group_bytes)
    word = (b << (torch.arange(group_bytes) * 8)).sum(dim=1)  # (G,)
    u = ((word[:, None] >> (torch.arange(group) * bits)) & ((1 << bits) - 1)).reshape(-1)
    if u[n:].any():
        raise ValueError(f"non-zero padding bits after {n} codes of {bits} bits: corrupt packed data")
    u = u[:n]
    if signed:
        u = torch.where(u > hi, u - (1 << bits), u)
    return u.to(dtype)


def _group(bits: int) -> tuple[int, int]:
    """Codes per byte-aligned group and bytes per group: (4, 1) for 2 bits, (8, 3) for 3 bits, ..."""
    group_bits = math.lcm(8, bits)
    return group_bits // bits, group_bits // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise LowbitError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _as_int64(codes: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        codes = torch.as_tensor(np.asarray(codes) if not isinstance(codes, np.ndarray) else codes)
        if codes.numel() == 0:
            codes = codes.to(torch.int64)  # np.asarray([]) is float64, but an empty list is fine
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype} (round and cast first)")
    return codes.detach().cpu().to(torch.int64)
