"""Dyadic requantization against exact rational arithmetic (fractions.Fraction)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.ir import dyadic
from lowbit.ir.dyadic import requantize, round_shift, to_dyadic, to_dyadic_common, to_fixed

# Scales whose normalised 31-bit multiplier needs a shift in [0, 62]: 2^-32 <= |s| < 2^31 (with margin).
scales = st.floats(2.0**-32, 2.0**31 * (1 - 2.0**-30)).flatmap(lambda s: st.sampled_from([s, -s]))


def round_half_even(q: Fraction) -> int:
    return round(q)  # Fraction.__round__ without ndigits: nearest, ties to even, exact


def exact_requant(acc, m, k, b, lo, hi):
    return min(max(round_half_even(Fraction(acc * m + b, 2**k)), lo), hi)


@given(scales)
def test_to_dyadic_scalar_is_normalised_with_bounded_error(s):
    m, k = to_dyadic(s)
    assert isinstance(m, int) and isinstance(k, int)
    assert 2**30 <= abs(m) < 2**31 and 0 <= k <= 62
    assert (m > 0) == (s > 0)  # the sign lives in the multiplier
    err = abs(Fraction(m, 2**k) - Fraction(s))
    assert err <= Fraction(abs(s)) * Fraction(1, 2**31)  # tighter than the 2^-30 required


@given(st.lists(scales | st.just(0.0), min_size=1, max_size=20))
def test_to_dyadic_per_channel_matches_scalar(values):
    m, k = to_dyadic(torch.tensor(values, dtype=torch.float64))
    assert m.dtype == k.dtype == torch.int64
    assert [(int(a), int(b)) for a, b in zip(m, k)] == [to_dyadic(v) for v in values]


def test_to_dyadic_special_values():
    assert to_dyadic(0.0) == (0, 30)  # zero: multiplier 0 at the shift of scale 1.0
    assert to_dyadic(1.0) == (2**30, 30)
    assert to_dyadic(-0.75) == (-3 * 2**29, 31)
    assert to_dyadic(2.0**-32) == (2**30, 62)
    assert to_dyadic(1 - 2.0**-40) == (2**30, 30)  # rounds up to the next power of two: renormalised
    assert to_dyadic(0.5, bits=15) == (2**14, 15)
    m, k = to_dyadic(np.float32(0.1))  # float32 converts exactly, then one rounding
    s32 = Fraction(float(np.float32(0.1)))
    assert abs(Fraction(m, 2**k) - s32) <= s32 / 2**31


@pytest.mark.parametrize("bad", [1e-12, -1e-12, 2.0**31, 1e20, float("nan"), float("inf")])
def test_to_dyadic_rejects_unrepresentable(bad):
    with pytest.raises(ValueError):
        to_dyadic(bad)
    with pytest.raises(ValueError, match="element 1" if math.isfinite(bad) else "finite"):
        to_dyadic([0.5, bad])


def test_to_dyadic_common_one_shift():
    m, k = to_dyadic_common([0.37, -0.0021, 0.0])
    assert m.tolist()[0] == to_dyadic(0.37)[0] and k == to_dyadic(0.37)[1] and m.tolist()[2] == 0
    for s, mi in zip([0.37, -0.0021], m.tolist()):
        assert abs(Fraction(mi, 2**k) - Fraction(s)) <= Fraction(1, 2 ** (k + 1))


@given(acc=st.integers(-(2**31) + 1, 2**31 - 1), m=st.integers(-(2**31) + 1, 2**31 - 1),
       k=st.integers(0, 62), b=st.integers(-(2**61), 2**61), lo=st.integers(-(2**31), 0),
       width=st.integers(0, 2**32), tie=st.booleans())
def test_requantize_equals_exact_rational_rounding(acc, m, k, b, lo, width, tie):
    hi = min(lo + width, 2**31 - 1)
    if tie and k > 0:  # move b so that acc*m + b is an exact tie (an odd multiple of 2^(k-1))
        b = max(-(2**61), min(2**61, b - (acc * m + b) % 2**k + 2 ** (k - 1)))
    out = requantize(torch.tensor([acc]), m, k, b, lo=lo, hi=hi)
    assert out.dtype == torch.int32
    assert out.item() == exact_requant(acc, m, k, b, lo, hi)


@given(st.data())
def test_requantize_per_channel_nchw_and_linear(data):
    c = data.draw(st.integers(1, 5))
    m = [data.draw(st.integers(-(2**31) + 1, 2**31 - 1)) for _ in range(c)]
    k = [data.draw(st.integers(20, 62)) for _ in range(c)]
    b = [data.draw(st.integers(-(2**40), 2**40)) for _ in range(c)]
    acc = torch.randint(-(2**20), 2**20, (2, c, 3, 2), generator=torch.Generator().manual_seed(c))
    out = requantize(acc, torch.tensor(m), torch.tensor(k), torch.tensor(b), lo=-100, hi=100, axis=1)
    for (n, ch, i, j), a in np.ndenumerate(acc.numpy()):
        assert out[n, ch, i, j] == exact_requant(int(a), m[ch], k[ch], b[ch], -100, 100)
    lin = acc.permute(0, 2, 3, 1)  # (..., C): channel last
    out_last = requantize(lin, torch.tensor(m), torch.tensor(k), torch.tensor(b), lo=-100, hi=100, axis=-1)
    assert torch.equal(out_last, out.permute(0, 2, 3, 1))


def test_ties_round_to_even_like_torch_round():
    x = torch.tensor([5, -5, 1, -1, 3, -3, 7, -7])  # /2 -> 2.5 -2.5 0.5 -0.5 1.5 -1.5 3.5 -3.5
    assert round_shift(x, 1).tolist() == [2, -2, 0, 0, 2, -2, 4, -4]
    assert round_shift(x, 0).tolist() == x.tolist()
    y = torch.arange(-4096, 4096)
    for k in (1, 2, 3, 7):  # every remainder, ties included, equals torch.round (half to even) of y / 2^k
        assert torch.equal(round_shift(y, k), torch.round(y.double() / 2**k).to(torch.int64))
    per_channel = round_shift(torch.tensor([[6], [6]]), torch.tensor([[2], [0]]))
    assert per_channel.tolist() == [[2], [6]]  # 1.5 -> 2 and shift 0 untouched


@pytest.mark.parametrize("kwargs", [
    dict(acc=torch.tensor([2**32]), multiplier=2**30, shift=0),  # |acc * m| reaches 2^62
    dict(acc=torch.tensor([2**40]), multiplier=2**22, shift=0),  # a wide sum with a too wide multiplier
    dict(acc=torch.tensor([1]), multiplier=2**31, shift=0),  # beyond int32 multipliers
    dict(acc=torch.tensor([1]), multiplier=1, shift=63),
    dict(acc=torch.tensor([1]), multiplier=1, shift=-1),
    dict(acc=torch.tensor([1]), multiplier=1, shift=0, bias=2**61 + 1),
    dict(acc=torch.tensor([1.0]), multiplier=1, shift=0),  # float acc
    dict(acc=torch.ones(2, 3), multiplier=torch.ones(2, dtype=torch.int64), shift=0),  # wrong channel count
])
def test_requantize_rejects_overflow_risks(kwargs):
    with pytest.raises(ValueError):
        requantize(**kwargs, lo=-10, hi=10)


def test_to_fixed_and_overflow_guard():
    assert to_fixed(1.5, 3) == 12
    assert to_fixed(torch.tensor([0.25, -1.0]), torch.tensor([2, 40])).tolist() == [1, -(2**40)]
    with pytest.raises(ValueError, match="2\\^61"):
        to_fixed(8.0, 59)


def test_float_chain_equals_integer_chain_except_near_ties():
    """conv+BN+ReLU+next quantizer: dyadic integer codes == float64 codes, except right at ties."""
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-3000, 3000, (4, 16, 5, 5), generator=g)
    s_w = torch.rand(16, generator=g, dtype=torch.float64) * 0.05 + 0.01
    gamma = torch.randn(16, generator=g, dtype=torch.float64)  # negative gammas included
    beta = torch.randn(16, generator=g, dtype=torch.float64)
    mu = torch.randn(16, generator=g, dtype=torch.float64)
    sigma, s_x, s_next = torch.rand(16, generator=g, dtype=torch.float64) + 0.5, 0.07, 0.11
    scale = s_w * s_x * gamma / (sigma * s_next)  # M_c
    offset = (beta - gamma * mu / sigma) / s_next  # B_c
    exact = acc.double() * scale[:, None, None] + offset[:, None, None]
    want = torch.round(exact).clamp(0, 15)
    m, k = to_dyadic(scale)
    got = requantize(acc, m, k, to_fixed(offset, k), lo=0, hi=15)
    near_tie = (exact - exact.floor() - 0.5).abs() < 1e-6
    assert ((got.double() == want) | near_tie).all()


def test_requantize_accepts_wide_sums_with_narrow_multipliers():
    acc = torch.tensor([2**40 - 1, -(2**40) + 3])  # a window sum beyond int32
    m, k = 2**21 + 5, 30
    assert requantize(acc, m, k, lo=-(2**31), hi=2**31 - 1).tolist() == [
        exact_requant(int(a), m, k, 0, -(2**31), 2**31 - 1) for a in acc]


@pytest.mark.parametrize("sign", [1, -1])
def test_requantize_at_the_overflow_bound(sign):
    acc, m, b = sign * (2**31 - 1), 2**31 - 1, sign * 2**61
    for k in (0, 1, 61, 62):
        out = requantize(torch.tensor([acc]), m, k, b, lo=-(2**31), hi=2**31 - 1).item()
        assert out == exact_requant(acc, m, k, b, -(2**31), 2**31 - 1)


# ------------------------------------------------------------------- requantization in a float32 epilogue
def _epilogue(acc, m, k, b, lo, hi, zp, fma):
    """A float32 kernel epilogue, emulated: ``rne(clip(|s|*float(acc') + beta, lo, hi) + zp)`` with a multiply
    then an add (two roundings) or one fused multiply-add (one rounding), every step in float32."""
    s = np.float32(abs(m) * 2.0**-k)
    beta = np.float32(b * 2.0**-k)
    a = np.float32(acc * (-1 if m < 0 else 1))
    v = np.float32(float(a) * float(s) + float(beta)) if fma else np.float32(np.float32(a * s) + beta)
    v = np.float32(min(max(v, np.float32(lo)), np.float32(hi)) + np.float32(zp))
    return int(np.rint(v)) - zp  # np.rint: half to even


@pytest.mark.parametrize("fma", [False, True])
def test_float32_epilogue_equals_requantize_wherever_it_is_proved(fma):
    g = torch.Generator().manual_seed(0)
    proved = 0
    for trial in range(60):
        lo, hi = [(0, 15), (-8, 7), (0, 3), (-2, 1), (0, 255)][trial % 5]
        zp = -lo
        gain = float(torch.rand((), generator=g)) * 0.05 + 1e-3
        gain *= -1 if trial % 7 == 0 else 1
        offset = (float(torch.rand((), generator=g)) * 2 - 1) * 10
        m31, k31 = to_dyadic(gain)
        m, k, b = dyadic.float32_epilogue_dyadic(torch.tensor([gain]), torch.tensor([offset]), lo, hi, zp,
                                                 torch.tensor([m31]), torch.tensor([k31]),
                                                 torch.tensor([to_fixed(offset, k31)]))
        if trial % 3 == 0:  # a tie on every 2^(k-1)-th step
            b = (b >> k << k) + (1 << (k - 1))
        acc_lo, acc_hi = torch.tensor([-40000]), torch.tensor([40000])
        ok, why = dyadic.float32_epilogue_exact(m, k, b, lo, hi, zp, acc_lo, acc_hi)
        if not bool(ok.all()):
            continue
        proved += 1
        accs = torch.arange(-40000, 40001)
        want = requantize(accs, int(m), int(k), int(b), lo=lo, hi=hi, axis=0).tolist()
        mm, kk, bb = int(m), int(k), int(b)
        got = [_epilogue(a, mm, kk, bb, lo, hi, zp, fma) for a in accs.tolist()[::13]]
        assert got == want[::13], (trial, mm, kk, bb)
    assert proved >= 30


def test_float32_epilogue_refuses_what_it_cannot_prove():
    m, k = to_dyadic(0.0123)  # a 31-bit multiplier
    ok, why = dyadic.float32_epilogue_exact(torch.tensor([m]), torch.tensor([k]), torch.tensor([0]), 0, 15, 0,
                                            torch.tensor([-5000]), torch.tensor([5000]))
    assert not bool(ok.all()) and "24 bits" in why
    ok, why = dyadic.float32_epilogue_exact(torch.tensor([403]), torch.tensor([15]), torch.tensor([0]), -7, 7, 7,
                                            torch.tensor([-5000]), torch.tensor([5000]))
    assert not bool(ok.all()) and "odd" in why
    ok, _ = dyadic.float32_epilogue_exact(torch.tensor([403]), torch.tensor([15]), torch.tensor([0]), -8, 7, 8,
                                          torch.tensor([-5000]), torch.tensor([5000]))
    assert bool(ok.all())


# ----------------------------------------------------------------- a fused residual add (conv2d_add)
@given(acc=st.integers(-(2**40), 2**40), m=st.integers(-(2**31) + 1, 2**31 - 1), k=st.integers(0, 62),
       b=st.integers(-(2**61), 2**61), r=st.integers(-(2**31), 2**31 - 1), mr=st.integers(-(2**31) + 1, 2**31 - 1),
       lo=st.integers(-300, 0), width=st.integers(0, 600))
def test_requantize_sum_equals_exact_rational_rounding(acc, m, k, b, r, mr, lo, width):
    hi = lo + width
    bound = abs(acc * m) + abs(b) + abs(r * mr)
    if bound >= 2**63 - 2**61:
        with pytest.raises(ValueError, match="overflow"):
            dyadic.requantize_sum(torch.tensor([acc]), m, k, b, torch.tensor([r]), mr, lo=lo, hi=hi, axis=0)
        return
    got = dyadic.requantize_sum(torch.tensor([acc]), m, k, b, torch.tensor([r]), mr, lo=lo, hi=hi, axis=0).item()
    assert got == min(max(round(Fraction(acc * m + b + r * mr, 2**k)), lo), hi)


def _sum_epilogue(acc, r, m, k, b, mr, zp, zp_r, order):
    """A float32 int8-kernel epilogue with a sum post-op, emulated: ``sat_u8(rne(|s|*float(acc') + beta +
    S*float(r_stored - zp_r)) + zp) - zp``, the three terms added in ``order`` (or the first two fused)."""
    s, beta, big_s = (np.float32(v * 2.0**-k) for v in (abs(m), b, mr))
    a = np.float32(acc * (-1 if m < 0 else 1))
    rr = np.float32(np.float32(r + zp_r) - np.float32(zp_r))
    res = np.float32(big_s * rr)
    if order == "fma":
        v = np.float32(np.float32(float(a) * float(s) + float(beta)) + res)
    elif order == "left":
        v = np.float32(np.float32(np.float32(a * s) + beta) + res)
    else:
        v = np.float32(np.float32(a * s) + np.float32(beta + res))
    return min(max(int(np.rint(np.float32(v + np.float32(zp)))), 0), 255) - zp


@pytest.mark.parametrize("order", ["left", "right", "fma"])
def test_float32_sum_epilogue_equals_requantize_sum_wherever_it_is_proved(order):
    """Narrowed constants (float32_sum_epilogue_dyadic) and small random ones, ties included: wherever
    float32_sum_epilogue_exact says exact, the emulated kernel equals requantize_sum on every residual code and on
    accumulators across the window and far outside it."""
    g = torch.Generator().manual_seed(1)
    proved = 0
    for trial in range(48):
        zp, zp_r = [(0, 0), (128, 0), (0, 128), (128, 128)][trial % 4]
        lo, hi = -zp, 255 - zp
        r_lo, r_hi = -zp_r, 255 - zp_r
        gain = float(torch.rand((), generator=g)) * (8.0 if trial % 2 else 0.05) + 1e-3
        gain *= -1 if trial % 5 == 0 else 1
        offset = (float(torch.rand((), generator=g)) * 2 - 1) * 20
        resid = float(torch.rand((), generator=g)) * 2 + 0.01
        if trial % 3 == 0:  # the lowering's narrowing (applies only where the error stays below 2^-10 steps)
            m31, k31 = to_dyadic(gain)
            mr31 = round(resid * 2.0**k31)
            m, k, b, mr = dyadic.float32_sum_epilogue_dyadic(
                torch.tensor([gain]), torch.tensor([offset]), resid, lo, hi, zp, max(abs(r_lo), abs(r_hi)),
                torch.tensor([m31]), torch.tensor([k31]), torch.tensor([to_fixed(offset, k31)]), torch.tensor([mr31]))
        else:  # a few bits each
            k = int(torch.randint(2, 12, (), generator=g))
            m = round(gain * 2**k) or 1
            b, mr = round(offset * 2**k), round(resid * 2**k)
            m, k, b, mr = (torch.tensor([v]) for v in (m, k, b, mr))
        if trial % 4 == 1:  # a tie on every 2^(k-1)-th step
            b = (b >> k << k) + (1 << (k - 1)) if int(k) > 0 else b
        acc_lo, acc_hi = torch.tensor([-30000]), torch.tensor([30000])
        ok, why = dyadic.float32_sum_epilogue_exact(m, k, b, mr, lo, hi, zp, acc_lo, acc_hi, r_lo, r_hi, zp_r)
        if not bool(ok.all()):
            continue
        proved += 1
        mm, kk, bb, mrr = int(m), int(k), int(b), int(mr)
        accs = torch.arange(-30000, 30001, 7)
        for r in range(r_lo, r_hi + 1, 17):
            want = dyadic.requantize_sum(accs, mm, kk, bb, torch.full_like(accs, r), mrr, lo=lo, hi=hi, axis=0)
            got = [_sum_epilogue(a, r, mm, kk, bb, mrr, zp, zp_r, order) for a in accs.tolist()]
            assert got == want.tolist(), (trial, mm, kk, bb, mrr, r)
    assert proved >= 12


def test_float32_sum_epilogue_refuses_what_it_cannot_prove():
    args = dict(lo=0, hi=255, zp=0, acc_lo=torch.tensor([-5000]), acc_hi=torch.tensor([5000]), r_lo=0, r_hi=255,
                zp_r=0)
    ok, why = dyadic.float32_sum_epilogue_exact(torch.tensor([403, 403]), torch.tensor([10, 11]), torch.tensor([0, 0]),
                                                torch.tensor([512, 512]), **args)
    assert not bool(ok.any()) and "differs between channels" in why  # 512*2^-10 != 512*2^-11: two sum scales
    ok, why = dyadic.float32_sum_epilogue_exact(torch.tensor([403]), torch.tensor([10]), torch.tensor([0]),
                                                torch.tensor([2**20]), **args)
    assert not bool(ok.all()) and "2^24" in why  # 255 * 2^20 passes float32's significand
    ok, _ = dyadic.float32_sum_epilogue_exact(torch.tensor([403, -403]), torch.tensor([10, 11]),
                                              torch.tensor([7, 0]), torch.tensor([512, 1024]), **args)
    assert bool(ok.all())


@pytest.mark.parametrize("order", ["left", "right", "fma"])
def test_a_wider_budget_narrows_a_4bit_sum_and_a_clamp_after_the_kernel_gives_the_reference(order):
    """A fused residual add into 4-bit codes ``[0, 15]`` (a 4-bit residual stream): a gain too small for the default
    2^-10 steps narrows under a 2^-5 budget; the narrowed constants then (a) are proved exact, (b) move every value
    of the window by at most the budget, and (c) the kernel's uint8 result (saturating at 0 and 255 only) clamped to
    ``[0, 15]`` afterwards, as the fast path does, equals requantize_sum on every accumulator and residual code."""
    gain, offset, resid, r_max = 0.011, 1.3, 0.93, 15
    m31, k31 = to_dyadic(gain)
    args = (torch.tensor([gain]), torch.tensor([offset]), resid, 0, 15, 0, r_max, torch.tensor([m31]),
            torch.tensor([k31]), torch.tensor([to_fixed(offset, k31)]), torch.tensor([round(resid * 2.0**k31)]))
    assert int(dyadic.float32_sum_epilogue_dyadic(*args)[1]) == k31  # unchanged under the default budget
    m, k, b, mr = (int(t) for t in dyadic.float32_sum_epilogue_dyadic(*args, max_error=2.0**-5))
    assert k < k31
    ok, why = dyadic.float32_sum_epilogue_exact(torch.tensor([m]), torch.tensor([k]), torch.tensor([b]),
                                                torch.tensor([mr]), 0, 15, 0, torch.tensor([-40000]),
                                                torch.tensor([40000]), 0, r_max, 0)
    assert bool(ok.all()), why
    accs = torch.arange(-40000, 40001, 3)
    for r in range(0, r_max + 1):
        exact = accs.double() * gain + offset + r * resid
        window = (exact > -1.5) & (exact < 16.5)
        narrowed = (accs.double() * m + b + r * mr) * 2.0**-k
        assert float((narrowed - exact)[window].abs().max()) <= 2.0**-5
        want = dyadic.requantize_sum(accs, m, k, b, torch.full_like(accs, r), mr, lo=0, hi=15, axis=0)
        got = [min(max(_sum_epilogue(a, r, m, k, b, mr, 0, 0, order), 0), 15) for a in accs.tolist()]
        assert got == want.tolist(), r


def test_the_accumulators_reach_bounds_the_window_of_a_small_gain():
    """A gain so small that the window ``top / gain`` (every accumulator that could round into the codes) needs most of
    float32's bits; the layer's weights and input codes reach far fewer accumulators, and with that reach given both
    narrowings take a shift that is proved exact on it and moves no reachable value by more than the budget."""
    gain, offset, resid, r_max, reach = 0.0004, 1.3, 0.93, 15, 3000  # window top/gain: ~46,000 and ~120,000
    acc = (torch.tensor([-reach]), torch.tensor([reach]))
    m31, k31 = to_dyadic(gain)
    plain = (torch.tensor([gain]), torch.tensor([offset]), 0, 15, 0, torch.tensor([m31]), torch.tensor([k31]),
             torch.tensor([to_fixed(offset, k31)]))
    assert int(dyadic.float32_epilogue_dyadic(*plain, max_error=2.0**-5)[1]) == k31  # without the reach: unchanged
    m, k, b = dyadic.float32_epilogue_dyadic(*plain, max_error=2.0**-5, acc=acc)
    assert int(k) < k31 and bool(dyadic.float32_epilogue_exact(m, k, b, 0, 15, 0, *acc)[0].all())
    accs = torch.arange(-reach, reach + 1)
    assert float(((accs * int(m) + int(b)) * 2.0 ** -int(k) - (accs * gain + offset)).abs().max()) <= 2.0**-5
    fused = (*plain[:2], resid, 0, 15, 0, r_max, *plain[5:], torch.tensor([round(resid * 2.0**k31)]))
    assert int(dyadic.float32_sum_epilogue_dyadic(*fused, max_error=2.0**-5)[1]) == k31
    m, k, b, mr = (int(t) for t in dyadic.float32_sum_epilogue_dyadic(*fused, max_error=2.0**-5, acc=acc))
    assert k < k31
    ok, why = dyadic.float32_sum_epilogue_exact(torch.tensor([m]), torch.tensor([k]), torch.tensor([b]),
                                                torch.tensor([mr]), 0, 15, 0, *acc, 0, r_max, 0)
    assert bool(ok.all()), why
    for r in range(r_max + 1):
        moved = (accs * m + b + r * mr) * 2.0**-k - (accs * gain + offset + r * resid)
        assert float(moved.abs().max()) <= 2.0**-5


def test_a_zero_gain_narrows_exactly():
    """A batch norm whose gamma is 0 (ResNets initialise the last one of each block so): the channel's multiplier 0 is
    exact at any shift, so only the residual's scale is rounded and the narrowing applies under the default budget."""
    m31, k31 = to_dyadic(0.93)
    args = (torch.tensor([0.0, 0.0]), torch.tensor([0.4, -1.2]), 0.93, 0, 15, 0, 15, torch.tensor([0, 0]),
            torch.tensor([k31, k31]), torch.tensor([to_fixed(0.4, k31), to_fixed(-1.2, k31)]),
            torch.tensor([m31, m31]))
    m, k, b, mr = dyadic.float32_sum_epilogue_dyadic(*args)
    assert bool((m == 0).all()) and int(k.max()) < k31
    ok, why = dyadic.float32_sum_epilogue_exact(m, k, b, mr, 0, 15, 0, torch.tensor([-9000, -9000]),
                                                torch.tensor([9000, 9000]), 0, 15, 0)
    assert bool(ok.all()), why
