"""Reference integer kernels: exact against int64 / Fraction references on small random inputs."""

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lowbit.ir.dyadic import INT32_MAX, INT32_MIN, to_dyadic, to_dyadic_common
from lowbit.runtime.reference import (
    adaptive_avgpool_int,
    add_requant,
    avgpool_int,
    clamp_int,
    conv2d_int,
    linear_int,
    maxpool_int,
    relu_int,
    sumpool_int,
    upsample_nearest_int,
)


def round_half_even(q: Fraction) -> int:
    return round(q)  # exact: nearest, ties to even


def conv2d_int64(x, w, stride, padding, groups, dilation):
    """Pure int64 convolution: unfold to patches, then an integer einsum per group."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = F.pad(x.to(torch.int64), (padding, padding, padding, padding))
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    cols = torch.empty(n, c, kh, kw, oh, ow, dtype=torch.int64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dilation: i * dilation + stride * oh: stride,
                                  j * dilation: j * dilation + stride * ow: stride]
    cols = cols.reshape(n, groups, cg, kh, kw, oh, ow)
    wg = w.to(torch.int64).reshape(groups, o // groups, cg, kh, kw)
    return torch.einsum("ngcijyx,gocij->ngoyx", cols, wg).reshape(n, o, oh, ow)


@given(st.data())
def test_conv2d_int_exact(data):
    groups = data.draw(st.sampled_from([1, 2, 4]))
    cg, og = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    k, stride, padding, dilation = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)),
                                    data.draw(st.integers(0, 2)), data.draw(st.integers(1, 2)))
    h = data.draw(st.integers(dilation * (k - 1) + 1, 9))
    x_bits, w_bits = data.draw(st.sampled_from([2, 4, 8])), data.draw(st.sampled_from([2, 3, 4, 8]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randint(0, 2**x_bits, (2, cg * groups, h, h + 1), generator=g, dtype=torch.int32)
    w = torch.randint(-(2 ** (w_bits - 1)), 2 ** (w_bits - 1), (og * groups, cg, k, k), generator=g,
                      dtype=torch.int8)
    got = conv2d_int(x, w, stride, padding, groups, dilation)
    assert got.dtype == torch.int64
    assert torch.equal(got, conv2d_int64(x, w, stride, padding, groups, dilation))


def test_conv2d_int_exact_near_float32_limit():
    """A large K with 8-bit codes: sums well beyond 2^24 (where float32 would round) stay exact."""
    x = torch.full((1, 512, 3, 3), 255, dtype=torch.int32)
    x[0, ::3] = 254
    w = torch.full((2, 512, 3, 3), -128, dtype=torch.int8)
    w[1, ::5] = 127
    assert torch.equal(conv2d_int(x, w, 1, 1), conv2d_int64(x, w, 1, 1, 1, 1))


def test_conv2d_int_rejects_inexact_and_float():
    x = torch.full((1, 1, 2, 2), 2**40, dtype=torch.int64)
    with pytest.raises(ValueError, match="2\\^53"):
        conv2d_int(x, torch.full((1, 1, 2, 2), 2**12, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        conv2d_int(x.double(), torch.ones(1, 1, 1, 1, dtype=torch.int64))


def test_linear_int_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 5, 1000), generator=g)
    w = torch.randint(-128, 128, (7, 1000), generator=g)
    want = (x[..., None, :] * w).sum(-1)  # int64 broadcast-multiply reference
    assert torch.equal(linear_int(x, w), want)


def test_maxpool_and_relu():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-8, 8, (2, 3, 9, 8), generator=g, dtype=torch.int8)
    got = maxpool_int(x, 3, 2, 1)
    assert got.dtype == torch.int8
    assert torch.equal(got, F.max_pool2d(x.double(), 3, 2, 1).to(torch.int8))
    assert (maxpool_int(torch.full((1, 1, 2, 2), -5), 3, 1, 1) == -5).all()  # padding never wins
    assert relu_int(torch.tensor([-3, 0, 4])).tolist() == [0, 0, 4]


@given(st.data())
def test_avgpool_int_follows_its_definition(data):
    k, stride = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    padding = data.draw(st.integers(0, k // 2))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randint(-128, 128, (1, 2, 7, 6), generator=g)
    sums = sumpool_int(x, k, stride, padding)
    assert torch.equal(sums, F.avg_pool2d(x.double(), k, stride, padding, divisor_override=1).to(torch.int64))
    m, sh = to_dyadic(1 / (k * k))
    got = avgpool_int(x, k, stride, padding)
    for idx, s in np.ndenumerate(sums.numpy()):
        assert got[idx] == round_half_even(Fraction(int(s) * m, 2**sh))
        # windows 1, 4, 9, 16 are odd (no ties) or powers of two (exact): the exact mean, rounded half to even
        assert got[idx] == round_half_even(Fraction(int(s), k * k))


def test_avgpool_int_requantizes_to_a_new_scale_and_clamps():
    x = torch.arange(16).reshape(1, 1, 4, 4)
    m, sh = to_dyadic(0.5 / 4)  # s_in / (s_out * window) with s_out = 2 * s_in
    got = avgpool_int(x, 2, multiplier=m, shift=sh, lo=0, hi=3)
    want = torch.tensor([[2.5, 4.5], [10.5, 12.5]]) / 2  # window means, halved: 1.25 2.25 5.25 6.25
    assert got[0, 0].tolist() == torch.round(want).clamp(0, 3).int().tolist()
    with pytest.raises(ValueError):
        avgpool_int(x, 2, multiplier=m)


def test_adaptive_avgpool_int():
    x = torch.randint(0, 16, (2, 3, 7, 7), generator=torch.Generator().manual_seed(3))
    assert torch.equal(adaptive_avgpool_int(x, 1), avgpool_int(x, 7))  # global average
    assert torch.equal(adaptive_avgpool_int(x, (7, 1)), avgpool_int(x, (1, 7)))
    with pytest.raises(ValueError, match="dividing"):
        adaptive_avgpool_int(x, 2)


@given(s_a=st.floats(1e-3, 10), s_b=st.floats(1e-3, 10), s_out=st.floats(1e-2, 10), relu=st.booleans(),
       seed=st.integers(0, 2**16))
def test_add_requant_exact(s_a, s_b, s_out, relu, seed):
    (m_a, m_b), shift = to_dyadic_common([s_a / s_out, s_b / s_out])
    m_a, m_b = int(m_a), int(m_b)
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 16, (2, 3, 4, 4), generator=g)
    b = torch.randint(-128, 128, (2, 3, 4, 4), generator=g)
    lo, hi = (0, 15) if relu else (-8, 7)
    got = add_requant(a, b, m_a, m_b, shift, lo=lo, hi=hi)
    for idx, (av, bv) in enumerate(zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())):
        want = min(max(round_half_even(Fraction(av * m_a + bv * m_b, 2**shift)), lo), hi)
        assert got.reshape(-1)[idx] == want


def test_add_requant_rejects_overflow():
    big = torch.tensor([2**31])
    with pytest.raises(ValueError, match="overflow"):
        add_requant(big, big, 2**31 - 1, 2**31 - 1, 62, bias=2**32, lo=0, hi=1)


def test_add_requant_leaves_room_for_the_rounding():
    """round_shift adds up to 2^61: a sum below 2^63 but not below 2^63 - 2^61 is refused, not wrapped."""
    a = torch.tensor([2**31 - 1])
    with pytest.raises(ValueError, match="overflow"):  # 2 * (2^31 - 1)^2 ~ 2^63 - 2^33: the old bound let it wrap
        add_requant(a, a, 2**31 - 1, 2**31 - 1, 62, lo=INT32_MIN, hi=INT32_MAX)
    m = 3 * 2**29 - 1  # 2 * (2^31 - 1) * m just below 2^63 - 2^61: exact
    got = add_requant(torch.tensor([2**31 - 1, -(2**31) + 1]), a, m, m, 62, lo=INT32_MIN, hi=INT32_MAX)
    assert got.tolist() == [round_half_even(Fraction(2 * (2**31 - 1) * m, 2**62)), 0]


def test_clamp_and_nearest_upsampling_move_codes_only():
    x = torch.tensor([[[[-3, 0], [5, 9]]]], dtype=torch.int32)
    assert clamp_int(x, -1, 6).tolist() == [[[[-1, 0], [5, 6]]]]
    up = upsample_nearest_int(x, (2, 3))
    assert up.shape == (1, 1, 4, 6) and up.dtype == torch.int32
    assert torch.equal(up, F.interpolate(x.double(), scale_factor=(2, 3), mode="nearest").to(torch.int32))
    with pytest.raises(ValueError, match="integer code tensors"):
        clamp_int(x.float(), 0, 1)
