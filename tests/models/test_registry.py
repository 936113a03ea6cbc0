import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models import create_model, list_models

OURS = [n for n in list_models(include_external=False)]


@pytest.mark.parametrize("name", OURS)
def test_forward_backward(name):
    m = create_model(name, num_classes=10)
    x = torch.randn(3, 1, 28, 28)
    out = m(x)
    assert out.shape == (3, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_width_multiplier_scales_channels():
    small, big = create_model("resnet8", width=0.5), create_model("resnet8", width=2.0)
    assert small.fc.in_features == 32 and big.fc.in_features == 128


def test_resnet_depths():
    convs = {n: sum(isinstance(m, nn.Conv2d) for m in create_model(n).modules())
             for n in ("resnet8", "resnet14", "resnet20")}
    assert convs == {"resnet8": 9, "resnet14": 15, "resnet20": 21}  # 6n+1 convs + 2 downsample shortcuts


def test_unknown_model_and_bad_option():
    with pytest.raises(LowbitError, match="unknown model"):
        create_model("resnet9")
    with pytest.raises(LowbitError, match="takes no option"):
        create_model("mlp", width=2)


def test_torchvision_model_by_prefix():
    pytest.importorskip("torchvision")
    m = create_model("tv:resnet18", num_classes=7)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(LowbitError):
        create_model("tv:not_a_model")
