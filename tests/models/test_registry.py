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


def test_adapting_in_channels_takes_the_stem_and_keeps_its_scale():
    from lowbit.models.registry import _adapt_first_conv

    class Net(nn.Module):  # a direct-child conv after the stem's container: module order, not depth, decides
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3)), nn.ReLU())
            self.head = nn.Conv2d(8, 4, 1)

    m = Net()
    rgb = m.features[0][0].weight.detach().clone()
    _adapt_first_conv(m, 1)
    stem = m.features[0][0]
    assert stem.in_channels == 1 and m.head.in_channels == 8
    assert torch.allclose(stem.weight, rgb.sum(1, keepdim=True))  # a grey image gives the same output as RGB
    _adapt_first_conv(m, 5)
    assert m.features[0][0].weight.shape == (8, 5, 3, 3)


def test_torchvision_needs_torchvision(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as when it is not installed
    with pytest.raises(LowbitError, match="needs torchvision"):
        create_model("tv:resnet18")
    assert all(not n.startswith("tv:") for n in list_models())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_names_and_in_channels(arch):
    pytest.importorskip("torchvision")
    m = create_model(f"tv:{arch}", num_classes=5).eval()
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    grey = create_model(f"tv:{arch}", num_classes=5, in_channels=1).eval()
    assert grey(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    assert next(x for x in grey.modules() if isinstance(x, nn.Conv2d)).in_channels == 1


def test_torchvision_errors():
    pytest.importorskip("torchvision")
    assert "tv:<torchvision classification model>" in list_models()
    with pytest.raises(LowbitError, match="torchvision has no model 'resnet9'"):
        create_model("tv:resnet9")
    with pytest.raises(LowbitError, match="rejects option"):
        create_model("tv:resnet18", width=0.5)


def test_timm_models():
    pytest.importorskip("timm")
    m = create_model("timm:resnet18", num_classes=4).eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    grey = create_model("timm:resnet18", num_classes=4, in_channels=1).eval()
    assert grey(torch.randn(1, 1, 64, 64)).shape == (1, 4)
    assert "timm:<timm model>" in list_models()
    with pytest.raises(LowbitError, match="timm has no model"):
        create_model("timm:not_a_model")
    with pytest.raises(LowbitError, match="rejects option"):
        create_model("timm:resnet18", width=0.5)


def test_timm_needs_timm(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(LowbitError, match="needs timm"):
        create_model("timm:resnet18")
