"""Export: runtime == simulation bit for bit, close to the fake-quant model, clear errors, packed sizes."""

import math

import pytest
import torch
from torch import nn

from lowbit.data import synthetic
from lowbit.deploy.verify import verify
from lowbit.errors import LowbitError
from lowbit.export.exporter import export_model, export_run, lower_model
from lowbit.export.lower import dyadic_affine
from lowbit.export.simulate import Simulation, normalize_pixels, round_half_even_div
from lowbit.models import create_model
from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
from lowbit.runtime.engine import IntegerModel
from lowbit.train import load_quantized_run

PIXELS = {"mean": 0.5, "std": 0.25}  # synthetic()'s normalisation


def _randomise_bn(model, seed=0):
    """Random BN statistics and affine, with negative gammas: folding must keep the sign."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.randn(c, generator=g)  # about half negative
            m.bias.data = torch.randn(c, generator=g) * 0.5
            m.running_mean.data = torch.randn(c, generator=g) * 0.3
            m.running_var.data = torch.rand(c, generator=g) + 0.5
    return model


def _quantized(model, plan, per_channel=False, shape=(1, 28, 28), n=32):
    quantize_(model, plan, QuantConfig(per_channel=per_channel))
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    calibrate_(model, [x])
    return model.eval()


def test_trained_model_runtime_equals_simulation_and_tracks_fake_quant(quantized_run, tmp_path):
    result = export_run(quantized_run, tmp_path / "m.lowbit")
    runtime = IntegerModel.load(result.path)
    test = synthetic().test
    report = verify(runtime, test.images, test.labels, simulation=Simulation(result.lowered),
                    fake_quant=result.lowered.model)
    assert report["simulation"]["bit_exact"] and report["simulation"]["max_logit_diff"] == 0
    fq = report["fake_quant"]
    assert fq["top1_agreement_with_runtime"] >= 0.99
    assert abs(fq["accuracy_delta_pt"]) <= 1.0  # 128 images: one flip is 0.8 pt
    assert report["runtime"]["accuracy"] > 0.5  # the tiny model did learn
    # the fake-quant model as the run itself evaluates it
    model, _ = load_quantized_run(quantized_run)
    with torch.no_grad():
        logits = model.eval()(normalize_pixels(test.images, [0.5], [0.25]))
    assert torch.equal(logits.argmax(1), result.lowered.model(normalize_pixels(test.images, [0.5], [0.25])).argmax(1))
    assert result.ratio > 2  # a 20k-parameter model: the manifest is a good part of the file
    weights = {k: v for k, v in runtime.manifest["tensors"].items() if k.endswith(".weight")}
    packed = sum(math.ceil(math.prod(e["shape"]) * e["bits"] / 8) for e in weights.values())
    params = sum(math.prod(e["shape"]) for e in weights.values())
    assert packed < params * 4.5 / 8  # 4-bit codes, 8-bit first and last layers


@pytest.mark.parametrize("per_channel", [False, True])
def test_mixed_plan_negative_gammas_bit_exact(per_channel, tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(create_model("resnet8", width=0.5))
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bits = [8, 2, 3, 4, 2, 4, 3, 2, 4, 8]
    plan = Plan({n: (b, b) for n, b in zip(names, bits)})
    model = _quantized(model, plan, per_channel)
    result = export_model(model, tmp_path / "m.lowbit", input_shape=(1, 28, 28), pixels=PIXELS)
    runtime = IntegerModel.load(result.path)
    for name, bits_ in zip(names, bits):
        entry = runtime.manifest["tensors"][f"{name}.weight"]
        assert entry["bits"] == bits_ and entry["dtype"] == "uint8"  # packed at the plan's width
    mults = torch.cat([runtime.params[n]["multiplier"] for n in names[:-1]])
    assert (mults < 0).any()  # negative gammas kept their sign in the multiplier
    x = torch.randint(0, 256, (24, 1, 28, 28), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    ref = runtime.run_int(x)
    assert torch.equal(ref.to(torch.int64), Simulation(result.lowered).run_int(x))
    fq = result.lowered.model(normalize_pixels(x, [0.5], [0.25])).detach()
    got = runtime(x)
    assert (got - fq).abs().max() <= 1e-3 * fq.abs().max()  # codes differ only at near-ties


def test_mlp_and_float_input(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", hidden=32)
    model = _quantized(model, "w4a4")
    result = export_model(model, tmp_path / "mlp.lowbit", input_shape=(1, 28, 28))  # float input: no LUT
    runtime = IntegerModel.load(result.path)
    assert runtime.manifest["input"]["dtype"] == "float32" and "lut" not in runtime.params["quantize_input"]
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert torch.equal(runtime.run_int(x).to(torch.int64), Simulation(result.lowered).run_int(x))
    assert (runtime(x) - model(x).detach()).abs().max() <= 1e-3 * model(x).abs().max()
    with pytest.raises(LowbitError, match="float input"):
        runtime(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


class _Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.Sigmoid()
        self.fc = nn.Linear(4 * 26 * 26, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


class _PreBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(self.bn(x)), 1))


@pytest.mark.parametrize("make,plan,match", [
    (_Sigmoid, "w4a4", r"layer 'act' \(Sigmoid\) is not supported"),
    (_PreBN, "w4a4", r"batch norm 'bn' cannot be folded"),
    (lambda: create_model("resnet8", width=0.5), {"conv1": (8, 8)}, r"layer 'layer1.0.conv1' is a float Conv2d"),
])
def test_unsupported_layers_are_named(make, plan, match):
    model = make()
    plan = Plan.preset(plan, model) if isinstance(plan, str) else Plan(plan)
    model = _quantized(model, plan)
    with pytest.raises(LowbitError, match=match):
        lower_model(model, (1, 28, 28), PIXELS)


def test_round_half_even_div_matches_fractions():
    from fractions import Fraction

    g = torch.Generator().manual_seed(4)
    v = torch.cat([torch.randint(-(2**62), 2**62, (2000,), generator=g), torch.arange(-64, 65)])
    for k in (0, 1, 3, 17, 40, 62):
        got = round_half_even_div(v, torch.tensor(k))
        assert got.tolist() == [round(Fraction(int(a), 2**k)) for a in v.tolist()]


def test_dyadic_affine_tiny_and_zero_gains():
    gain = torch.tensor([0.01, -3e-12, 0.0, 1e-40, 2.5], dtype=torch.float64)
    offset = torch.tensor([3.5, 100.0, -7.25, 0.0, 1e5], dtype=torch.float64)
    m, k, b = dyadic_affine(gain, offset)
    assert (m.abs() < 2**31).all() and (k >= 0).all() and (k <= 62).all() and (b.abs() <= 2**61).all()
    for i in range(len(gain)):
        assert math.isclose(int(m[i]) * 2.0 ** -int(k[i]), float(gain[i]), rel_tol=2**-30, abs_tol=2.0 ** -int(k[i]))
        assert int(b[i]) == round(float(offset[i]) * 2 ** int(k[i]))


def test_torchvision_resnet18_bit_exact(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomise_bn(tv.models.resnet18(weights=None, num_classes=10))
    model = _quantized(model, "w4a4", shape=(3, 64, 64), n=4)
    pixels = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    result = export_model(model, tmp_path / "r18.lowbit", input_shape=(3, 64, 64), pixels=pixels)
    runtime = IntegerModel.load(result.path)
    ops = {n.op for n in runtime.nodes}
    assert {"maxpool2d", "adaptive_avgpool", "add", "flatten", "linear"} <= ops
    x = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    assert torch.equal(runtime.run_int(x).to(torch.int64), Simulation(result.lowered).run_int(x))
    assert result.ratio > 6  # W4A4 resnet18: weights 4-bit but the 8-bit stem and classifier
