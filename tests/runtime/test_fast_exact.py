"""The fast backend is bit-exact against the reference runtime: on real exports (embedded W4A4 resnet8, a mixed
4/2 plan, a torchvision-shaped residual net with max pool), on random full-range codes and exact ties, eager and
compiled, under every forced CPU capability (tests/runtime/conftest.py); a model it cannot take runs on the
reference with one warning."""

import importlib
import warnings

import pytest
import torch
from torch import nn

from lowbit.export.exporter import export_model
from lowbit.models import create_model
from lowbit.quant import Plan, calibrate_, quantize_
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import FastModel, available, compare, value_bounds

pytestmark = pytest.mark.skipif(not available(), reason="no oneDNN quantized ops in this PyTorch build")


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.randn(m.num_features, generator=g)
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.5
            m.running_var.data = torch.rand(m.num_features, generator=g) + 0.5
    return model


class _Block(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice, optional strided 1x1 downsample."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet18(nn.Module):
    """ResNet-18's stem (7x7/2 conv, 3x3/2 max pool), identity and downsampling blocks, global pool, fc."""

    def __init__(self, width=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(_Block(width, width, 1), _Block(width, width, 1))
        self.layer2 = nn.Sequential(_Block(width, 2 * width, 2), _Block(2 * width, 2 * width, 1))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


PIXELS1 = {"mean": 0.5, "std": 0.25}
PIXELS3 = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _export(model, path, plan, shape, pixels):
    torch.manual_seed(0)
    quantize_(model, plan(model) if callable(plan) else Plan.preset(plan, model))
    xs = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    calibrate_(model, [xs])
    return export_model(model.eval(), path, input_shape=shape, pixels=pixels).path


def _mixed_42(model):
    plan = Plan.preset("w4a4", model)
    return Plan({n: (2, 2) if n.startswith("layer2") or n.startswith("layer3") else b for n, b in plan.layers.items()})


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exact")
    return {
        "resnet8 w4a4": _export(_randomise_bn(create_model("resnet8", width=0.5)), tmp / "r8.lowbit", "w4a4",
                                (1, 28, 28), PIXELS1),
        "resnet8 mixed 4/2": _export(_randomise_bn(create_model("resnet8", width=0.5)), tmp / "r8m.lowbit",
                                     _mixed_42, (1, 28, 28), PIXELS1),
        "resnet18-shaped w4a4": _export(_randomise_bn(TinyResNet18()), tmp / "tv.lowbit", "w4a4", (3, 32, 32),
                                        PIXELS3),
        "resnet18-shaped, positive stem BN": _export(_positive_stem(_randomise_bn(TinyResNet18())), tmp / "tvp.lowbit",
                                                     "w4a4", (3, 32, 32), PIXELS3),
    }


def _positive_stem(model):
    """BN gammas > 0 in the stem: its requantization is non-decreasing, so the max pool runs on accumulators."""
    model.bn1.weight.data = model.bn1.weight.data.abs() + 0.1
    return model


def _pixels(shape, n=16, seed=1):
    x = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    x[:1], x[1:2] = 0, 255  # the ends of the input range
    return x


def _assert_exact(fast, ref, x):
    assert torch.equal(fast.run_int(x), ref.run_int(x))
    layers = compare(fast, ref, x[:4])
    assert layers and all(v["max_diff"] == 0 for v in layers.values()), layers


@pytest.mark.parametrize("name", ["resnet8 w4a4", "resnet8 mixed 4/2", "resnet18-shaped w4a4",
                                  "resnet18-shaped, positive stem BN"])
def test_real_exports_are_bit_exact(exports, name, capability):
    ref = IntegerModel.load(exports[name])
    fast = FastModel(ref, compile=False)
    assert fast.capability == capability and not fast.fallbacks
    assert {n.op for n in ref.nodes} >= ({"add", "adaptive_avgpool"} | ({"maxpool2d"} if "18" in name else set()))
    # 4-bit (and 2-bit) layers always take the int8 kernel; 8-bit first/last layers may not on AVX2
    narrow = [n.name for n in ref.nodes if n.op in ("conv2d", "linear") and n.attrs["w_bits"] <= 4]
    assert narrow and all(fast.paths[n] == "int8" for n in narrow)
    assert all(p == "int8" or p.startswith(("fp32", "fp64")) for p in fast.paths.values())
    assert bool(fast._deferred) == ("positive" in name and fast.paths["conv1"] == "int8")  # pool before requant
    _assert_exact(fast, ref, _pixels(ref.input_spec["shape"]))


def test_compiled_graph_is_bit_exact(exports):
    """The same arithmetic under torch.compile (Inductor), at two batch sizes: identical to the reference."""
    for name in ("resnet18-shaped, positive stem BN",):
        ref = IntegerModel.load(exports[name])
        fast = FastModel(ref, compile=True)
        for n in (1, 5):
            x = _pixels(ref.input_spec["shape"], n=n, seed=n)
            assert torch.equal(fast.run_int(x), ref.run_int(x))
            assert torch.equal(fast.run_int(x), ref.run_int(x))  # the compiled call again
        assert set(fast.compile_seconds) == {(1, *ref.input_spec["shape"]), (5, *ref.input_spec["shape"])}


def test_auto_compile_waits_until_eager_time_adds_up(exports, monkeypatch):
    monkeypatch.delenv("LOWBIT_COMPILE", raising=False)
    fast = FastModel(IntegerModel.load(exports["resnet8 w4a4"]))
    assert fast.compile == "auto"
    x = _pixels((1, 28, 28), n=2)
    fast.run_int(x), fast.run_int(x)
    assert not fast.compile_seconds  # a few fast eager calls: not worth a compile
    monkeypatch.setattr("lowbit.runtime.fastpath.AUTO_COMPILE_AFTER_S", 0.0)
    assert torch.equal(fast.run_int(x), fast.model.run_int(x)) and list(fast.compile_seconds) == [tuple(x.shape)]
    monkeypatch.setenv("LOWBIT_COMPILE", "0")
    assert FastModel(IntegerModel.load(exports["resnet8 w4a4"])).compile is False


def _worst_case(path, seed, ties=False):
    """The export with every weight replaced by random full-range codes of its width and random requantization
    constants (multipliers up to 2^31 of either sign, biases that move outputs across the code range), set on
    the loaded model (the reference and the fast backend read the same parameters); ``ties``: power-of-two
    multipliers and half-integer offsets, so many results are exact ties."""
    ref = IntegerModel.load(path)
    g = torch.Generator().manual_seed(seed)
    for node in ref.nodes:
        if node.op not in ("conv2d", "linear"):
            continue
        p, bits = ref.params[node.name], node.attrs["w_bits"]
        w = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), p["weight"].shape, generator=g, dtype=torch.int32)
        c = w.shape[0]
        if ties:
            m = torch.full((c,), 2**30, dtype=torch.int64)
            k = torch.randint(33, 36, (c,), generator=g)
            b = torch.randint(-8, 8, (c,), generator=g) * 2**33 + 2**32
        else:
            m = torch.randint(-(2**31) + 1, 2**31, (c,), generator=g, dtype=torch.int64)
            wide = node.attrs["hi"] > 255  # int32 outputs: large values (and int64 adds downstream)
            k = torch.randint(18, 26, (c,), generator=g) if wide else torch.randint(36, 44, (c,), generator=g)
            b = (torch.rand(c, generator=g, dtype=torch.float64) * 2 ** (k.double() + 3)).to(torch.int64)
        p.update(weight=w, multiplier=m.to(torch.int32), shift=k.to(torch.int8), bias=b)
    return ref


@pytest.mark.parametrize("ties", [False, True])
def test_random_full_range_codes_are_bit_exact(exports, capability, ties):
    for seed, name in enumerate(("resnet8 w4a4", "resnet18-shaped w4a4")):
        ref = _worst_case(exports[name], seed, ties)
        fast = FastModel(ref, compile=False)
        x = _pixels(ref.input_spec["shape"], n=8, seed=seed)
        want = ref.run_trace(x)
        assert ties or any(int(v.abs().max()) > 2**20 for k, v in want.items() if k != "logits")  # wide values
        assert ties or any(r.startswith("int64") for r in fast.requant.values())  # and the int64 arithmetic
        _assert_exact(fast, ref, x)


def test_bounds_contain_every_value(exports):
    ref = IntegerModel.load(exports["resnet18-shaped w4a4"])
    bounds = value_bounds(ref)
    for name, v in ref.run_trace(_pixels(ref.input_spec["shape"])).items():
        if name in bounds:
            lo, hi = bounds[name]
            assert lo <= int(v.min()) and int(v.max()) <= hi, name


def test_an_op_without_a_kernel_runs_on_the_reference_with_one_warning(exports, monkeypatch):
    registry = importlib.import_module("lowbit.ir.kernels")  # the module (lowbit.ir.kernels is also a function)
    monkeypatch.delitem(registry._KERNELS["cpu_fast"], "maxpool2d")
    ref = IntegerModel.load(exports["resnet18-shaped, positive stem BN"])  # its conv1 would pool accumulators
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = FastModel(ref)
    assert len(caught) == 1 and "no kernel for op(s) maxpool2d" in str(caught[0].message)
    assert len(str(caught[0].message).splitlines()) == 1
    assert fast.fallbacks == ["maxpool"] and not fast.compiled
    x = _pixels(ref.input_spec["shape"], n=4)
    assert torch.equal(fast.run_int(x), ref.run_int(x))
