import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.quant import (
    FaqQuantizer,
    LsqQuantizer,
    MinMaxQuantizer,
    fake_quant,
    grad_scale,
    qrange,
    round_ste,
)
from lowbit.quant.quantizers import MSE_FRACTIONS, STEP_EPS
from lowbit.quant.ste import clamp_min_ste

QUANTIZERS = (LsqQuantizer, FaqQuantizer, MinMaxQuantizer)


def test_ste_values_and_gradients():
    x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    s = torch.tensor(3.0, requires_grad=True)
    z = grad_scale(s, 0.25)
    assert z.item() == 3.0
    (2 * z).backward()
    assert s.grad.item() == 0.5


@pytest.mark.parametrize("bits,signed,expected", [
    (2, True, (2, 1)), (2, False, (0, 3)), (3, True, (4, 3)), (4, True, (8, 7)), (4, False, (0, 15)),
    (8, True, (128, 127)), (8, False, (0, 255)),
])
def test_qrange(bits, signed, expected):
    assert qrange(bits, signed) == expected


@pytest.mark.parametrize("bits", [1, 5, 16, 32, 0, None, 4.0, True])
def test_unsupported_bits(bits):
    with pytest.raises(LowbitError, match="unsupported bits"):
        qrange(bits, True)
    with pytest.raises(LowbitError):
        LsqQuantizer(bits, True)


# Hand-computed LSQ cases at s = 0.5: (v, v̂, ∂v̂/∂v, ∂v̂/∂s) from the paper's formulas.
#   unsigned 2-bit: Q_N = 0, Q_P = 3; signed 2-bit: Q_N = 2, Q_P = 1.
UNSIGNED_CASES = [
    (0.3, 0.5, 1.0, -0.6 + 1),   # v/s = 0.6 -> 1
    (0.25, 0.0, 1.0, -0.5 + 0),  # v/s = 0.5, a bin edge: round half to even -> 0
    (0.75, 1.0, 1.0, -1.5 + 2),  # v/s = 1.5, bin edge -> 2
    (1.1, 1.0, 1.0, -2.2 + 2),   # v/s = 2.2 -> 2
    (-0.2, 0.0, 0.0, -0.0),      # below: -Q_N
    (2.0, 1.5, 0.0, 3.0),        # above: Q_P
]
SIGNED_CASES = [
    (-0.3, -0.5, 1.0, 0.6 - 1),  # v/s = -0.6 -> -1
    (0.1, 0.0, 1.0, -0.2 + 0),   # v/s = 0.2 -> 0
    (-1.5, -1.0, 0.0, -2.0),     # below: -Q_N
    (0.6, 0.5, 0.0, 1.0),        # above: Q_P
]


@pytest.mark.parametrize("signed,cases", [(False, UNSIGNED_CASES), (True, SIGNED_CASES)])
def test_lsq_forward_and_gradients_match_the_paper(signed, cases):
    q = LsqQuantizer(2, signed).double()
    q.set_step_(0.5)
    v = torch.tensor([c[0] for c in cases], dtype=torch.float64, requires_grad=True)
    dl_dvhat = torch.linspace(0.5, 2.0, len(cases), dtype=torch.float64)  # L = Σ c_i v̂_i
    v_hat = q(v)
    (dl_dvhat * v_hat).sum().backward()
    expected_vhat = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    dv = torch.tensor([c[2] for c in cases], dtype=torch.float64)
    ds = torch.tensor([c[3] for c in cases], dtype=torch.float64)
    g = 1 / math.sqrt(v.numel() * q.q_p)  # weight role: N = every element of the tensor
    torch.testing.assert_close(v_hat, expected_vhat, rtol=0, atol=1e-12)
    torch.testing.assert_close(v.grad, dl_dvhat * dv, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.step.grad, g * (dl_dvhat * ds).sum(), rtol=1e-12, atol=1e-12)


def test_lsq_activation_grad_scale_counts_features_per_example():
    q = LsqQuantizer(4, False, role="activation")
    q.set_step_(0.1)
    x = torch.rand(5, 3, 2) * 1.5  # N = 3 * 2 features per example, batch of 5 not counted
    q(x).sum().backward()
    v = x / 0.1
    inside = (v > 0) & (v < 15)
    ds = torch.where(inside, -v + v.round(), torch.where(v >= 15, 15.0, 0.0))
    torch.testing.assert_close(q.step.grad, ds.sum() / math.sqrt(6 * 15))


def test_lsq_per_channel_init_and_grad_scale():
    w = torch.randn(4, 3, 2, 2)
    q = LsqQuantizer(4, True, per_channel=True)
    q.init_from_(w)
    assert q.step.shape == (4,)
    torch.testing.assert_close(q.step.data, 2 * w.abs().mean((1, 2, 3)) / math.sqrt(7))
    w = w.requires_grad_()
    out = q(w)
    assert out.shape == w.shape and q.codes(w).shape == w.shape
    out.sum().backward()
    s = q.step.detach()[:, None, None, None]
    v = w.detach() / s
    ds = torch.where((v > -8) & (v < 7), -v + v.round(), torch.where(v >= 7, 7.0, -8.0))
    torch.testing.assert_close(q.step.grad, ds.sum((1, 2, 3)) / math.sqrt(12 * 7))  # N = 12 per channel


def test_lsq_init_formula():
    x = torch.tensor([[-1.0, 2.0], [0.5, -0.5]])
    for signed, q_p in ((True, 7), (False, 15)):
        q = LsqQuantizer(4, signed)
        q.init_from_(x)
        assert q.scale.item() == pytest.approx(2 * 1.0 / math.sqrt(q_p))


def test_lsq_activation_init_uses_only_the_first_batch():
    q = LsqQuantizer(2, None, role="activation")
    q.observe(torch.full((2, 3), 2.0))
    q.observe(torch.full((2, 3), -100.0))
    q.finish_observation_()
    assert q.signed is True  # signedness looks at every batch
    assert q.scale.item() == pytest.approx(2 * 2.0 / math.sqrt(1))


@given(huge=st.floats(1e3, 1e12))
def test_lsq_step_stays_positive_after_a_huge_update(huge):
    q = LsqQuantizer(4, True)
    q.set_step_(0.1)
    x = torch.tensor([0.0, 10.0, 20.0])  # 10, 20 above the range: ∂v̂/∂s = Q_P > 0
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    (huge * q(x).sum()).backward()
    opt.step()
    assert q.step.item() < -0.3  # the raw parameter was pushed far negative ...
    assert q.scale.item() == pytest.approx(STEP_EPS)  # ... the effective step was not
    opt.zero_grad()
    y = q(x)
    # The forward uses its own clamp, not q.scale: check the step it used, 10 and 20 sit at code Q_P.
    torch.testing.assert_close(y, torch.tensor([0.0, 7.0, 7.0]) * q.scale, rtol=1e-6, atol=0)
    y.sum().backward()
    g = 1 / math.sqrt(3 * 7)
    assert q.step.grad.item() == pytest.approx(g * (0 + 7 + 7), rel=1e-6)  # finite, so the step can recover


def test_clamp_min_ste_forward_is_the_bound_and_gradient_the_identity():
    bound = torch.tensor(STEP_EPS).item()  # the float32 value of 1e-8
    x = torch.tensor([-1e3, -1.0, -0.3, -0.2, -1e-9, 0.0, 5e-9, 2.0], requires_grad=True)
    y = clamp_min_ste(x, STEP_EPS)
    assert y.tolist() == [bound] * 7 + [2.0]  # exactly the bound: never 0, never 1.5e-8
    upstream = torch.arange(1.0, 9.0)
    (upstream * y).sum().backward()
    assert torch.equal(x.grad, upstream)


# LSQ at raw steps far below zero, where the old straight-through clamp gave a step of exactly 0.
# Inputs at the effective step s = 1e-8 (4-bit signed: Q_N = 8, Q_P = 7), with (∂v̂/∂v, ∂v̂/∂s) per input:
#   0 -> code 0 (1, -0 + 0); 2.6e-8 -> v = 2.6, code 3 (1, -2.6 + 3); 1.0 -> above (0, Q_P); -1.0 -> below (0, -Q_N)
NEG_STEP_INPUTS = [0.0, 2.6e-8, 1.0, -1.0]


@pytest.mark.parametrize("raw_step", [-0.3, -1.0, -1e3])
def test_lsq_negative_raw_step_forward_and_gradients_are_finite_and_exact(raw_step):
    q = LsqQuantizer(4, True)
    q.set_step_(0.1)
    q.step.data.fill_(raw_step)  # as an optimizer step would leave it
    s = q.scale.item()
    assert s == torch.tensor(STEP_EPS).item()
    x = torch.tensor(NEG_STEP_INPUTS, requires_grad=True)
    c = torch.tensor([0.5, 1.0, 1.5, 2.0])  # L = Σ c_i v̂_i
    y = q(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.tensor([0.0, 3.0, 7.0, -8.0]) * s, rtol=1e-6, atol=0)
    (c * y).sum().backward()
    assert torch.isfinite(q.step.grad).all() and torch.isfinite(x.grad).all()
    v = x.detach().double() / s
    ds = torch.tensor([0.0, (-v[1] + v[1].round()).item(), 7.0, -8.0], dtype=torch.float64)
    g = 1 / math.sqrt(4 * 7)
    assert q.step.grad.item() == pytest.approx(g * (c.double() * ds).sum().item(), rel=1e-5)
    torch.testing.assert_close(x.grad, c * torch.tensor([1.0, 1.0, 0.0, 0.0]))


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@given(values=st.lists(finite, min_size=1, max_size=24), step=st.floats(1e-3, 10.0),
       bits=st.sampled_from([2, 3, 4, 8]), signed=st.booleans(), cls=st.sampled_from(QUANTIZERS))
def test_codes_in_range_and_idempotent(values, step, bits, signed, cls):
    q = cls(bits, signed)
    q.set_step_(step)
    x = torch.tensor(values)
    codes = q.codes(x)
    assert codes.dtype == torch.int32
    assert codes.min() >= -q.q_n and codes.max() <= q.q_p
    y = q(x)
    torch.testing.assert_close(y, codes * q.scale, rtol=1e-6, atol=0)
    assert torch.equal(q(y), y)


@given(channels=st.integers(1, 5), rest=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       axis=st.integers(0, 1), cls=st.sampled_from(QUANTIZERS))
def test_per_channel_shapes(channels, rest, axis, cls):
    shape = [*rest]
    shape.insert(axis, channels)
    w = torch.randn(shape)
    q = cls(4, True, per_channel=True, channel_axis=axis)
    q.init_from_(w)
    assert q.scale.shape == (channels,) and (q.scale > 0).all()
    assert q(w).shape == w.shape and q.codes(w).shape == w.shape


def test_faq_activation_percentile_is_averaged_over_batches():
    q = FaqQuantizer(4, False, role="activation")
    assert q.percentile == 99.9
    a = torch.arange(1, 10001, dtype=torch.float32)  # nearest-rank 99.9th percentile = 9990
    q.observe(a.view(10, -1))
    q.observe(2 * a.view(10, -1))
    q.finish_observation_()
    assert q.scale.item() == pytest.approx((9990 + 2 * 9990) / 2 / 15)
    assert not q.step.requires_grad and "step" in dict(q.named_buffers())
    assert FaqQuantizer(8, False, role="activation").percentile == 99.99


def test_faq_weight_std_init_and_power_of_two():
    w = torch.randn(64, 8)
    sd = w.std(correction=0).item()
    q = FaqQuantizer(4, True)
    q.init_from_(w)
    assert q.scale.item() == pytest.approx(2 * 3.0 * sd / 2**4, rel=1e-5)  # [-3σ, 3σ] in 16 levels
    q2 = FaqQuantizer(2, True, std_multiple=1.5, power_of_two=True)
    q2.init_from_(w)
    assert q2.scale.item() == 2 ** math.ceil(math.log2(1.5 * sd)) / 2  # range rounded, then 2 steps per side
    pc = FaqQuantizer(8, True, per_channel=True)
    pc.init_from_(w)
    torch.testing.assert_close(pc.scale, 2 * 8.0 * w.std(1, correction=0) / 2**8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_faq_weight_step_splits_plus_minus_k_std_into_2_to_the_b_levels(bits):
    w = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # std exactly 1
    q = FaqQuantizer(bits, True, std_multiple=1.5)
    q.init_from_(w)
    step = 2 * 1.5 / 2**bits
    assert q.scale.item() == pytest.approx(step, rel=1e-6)
    # The 2^b levels tile [-kσ, kσ]: the lowest code sits on -kσ, the highest one step below +kσ.
    grid = torch.tensor([-1.5, 1.5 - step])
    assert q.codes(grid).tolist() == [-q.q_n, q.q_p]
    torch.testing.assert_close(q(grid), grid)


@pytest.mark.parametrize("role,signed,values,step", [
    # range 1.0 -> 1.0 (a power of two already): 16 levels over [-1, 1) is 1/8; rounding 1/7 gave 1/4
    ("weight", True, [-1.0, 1.0], 1 / 8),
    # range 0.9 -> 1: 1/8; rounding 0.9/7 gave 1/4
    ("weight", True, [-0.9, 0.9], 1 / 8),
    # activations, y_max = 1.0 (percentile 100): unsigned 16 levels over [0, 1) is 1/16; rounding 1/15 gave 1/8
    ("activation", False, [0.25, 1.0], 1 / 16),
    # signed activations, y_max = 1.0: 16 levels over [-1, 1) is 1/8; rounding 1/7 gave 1/4
    ("activation", True, [-1.0, 0.5], 1 / 8),
])
def test_faq_power_of_two_rounds_the_range_not_the_step(role, signed, values, step):
    q = FaqQuantizer(4, signed, role=role, std_multiple=1.0, percentile=100.0, power_of_two=True)
    q.init_from_(torch.tensor([values]))
    assert q.scale.item() == step
    rng = 2 ** math.ceil(math.log2(max(abs(v) for v in values)))
    assert q.scale.item() * (q.q_p + 1) == rng  # the rounded range holds exactly the 2^b levels


def test_faq_rescaled_step_keeps_the_range():
    # Weights: the same [-kσ, kσ] in 16 instead of 256 levels.
    q = FaqQuantizer(4, True)
    q.init_from_step_(torch.tensor(0.01), 127)
    assert q.scale.item() == pytest.approx(0.01 * 128 / 8)
    # Fixed-point activations: range 1 was 2^-8 at 8 bits, and is 2^-4 at 4 bits (rounding 17 · 2^-8 gave 2^-3).
    a = FaqQuantizer(4, False, role="activation", power_of_two=True)
    a.init_from_step_(torch.tensor(2.0**-8), 255)
    assert a.scale.item() == 2.0**-4
    # Plain activations keep the top code on the percentile: the step scales by Q_P.
    b = FaqQuantizer(4, False, role="activation")
    b.init_from_step_(torch.tensor(0.01), 255)
    assert b.scale.item() == pytest.approx(0.01 * 255 / 15)


def test_minmax_init_and_mse():
    q = MinMaxQuantizer(8, None, role="activation")  # signedness detected: -3.0 was seen
    q.observe(torch.tensor([[0.5, 2.0]]))
    q.observe(torch.tensor([[-3.0, 1.0]]))
    q.finish_observation_()
    assert q.signed is True and q.scale.item() == pytest.approx(3.0 / 127)

    w = torch.randn(256) ** 3  # heavy tails: clipping the outliers lowers the MSE at 2-bit
    plain, mse = MinMaxQuantizer(2, True), MinMaxQuantizer(2, True, mse=True)
    plain.init_from_(w)
    mse.init_from_(w)
    assert plain.scale.item() == pytest.approx(w.abs().max().item() / 1)
    assert mse.scale.item() < plain.scale.item()
    ratios = [mse.scale.item() / plain.scale.item() - f for f in MSE_FRACTIONS]
    assert min(abs(r) for r in ratios) < 1e-5
    assert (mse(w) - w).square().sum() <= (plain(w) - w).square().sum()


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_forward_before_calibration_raises(cls):
    q = cls(4, True)
    with pytest.raises(RuntimeError, match=r"calibrate_\(model, batches\)"):
        q(torch.randn(3))
    with pytest.raises(RuntimeError, match="calibrate_"):
        q.codes(torch.randn(3))


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_state_dict_round_trip_restores_step_signedness_and_flag(cls):
    q = cls(3, None, per_channel=True)
    q.init_from_(torch.randn(4, 5))
    fresh = cls(3, None, per_channel=True)
    fresh.load_state_dict(q.state_dict())
    assert fresh.signed is True and bool(fresh.initialized)
    x = torch.randn(4, 5)
    assert torch.equal(fresh(x), q(x))


def test_observe_mode_passes_inputs_through():
    q = LsqQuantizer(2, None, role="activation")
    q.observing = True
    x = torch.randn(2, 3)
    assert q(x) is x
    q.observing = False
    q.finish_observation_()
    assert q.signed == bool((x < 0).any())


def test_bad_quantizer_arguments():
    with pytest.raises(LowbitError, match="weights only"):
        LsqQuantizer(4, False, per_channel=True, role="activation")
    with pytest.raises(LowbitError, match="role"):
        LsqQuantizer(4, False, role="bias")
    with pytest.raises(LowbitError, match="percentile"):
        FaqQuantizer(4, False, role="activation", percentile=101)


def test_fake_quant_is_the_shared_function():
    x = torch.tensor([-1.0, 0.26, 5.0])
    s = torch.tensor(0.5)
    assert fake_quant(x, s, 2, 1).tolist() == [-1.0, 0.5, 0.5]
