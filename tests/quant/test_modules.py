import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant import FaqQuantizer, LsqQuantizer, MinMaxQuantizer, QuantConfig, QuantConv2d, QuantLinear


def _init(layer, x):
    if layer.weight_quantizer is not None:
        layer.weight_quantizer.init_from_(layer.weight.detach())
    if layer.input_quantizer is not None:
        layer.input_quantizer.init_from_(x)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, groups=2, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, dilation=2, groups=4, padding=2,
         padding_mode="reflect"),  # depthwise
])
def test_quant_conv_matches_manual_fake_quant(kwargs):
    conv = nn.Conv2d(**kwargs)
    q = QuantConv2d.from_float(conv, 4, 4)
    assert isinstance(q, nn.Conv2d) and q.weight is conv.weight and q.bias is conv.bias
    assert (q.stride, q.groups, q.dilation, q.padding_mode) == (conv.stride, conv.groups, conv.dilation,
                                                                conv.padding_mode)
    x = torch.randn(2, 4, 7, 7)
    _init(q, x)
    expected = conv._conv_forward(q.input_quantizer(x), q.weight_quantizer(conv.weight), conv.bias)
    torch.testing.assert_close(q(x), expected)
    assert q.input_quantizer.signed is True  # randn input has negatives


def test_quant_linear_on_sequence_input_and_weight_only():
    lin = nn.Linear(8, 5)
    q = QuantLinear.from_float(lin, 3, None, method="faq")
    assert isinstance(q, nn.Linear) and q.input_quantizer is None and (q.w_bits, q.a_bits) == (3, None)
    assert isinstance(q.weight_quantizer, FaqQuantizer) and q.method == "faq"
    x = torch.randn(2, 4, 8)
    _init(q, x)
    torch.testing.assert_close(q(x), F.linear(x, q.weight_quantizer(lin.weight), lin.bias))


@pytest.mark.parametrize("method,cls", [
    ("lsq", LsqQuantizer), ("faq", FaqQuantizer), ("minmax", MinMaxQuantizer),
])
def test_from_float_builds_the_configured_quantizers(method, cls):
    cfg = QuantConfig(method=method, per_channel=True, signed_inputs="unsigned")
    q = QuantConv2d.from_float(nn.Conv2d(3, 5, 1), 2, 8, cfg=cfg)
    assert type(q.weight_quantizer) is cls and type(q.input_quantizer) is cls
    assert q.weight_quantizer.signed is True and q.input_quantizer.signed is False
    assert q.weight_quantizer.per_channel and not q.input_quantizer.per_channel
    _init(q, torch.rand(1, 3, 4, 4))
    assert q.weight_quantizer.scale.shape == (5,)
    assert q.weight_quantizer.codes(q.weight).abs().max() <= 2


def test_method_argument_overrides_config_and_float_layers_have_no_quantizer():
    q = QuantLinear.from_float(nn.Linear(2, 2), None, None, method="minmax", cfg=QuantConfig(method="lsq"))
    assert q.method == "minmax" and q.weight_quantizer is None and q.input_quantizer is None
    x = torch.randn(3, 2)
    torch.testing.assert_close(q(x), F.linear(x, q.weight, q.bias))


def test_from_float_keeps_dtype_and_mode():
    lin = nn.Linear(3, 3).double().eval()
    q = QuantLinear.from_float(lin, 4, 4)
    assert not q.training and q.weight_quantizer.step.dtype == torch.float64


def test_from_float_rejects_other_modules():
    with pytest.raises(LowbitError, match="nn.Conv2d"):
        QuantConv2d.from_float(nn.Linear(2, 2), 4, 4)
    with pytest.raises(LowbitError, match="nn.Linear"):
        QuantLinear.from_float(nn.Conv2d(2, 2, 1), 4, 4)


def test_gradients_reach_weight_bias_and_steps():
    q = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, groups=1), 4, 4)
    x = torch.randn(2, 3, 6, 6)
    _init(q, x)
    q(x).square().mean().backward()
    for p in (q.weight, q.bias, q.weight_quantizer.step, q.input_quantizer.step):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_repr_names_bits():
    q = QuantLinear.from_float(nn.Linear(2, 3), 4, 8)
    assert "w_bits=4, a_bits=8, method=lsq" in repr(q)
