"""Hypothesis properties every quantizer must keep, whatever the data, the precision or the training step."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.quant import FaqQuantizer, LsqQuantizer, MinMaxQuantizer
from lowbit.quant.ste import clamp_min_ste

BITS = st.sampled_from([2, 3, 4, 8])
# Magnitudes from 1e-6 to 1e3 with zeros mixed in: zero inputs are where a zero step turns into NaN.
VALUE = st.one_of(st.just(0.0), st.floats(-1e3, 1e3, allow_nan=False, width=32))
VALUES = st.integers(1, 16).flatmap(lambda n: st.lists(VALUE, min_size=2 * n, max_size=2 * n))  # two rows


def _calibrated(kind: str, bits: int, signed: bool, per_channel: bool, x: torch.Tensor):
    """A quantizer of each kind and option, initialised from ``x`` the way calibration does it."""
    kw = {"per_channel": per_channel}
    q = {
        "lsq": lambda: LsqQuantizer(bits, signed, **kw),
        "faq": lambda: FaqQuantizer(bits, signed, **kw),
        "faq-pow2": lambda: FaqQuantizer(bits, signed, power_of_two=True, **kw),
        "minmax": lambda: MinMaxQuantizer(bits, signed, **kw),
        "minmax-mse": lambda: MinMaxQuantizer(bits, signed, mse=True, **kw),
    }[kind]()
    q.init_from_(x)
    return q


KINDS = st.sampled_from(["lsq", "faq", "faq-pow2", "minmax", "minmax-mse"])


@given(values=VALUES, bits=BITS, signed=st.booleans(), per_channel=st.booleans(), kind=KINDS)
def test_calibrated_codes_in_range_forward_on_the_grid_and_idempotent(values, bits, signed, per_channel, kind):
    x = torch.tensor(values).view(2, -1)  # two channels along axis 0
    q = _calibrated(kind, bits, signed, per_channel, x)
    assert (q.scale > 0).all() and torch.isfinite(q.scale).all()
    codes = q.codes(x)
    assert codes.min() >= -q.q_n and codes.max() <= q.q_p
    y = q(x)
    assert torch.isfinite(y).all()
    scale = q.scale.view(-1, 1) if per_channel else q.scale
    torch.testing.assert_close(y, codes * scale, rtol=1e-6, atol=0)
    assert torch.equal(q(y), y)
    assert torch.equal(q.codes(y), codes)


@given(values=VALUES, bits=BITS, signed=st.booleans(), per_channel=st.booleans())
def test_faq_power_of_two_step_is_the_rounded_range_over_the_levels(values, bits, signed, per_channel):
    x = torch.tensor(values).view(2, -1)
    q = _calibrated("faq-pow2", bits, signed, per_channel, x)
    levels = q.q_p + 1  # 2^b levels over [-r, r) (signed) or [0, r) (unsigned)
    rows = x if per_channel else x.reshape(1, -1)
    ranges = (q.std_multiple * rows.std(1, correction=0)).tolist()  # the weight range k·std(w)
    covered = (q.scale * levels).reshape(-1).tolist()
    for r, c in zip(ranges, covered):
        if r / levels > 1e-6:  # (no spread: the step sits at its floor, there is no range to round)
            assert c == 2.0 ** math.ceil(math.log2(r))  # the smallest power of two holding the range


@given(raw=st.floats(-1e30, 1e30), bound=st.floats(1e-12, 1.0))
def test_clamp_min_ste_is_at_least_the_bound_and_passes_the_gradient(raw, bound):
    x = torch.tensor(raw, requires_grad=True)  # float32, as steps are
    y = clamp_min_ste(x, bound)
    assert y.item() == max(x.item(), torch.tensor(bound).item())  # exactly the clamp, in float32
    (3 * y).backward()
    assert x.grad.item() == 3.0


LOSS_SCALE = st.floats(1e-3, 1e12).flatmap(lambda m: st.sampled_from([m, -m]))


@given(values=VALUES, bits=BITS, signed=st.booleans(), per_channel=st.booleans(), loss_scale=LOSS_SCALE,
       optimizer=st.sampled_from(["sgd", "adam"]), role=st.sampled_from(["weight", "activation"]))
def test_lsq_step_used_by_forward_stays_positive_after_any_gradient_step(values, bits, signed, per_channel,
                                                                         loss_scale, optimizer, role):
    per_channel = per_channel and role == "weight"
    x = torch.tensor(values).view(2, -1)
    q = LsqQuantizer(bits, signed, per_channel=per_channel, role=role)
    q.init_from_(x)
    opt = (torch.optim.SGD(q.parameters(), lr=1.0) if optimizer == "sgd"
           else torch.optim.Adam(q.parameters(), lr=10.0))
    for _ in range(2):
        opt.zero_grad()
        (loss_scale * q(x).square().sum()).backward()
        assert q.step.grad.shape == q.step.shape and torch.isfinite(q.step.grad).all()
        opt.step()
    # The step forward really uses: an input far above the range lands on the top code, Q_P · s.
    probe = torch.full_like(x, 3e38)
    s_forward = q(probe)[:, 0] / q.q_p if per_channel else q(probe)[0, 0] / q.q_p
    assert (s_forward > 0).all()
    torch.testing.assert_close(s_forward, q.scale, rtol=1e-5, atol=0)
    xg = x.clone().requires_grad_()
    y = q(xg)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert xg.grad.shape == x.shape and torch.isfinite(xg.grad).all()
    assert torch.isfinite(q.step.grad).all()


@pytest.mark.parametrize("raw_step", [-0.3, -1.0, -1e3, -1e30])
def test_lsq_scale_and_forward_agree_for_any_raw_step(raw_step):
    q = LsqQuantizer(4, False, role="activation")
    q.set_step_(1.0)
    q.step.data.fill_(raw_step)
    y = q(torch.tensor([[0.0, 3e38]]))
    assert y[0, 0].item() == 0.0
    assert y[0, 1].item() == pytest.approx(15 * q.scale.item(), rel=1e-6)
