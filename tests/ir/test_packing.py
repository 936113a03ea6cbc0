"""Bit-packing: round trips for every width, the exact little-endian bit layout, and rejected input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowbit.quant.bits
from lowbit.errors import LowbitError
from lowbit.ir.packing import SUPPORTED_BITS, code_range, pack, packed_nbytes, unpack


@st.composite
def codes_case(draw, max_len=300):
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    signed = draw(st.booleans())
    lo, hi = code_range(bits, signed)
    codes = draw(st.lists(st.integers(lo, hi), max_size=max_len))
    return bits, signed, codes


def _naive_pack(codes, bits):
    """Bit by bit, the documented layout: code i at stream bits [i*bits, (i+1)*bits), LSB first."""
    out = bytearray(packed_nbytes(len(codes), bits))
    for i, c in enumerate(codes):
        u = c & ((1 << bits) - 1)
        for j in range(bits):
            pos = i * bits + j
            out[pos // 8] |= ((u >> j) & 1) << (pos % 8)
    return list(out)


@given(codes_case())
def test_round_trip_all_widths(case):
    bits, signed, codes = case
    packed = pack(torch.tensor(codes, dtype=torch.int64), bits, signed)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == (len(codes) * bits + 7) // 8
    out = unpack(packed, bits, len(codes), signed)
    assert out.dtype == torch.int32
    assert out.tolist() == codes


@given(codes_case(max_len=40))
def test_layout_matches_bitwise_definition(case):
    bits, signed, codes = case
    assert pack(codes, bits, signed).tolist() == _naive_pack(codes, bits)


def test_known_layouts():
    assert pack([1, 2, 3], 3, signed=False).tolist() == [0b11010001, 0]  # 001 010 011, LSB first
    assert pack([1, 2, 3, 4, 5, 6, 7, 0], 3, signed=False).tolist() == [209, 88, 31]  # 8 codes = 3 bytes
    assert pack([0, 1, 2, 3], 2, signed=False).tolist() == [0b11100100]
    assert pack([1, -1], 4, signed=True).tolist() == [0xF1]
    assert pack([-1, 127, -128], 8, signed=True).tolist() == [255, 127, 128]
    assert pack([], 4, signed=True).numel() == 0


def test_length_zero_and_one_and_inputs_of_any_kind():
    assert unpack(b"", 3, 0, signed=True).numel() == 0
    assert unpack(bytes([0b101]), 3, 1, signed=True).tolist() == [-3]
    grid = np.array([[1, -2], [3, -4]], dtype=np.int8)  # numpy, 2-D: flattened row-major
    assert unpack(pack(grid, 4, True), 4, 4, True, dtype=torch.int8).tolist() == [1, -2, 3, -4]


@given(st.sampled_from(SUPPORTED_BITS), st.booleans(), st.integers(-1000, 1000))
def test_out_of_range_codes_rejected(bits, signed, value):
    lo, hi = code_range(bits, signed)
    if lo <= value <= hi:
        assert unpack(pack([value], bits, signed), bits, 1, signed).tolist() == [value]
    else:
        with pytest.raises(ValueError, match="out of range"):
            pack([0, value], bits, signed)


@pytest.mark.parametrize("bad", [lambda: pack([1], 5, True), lambda: pack([1], True, True),
                                 lambda: unpack(bytes(1), 7, 1, True), lambda: packed_nbytes(3, 1)])
def test_unsupported_width_is_a_lowbit_error(bad):
    with pytest.raises(LowbitError, match="bits must be one of"):
        bad()


def test_widths_are_the_quantizers():
    assert SUPPORTED_BITS is lowbit.quant.bits.SUPPORTED_BITS


@pytest.mark.parametrize("bad", [
    lambda: pack(torch.tensor([1.0]), 4, True),  # float codes: round and cast first
    lambda: unpack(torch.zeros(2, dtype=torch.uint8), 4, 5, True),  # 5 codes need 3 bytes
    lambda: unpack(torch.tensor([0x40], dtype=torch.uint8), 3, 2, False),  # non-zero padding bits
    lambda: unpack(torch.zeros(1, dtype=torch.int8), 8, 1, True),  # stream must be uint8
    lambda: unpack(torch.zeros(1, dtype=torch.uint8), 8, 1, False, dtype=torch.int8),  # 255 won't fit
])
def test_invalid_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        bad()


def test_large_vector_is_fast_and_exact():
    codes = torch.randint(-4, 4, (1_000_003,))
    assert torch.equal(unpack(pack(codes, 3, True), 3, codes.numel(), True), codes.to(torch.int32))
