"""MACs measured by tracing, checked against hand-computed counts."""

import pytest
import torch
from torch import nn

from lowbit.cost import LayerInfo, profile_layers
from lowbit.errors import LowbitError


def _only(model, x) -> LayerInfo:
    (layer,) = profile_layers(model, x)
    return layer


def test_conv_with_stride_and_padding():
    # 32x32, k=3, s=2, p=1 -> 16x16; MACs = 16*16 * C_out 8 * C_in 3 * 3*3
    layer = _only(nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.randn(1, 3, 32, 32))
    assert layer.macs == 16 * 16 * 8 * 3 * 9 == 55296
    assert (layer.kind, layer.params, layer.groups, layer.calls) == ("conv", 8 * 3 * 9, 1, 1)
    assert layer.in_shape == (1, 3, 32, 32) and layer.out_shape == (1, 8, 16, 16)


def test_grouped_conv():
    # 10x10, k=3, p=1 -> 10x10; each output sees C_in/groups = 8/4 = 2 channels
    layer = _only(nn.Conv2d(8, 16, 3, padding=1, groups=4), torch.randn(1, 8, 10, 10))
    assert layer.macs == 10 * 10 * 16 * 2 * 9 == 28800
    assert layer.groups == 4


def test_depthwise_conv():
    # 10x10, k=3, no padding -> 8x8; one input channel per output
    layer = _only(nn.Conv2d(8, 8, 3, groups=8), torch.randn(1, 8, 10, 10))
    assert layer.macs == 8 * 8 * 8 * 1 * 9 == 4608


def test_rectangular_kernel_and_dilation():
    # 12x20, k=(3,5), dilation 2 -> (12-4)x(20-8) = 8x12
    layer = _only(nn.Conv2d(2, 4, (3, 5), dilation=2), torch.randn(1, 2, 12, 20))
    assert layer.macs == 8 * 12 * 4 * 2 * 15


def test_linear_on_features():
    assert _only(nn.Linear(20, 10), torch.randn(1, 20)).macs == 20 * 10


def test_linear_on_sequence_counts_every_token():
    layer = _only(nn.Linear(20, 10), torch.randn(1, 7, 20))
    assert layer.macs == 7 * 20 * 10
    assert layer.kind == "linear" and layer.out_shape == (1, 7, 10)


def test_batch_is_divided_out():
    assert _only(nn.Linear(20, 10), torch.randn(3, 7, 20)).macs == 7 * 20 * 10
    assert _only(nn.Conv2d(3, 8, 3), torch.randn(4, 3, 6, 6)).macs == 4 * 4 * 8 * 3 * 9


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.unused = nn.Linear(6, 6)

    def forward(self, x):
        return self.head(self.fc(self.fc(x)))


def test_layer_used_twice_counts_each_call():
    layers = profile_layers(_Shared(), torch.randn(1, 6))
    assert [layer.name for layer in layers] == ["fc", "head", "unused"]  # call order, then never called
    fc, head, unused = layers
    assert (fc.macs, fc.calls) == (2 * 36, 2)
    assert (head.macs, head.calls) == (12, 1)
    assert (unused.macs, unused.calls, unused.in_shape) == (0, 0, None)


class _QuantLinear(nn.Linear):
    """Stand-in for a quantized layer: a subclass is profiled like its base class."""


def test_subclasses_dict_inputs_and_modes_restored():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = _QuantLinear(4, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x, scale=1.0):
            return self.drop(self.q(x)) * scale

    net = Net().train()
    net.drop.eval()  # mixed modes must come back exactly
    (layer,) = profile_layers(net, {"x": torch.randn(1, 5, 4), "scale": 2.0})
    assert layer.name == "q" and layer.macs == 5 * 4 * 3
    assert net.training and net.q.training and not net.drop.training
    assert not net.q._forward_hooks


def test_roundtrip_dict():
    layer = _only(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8))
    assert LayerInfo.from_dict(layer.to_dict()) == layer


def test_errors():
    with pytest.raises(LowbitError, match="no nn.Conv2d or nn.Linear"):
        profile_layers(nn.ReLU(), torch.randn(1, 3))
    with pytest.raises(LowbitError, match="batch dimension"):
        profile_layers(nn.Linear(2, 2), {"x": 3})
