"""The quantizers' bits are tensors: one compiled graph serves every precision plan, and eager stays bit-identical.

Dynamo is run with the ``eager`` backend (tracing and guards only, no Inductor): recompiles are decided by the
guards, so this checks plan independence in seconds.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from lowbit.models import create_model
from lowbit.quant import LsqQuantizer, Plan, QuantConfig, build_quantized, calibrate_, quantize_
from lowbit.quant.quantizers import _broadcast, fake_quant
from lowbit.quant.ste import clamp_min_ste, grad_scale


def _quantized(base, plan, x, method="lsq"):
    m = copy.deepcopy(base)
    quantize_(m, plan, QuantConfig(method=method))
    calibrate_(m, [x])
    return m.train()


def _mixed(plan: Plan) -> Plan:
    return Plan({n: b if i % 2 or b[0] == 8 else (2, 3) for i, (n, b) in enumerate(plan.layers.items())})


@pytest.mark.parametrize("method", ["lsq", "faq"])
def test_another_plan_reuses_the_compiled_graph(method):
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = create_model("resnet8", width=0.25)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    w4 = Plan.preset("w4a4", base)
    counters.clear()
    for plan in (w4, _mixed(w4), Plan.preset("w2a2", base)):
        m = _quantized(base, plan, x, method)
        F.cross_entropy(torch.compile(m, backend="eager")(x), y).backward()
    assert counters["stats"]["unique_graphs"] == 1  # traced once: bits and signedness are buffer values
    assert not counters["recompiles"]


def test_range_buffers_follow_bits_signedness_and_state_dict_loads():
    q = LsqQuantizer(3, None, role="activation")
    q.init_from_(torch.rand(8, 5))  # no negative value: unsigned
    assert (q.q_min.item(), q.q_max.item()) == (0, 7)
    assert "q_min" not in q.state_dict() and "q_max" not in q.state_dict()  # checkpoint keys as before
    signed = LsqQuantizer(3, None, role="activation")
    signed.init_from_(torch.randn(8, 5))
    fresh = LsqQuantizer(3, None, role="activation")
    fresh.load_state_dict(signed.state_dict())
    assert (fresh.q_min.item(), fresh.q_max.item()) == (-4, 3)


def test_old_checkpoint_state_dict_builds_the_same_model():
    """A state dict without the range buffers (as older lowbit wrote it) loads strictly, with the right ranges."""
    torch.manual_seed(0)
    base = create_model("resnet8", width=0.25)
    x = torch.randn(4, 1, 28, 28)
    plan = _mixed(Plan.preset("w4a4", base))
    m = _quantized(base, plan, x)
    old = {k: v for k, v in m.state_dict().items() if not k.endswith(("q_min", "q_max"))}
    assert old.keys() == m.state_dict().keys()
    again = build_quantized(copy.deepcopy(base), plan, QuantConfig(), old)
    assert torch.equal(again.eval()(x), m.eval()(x))


def _baked_lsq(q: LsqQuantizer, x: torch.Tensor) -> torch.Tensor:
    """LSQ forward with the bits as Python constants: how the quantizers computed it before the buffers."""
    n = (x[0].numel() if x.dim() > 1 else x.numel()) if q.role == "activation" else x.numel() // q.step.numel()
    s = grad_scale(clamp_min_ste(q.step, q._eps()), 1.0 / math.sqrt(n * q.q_p))
    return fake_quant(x, _broadcast(s, x, q.channel_axis), q.q_n, q.q_p)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("role,per_channel", [("weight", False), ("weight", True), ("activation", False)])
def test_buffers_give_bit_identical_values_and_gradients(bits, role, per_channel):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 8, 5, 5, generator=g)
    q = LsqQuantizer(bits, True if role == "weight" else None, per_channel, role=role)
    q.init_from_(x)
    w = torch.randn(x.shape, generator=g)
    results = []
    for forward in (q, lambda v: _baked_lsq(q, v)):
        q.zero_grad()
        xi = (1.1 * x).requires_grad_(True)
        y = forward(xi)
        (y * w).sum().backward()
        results.append((y.detach(), xi.grad, q.step.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_gradient_scale_from_the_buffer_rounds_like_the_python_float():
    x = torch.randn(1000)
    for q_p in (1, 3, 7, 15, 127, 255):
        for n in (1, 9, 288, 784, 4096, 50176, 802816, 12845056):
            g_float = 1.0 / math.sqrt(n * q_p)
            g_tensor = torch.reciprocal(torch.sqrt(torch.tensor(float(q_p)).double() * n)).float()
            assert torch.equal(x * g_float, x * g_tensor)
