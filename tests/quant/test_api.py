import copy
import json
import math

import pytest
import torch
from torch import nn

from lowbit import io
from lowbit.errors import LowbitError
from lowbit.quant import (
    LsqQuantizer,
    Plan,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    build_quantized,
    calibrate_,
    plan_of,
    quant_layers,
    quantize_,
    reset_layer_,
)


def depthwise_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.ReLU(),   # grouped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


class MlpBlock(nn.Module):
    """Attention-free transformer block: x + fc2(gelu(fc1(LN(x)))), then a linear head."""

    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d)})
        self.head = nn.Linear(d, 2)

    def forward(self, x):  # [B, T, 5]
        h = self.embed(x)
        h = h + self.mlp["fc2"](nn.functional.gelu(self.mlp["fc1"](self.norm(h))))
        return self.head(h)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def tiny_resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), BasicBlock(4, 8, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _check_quantized_and_trainable(model, x, n_layers):
    y_fp = model(x)
    quantize_(model, Plan.preset("w4a4", model))
    assert len(quant_layers(model)) == n_layers
    calibrate_(model, [x])
    y = model(x)
    assert y.shape == y_fp.shape
    y.square().mean().backward()
    for layer in quant_layers(model).values():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        for q in (layer.weight_quantizer, layer.input_quantizer):
            assert q.step.grad is not None and torch.isfinite(q.step.grad)


def test_quantize_grouped_and_depthwise_cnn():
    model = depthwise_cnn()
    _check_quantized_and_trainable(model, torch.randn(2, 3, 8, 8), 4)
    assert isinstance(model[3], QuantConv2d) and model[3].groups == 8 and model[5].groups == 2


def test_quantize_transformer_style_block():
    model = MlpBlock()
    _check_quantized_and_trainable(model, torch.randn(2, 4, 5), 4)
    assert isinstance(model.mlp["fc1"], QuantLinear)
    fc1 = model.mlp["fc1"].input_quantizer
    assert fc1.signed is True  # LayerNorm output: signed, detected at calibration


def test_quantize_torchvision_style_resnet():
    model = tiny_resnet()
    _check_quantized_and_trainable(model, torch.randn(2, 3, 8, 8), 5)
    assert plan_of(model).layers["2.downsample.0"] == (4, 4)


def test_quantize_torchvision_resnet18():
    models = pytest.importorskip("torchvision.models")
    model = models.resnet18(num_classes=10)
    quantize_(model, "w4a4")
    layers = quant_layers(model)
    assert len(layers) == 21 and layers["conv1"].w_bits == 8 and layers["fc"].a_bits == 8
    assert layers["layer1.0.conv1"].w_bits == 4
    calibrate_(model, [torch.randn(2, 3, 32, 32)])
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)  # batch 1: BN needs eval mode
    assert layers["conv1"].input_quantizer.signed and not layers["layer1.0.conv2"].input_quantizer.signed


def test_quantize_validates_before_changing_anything():
    model = depthwise_cnn()
    with pytest.raises(LowbitError, match="unknown layer 'missing'"):
        quantize_(model, {"0": (4, 4), "missing": (4, 4)})
    assert not quant_layers(model)
    quantize_(model, {"0": (4, 4), "3": (None, None)})
    assert list(quant_layers(model)) == ["0"] and type(model[3]) is nn.Conv2d
    with pytest.raises(LowbitError, match="already quantized: 0"):
        quantize_(model, {"0": (2, 2)})
    with pytest.raises(LowbitError, match="model object itself"):
        quantize_(nn.Linear(2, 2), {"": (4, 4)})


def test_calibrate_before_forward_and_restores_modes():
    model = depthwise_cnn()
    quantize_(model, "w8a8")
    with pytest.raises(RuntimeError, match="calibrate_"):
        model(torch.randn(1, 3, 8, 8))
    model.train()
    model[1].eval()  # e.g. a frozen BatchNorm
    calibrate_(model, [(torch.randn(2, 3, 8, 8), torch.zeros(2))])
    assert model.training and not model[1].training
    assert all(bool(q.initialized) for layer in quant_layers(model).values()
               for q in (layer.weight_quantizer, layer.input_quantizer))


def test_calibrate_errors():
    with pytest.raises(LowbitError, match="quantize_"):
        calibrate_(depthwise_cnn(), [torch.randn(1, 3, 8, 8)])
    model = quantize_(depthwise_cnn(), "w4a4")
    with pytest.raises(LowbitError, match="at least one batch"):
        calibrate_(model, [])
    model = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
    model.forward = lambda x: model["used"](x)
    quantize_(model, {"used": (4, 4), "unused": (4, 4)})
    with pytest.raises(LowbitError, match="never ran during calibration: unused"):
        calibrate_(model, [torch.randn(3, 2)])


def test_calibration_observes_the_unquantized_network():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [torch.randn(5, 4), 3 * torch.randn(5, 4)]
    with torch.no_grad():
        hidden = [model[1](model[0](b)) for b in batches]
    lsq = copy.deepcopy(model)
    quantize_(lsq, {"2": (4, 4)})
    calibrate_(lsq, batches)
    q = lsq[2].input_quantizer
    assert q.signed is False
    torch.testing.assert_close(q.scale, 2 * hidden[0].abs().mean() / math.sqrt(15))  # first batch only

    faq = copy.deepcopy(model)
    quantize_(faq, {"0": (4, 4), "2": (4, 4)}, QuantConfig(method="faq", faq_percentiles={4: 50.0}))
    calibrate_(faq, batches)
    expected = sum(h.flatten().kthvalue(15).values for h in hidden) / 2 / 15  # 50th pct of 30 values
    torch.testing.assert_close(faq[2].input_quantizer.scale, expected)
    assert faq[0].input_quantizer.signed is True

    mm = copy.deepcopy(model)
    quantize_(mm, {"2": (8, 8)}, {"method": "minmax"})
    calibrate_(mm, batches)
    torch.testing.assert_close(mm[2].input_quantizer.scale, max(h.max() for h in hidden) / 255)


def test_signed_inputs_override():
    model = quantize_(nn.Sequential(nn.Linear(2, 2)), {"0": (4, 4)}, QuantConfig(signed_inputs="unsigned"))
    calibrate_(model, [torch.randn(4, 2)])
    assert model[0].input_quantizer.signed is False


def test_reset_layer_rescales_or_recalibrates():
    model = depthwise_cnn()
    quantize_(model, "w4a4")
    x = torch.randn(2, 3, 8, 8)
    calibrate_(model, [x])
    layer = model[3]
    old_in, old_w = layer.input_quantizer, layer.weight_quantizer
    reset_layer_(layer, 2, 2)
    assert (layer.w_bits, layer.a_bits) == (2, 2) and layer.input_quantizer is not old_in
    torch.testing.assert_close(layer.input_quantizer.scale, old_in.scale * math.sqrt(15 / 3))
    expected_w = 2 * layer.weight.detach().abs().mean() / math.sqrt(1)
    torch.testing.assert_close(layer.weight_quantizer.scale, expected_w)
    assert layer.weight_quantizer.step is not old_w.step
    assert layer.input_quantizer.signed is False  # kept from the old quantizer
    assert plan_of(model).layers["3"] == (2, 2)

    inputs = torch.rand(2, 8, 4, 4)
    reset_layer_(layer, 2, 4, [inputs])
    torch.testing.assert_close(layer.input_quantizer.scale, 2 * inputs.abs().mean() / math.sqrt(15))

    reset_layer_(layer, 4, 8, [x], model=model)
    assert layer.input_quantizer.scale > 0 and model(x).shape == (2, 3)

    reset_layer_(layer, 4, None)
    assert layer.input_quantizer is None
    with pytest.raises(LowbitError, match="pass batches"):
        reset_layer_(layer, 4, 4)
    with pytest.raises(LowbitError, match="unsupported bits"):
        reset_layer_(layer, 5, 4)
    with pytest.raises(LowbitError, match="QuantConv2d or QuantLinear"):
        reset_layer_(nn.Linear(2, 2), 4, 4)


def test_reset_layer_faq_rescales_linearly():
    model = quantize_(nn.Sequential(nn.Linear(3, 3)), {"0": (8, 8)}, QuantConfig(method="faq"))
    calibrate_(model, [torch.rand(4, 3)])
    old = model[0].input_quantizer.scale
    reset_layer_(model[0], 4, 4)
    torch.testing.assert_close(model[0].input_quantizer.scale, old * 255 / 15)


@pytest.mark.parametrize("init", ["percentile", "mse"])
def test_reset_layer_rescales_range_inits_linearly(init):
    """percentile and mse divide a range into Q_P steps: a step rescaled without batches lands near the one
    calibration at the new bits gives (sqrt scaling put it 4.6-8x too small at 8 -> 2 bits)."""
    torch.manual_seed(0)
    batches = [torch.relu(torch.randn(64, 16)) for _ in range(5)]
    config = QuantConfig(activation_init=init)
    steps = {}
    for bits in (8, 2):
        model = quantize_(nn.Sequential(nn.Linear(16, 4)), {"0": (bits, bits)}, config)
        calibrate_(model, batches)
        steps[bits] = model[0].input_quantizer.scale
    model = quantize_(nn.Sequential(nn.Linear(16, 4)), {"0": (8, 8)}, config)
    calibrate_(model, batches)
    reset_layer_(model[0], 2, 2)
    torch.testing.assert_close(model[0].input_quantizer.scale, steps[8] * 255 / 3)
    assert 0.4 < float(steps[2] / model[0].input_quantizer.scale) < 2.5


def test_build_quantized_round_trip(tmp_path):
    torch.manual_seed(1)
    model = tiny_resnet()
    plan, config = Plan.preset("w4a4", model), QuantConfig(per_channel=True)
    quantize_(model, plan, config)
    x = torch.randn(2, 3, 8, 8)
    calibrate_(model, [x])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(x).square().mean().backward()
    opt.step()  # steps now differ from any re-calibration
    model.eval()
    io.save_checkpoint(tmp_path / "q.pt", {"state_dict": model.state_dict(), "plan": plan.to_dict(),
                                           "config": json.loads(json.dumps(config.to_dict()))})
    ckpt = io.load_checkpoint(tmp_path / "q.pt")
    rebuilt = build_quantized(tiny_resnet(), Plan.from_dict(ckpt["plan"]), ckpt["config"], ckpt["state_dict"])
    rebuilt.eval()
    assert torch.equal(rebuilt(x), model(x))
    assert rebuilt[0].weight_quantizer.step.shape == (4,)
    with pytest.raises(LowbitError, match="state dict does not match"):
        build_quantized(tiny_resnet(), Plan.preset("fp32", model), config, ckpt["state_dict"])


def test_short_finetune_lowers_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(32, 1, 6, 6)
    y = (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long()  # top half brighter than bottom
    quantize_(model, Plan.preset("w4a4", model))
    calibrate_(model, [x[:16]])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        before = loss_fn(model(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn(model(x), y).item()
    assert after < 0.8 * before
    assert all(layer.input_quantizer.scale > 0 for layer in quant_layers(model).values())


def test_quant_config_validation_and_round_trip():
    cfg = QuantConfig(method="faq", faq_percentiles={"4": 99.5}, faq_weight_std_multiple={2: 1.5})
    assert cfg.faq_percentiles == {4: 99.5}
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, match in [({"method": "pact"}, "unknown quantization method"),
                       ({"signed_inputs": "maybe"}, "signed_inputs"),
                       ({"per_channel": "yes"}, "per_channel"),
                       ({"faq_percentiles": {5: 99.0}}, "key 5"),
                       ({"faq_percentiles": {4: 120}}, r"faq_percentiles\[4\]"),
                       ({"faq_weight_std_multiple": {4: -1}}, "std_multiple")]:
        with pytest.raises(LowbitError, match=match):
            QuantConfig(**bad)
    with pytest.raises(LowbitError, match="unknown quantization config keys"):
        QuantConfig.from_dict({"bits": 4})


def test_lsq_quantizer_is_used_by_default():
    model = quantize_(nn.Sequential(nn.Linear(2, 2)), {"0": (4, 4)})
    assert isinstance(model[0].weight_quantizer, LsqQuantizer)
