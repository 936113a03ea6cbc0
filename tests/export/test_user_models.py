"""CNNs written the way users write them (functional pools, views with sizes taken from the tensor, cat,
upsampling, grouped and depthwise convs, ReLU6/hardtanh, residual adds), defined here and not in the registry:
quantize_ -> calibrate_ -> export -> reference runtime bit-exact with the simulation, close to the fake-quant
model, on the fast path under every CPU capability and in onnxruntime; unsupported code is one line naming the
op and the user's source line."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.exporter import export_model, lower_model
from lowbit.export.lower import Rep
from lowbit.export.simulate import Simulation, normalize_pixels
from lowbit.ir.format import read_model, write_model
from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import CAPABILITIES, FastModel, available, compare, forced_capability
from lowbit.runtime.gpu import GpuModel

PIXELS = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.3, 0.2]}
SHAPE = (3, 16, 16)


class FunctionalNet(nn.Module):
    """LeNet style: functional ReLU/ReLU6 and pools (a window from the tensor's size), ``x.view(x.size(0), -1)``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.relu6(self.conv2(x)), x.size(3) // 4)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class GroupedNet(nn.Module):
    """MobileNet style: BN + ``nn.ReLU6``, a depthwise and a grouped conv, hardtanh, ``x.mean((2, 3))``."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1, groups=2)
        self.act = nn.ReLU6(inplace=True)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.act(self.bn0(self.stem(x)))
        x = nn.functional.relu(self.bn1(self.dw(x)))
        x = F.hardtanh(self.pw(x), 0.0, 3.0)
        return self.fc(x.mean((2, 3)))


class UNetish(nn.Module):
    """Encoder-decoder: nearest upsampling (functional and ``nn.Upsample``), ``torch.cat`` along channels of a
    value read twice, a standalone ReLU6 after a pool, ``x.reshape(x.shape[0], -1)``."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.up = nn.Upsample(scale_factor=2)
        self.head = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = F.relu(self.enc(x))
        b = F.hardtanh(self.down(a))
        u = F.interpolate(b, size=a.shape[-2:], mode="nearest")
        y = self.mix(torch.cat([a, u], dim=1))
        y = self.up(F.relu6(F.max_pool2d(y, 2)))
        y = F.adaptive_avg_pool2d(F.relu(self.head(y)), 1)
        return self.fc(y.reshape(y.shape[0], -1))


class Block(nn.Module):
    def __init__(self, c, functional_add):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.functional_add = functional_add

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.functional_add:
            return F.relu6(torch.add(out, x))
        out += x
        return F.relu(out)


class ResidualNet(nn.Module):
    """ResNet style: ``out += x`` and ``torch.add``, ``nn.AvgPool2d`` with padding, ``x.mean(dim=(-2, -1),
    keepdim=True)`` and ``torch.flatten``."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block1, self.block2 = Block(8, False), Block(8, True)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block1(F.relu(self.bn(self.stem(x))))
        x = self.block2(self.pool(x))
        x = x.mean(dim=(-2, -1), keepdim=True)
        return self.fc(torch.flatten(x, 1))


class TvBlock(nn.Module):
    """torchvision's BasicBlock: one ``nn.ReLU`` module called twice, a strided conv + BN downsample."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TorchvisionStyleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        self.layer1 = TvBlock(8, 16, 2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(16, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layer1(x))
        return self.fc(torch.flatten(x, 1))


class ClampedResidualNet(nn.Module):
    """ReLU6 that binds on wide values: a conv output read twice, a residual add (fused in the fast path's int8
    kernel) and the input of an average pool, where no requantization to codes would clamp it again."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn, self.fc = nn.BatchNorm2d(8), nn.Linear(8 * 8 * 8, 10)
        with torch.no_grad():
            self.conv1.weight.mul_(10)  # outputs well past 6

    def forward(self, x):
        y = F.relu6(self.conv1(x))
        y = F.relu6(self.bn(self.conv2(y)) + y)
        return self.fc(F.avg_pool2d(y, 2).flatten(1))


MODELS = {
    FunctionalNet: {"maxpool2d", "avgpool2d", "flatten"},
    GroupedNet: {"adaptive_avgpool", "flatten"},
    UNetish: {"upsample_nearest", "concat", "requantize", "clamp", "maxpool2d", "adaptive_avgpool", "flatten"},
    ResidualNet: {"add", "avgpool2d", "adaptive_avgpool", "flatten"},
    ClampedResidualNet: {"add", "avgpool2d", "flatten"},
    TorchvisionStyleNet: {"maxpool2d", "add", "adaptive_avgpool", "flatten"},
}


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.randn(c, generator=g)
            m.bias.data = torch.randn(c, generator=g) * 0.5
            m.running_mean.data = torch.randn(c, generator=g) * 0.3
            m.running_var.data = torch.rand(c, generator=g) + 0.5
    return model


def _quantized(model, plan="w4a4", per_channel=False, pixels=True):
    """quantize_ then calibrate_ on what the model sees: normalised pixels, or float input."""
    torch.manual_seed(0)
    quantize_(model, Plan.preset(plan, model) if isinstance(plan, str) else plan, QuantConfig(per_channel=per_channel))
    calibrate_(model, [_model_input(_pixels(64, seed=1), pixels)])
    return model.eval()


def _pixels(n, seed):
    return torch.randint(0, 256, (n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _model_input(x, pixels):
    return normalize_pixels(x, PIXELS["mean"], PIXELS["std"]) if pixels else x.float() / 64 - 2


def _export(model, tmp_path, pixels=True):
    return export_model(model, tmp_path / "m.lowbit", input_shape=SHAPE, pixels=PIXELS if pixels else None)


@pytest.mark.parametrize("make", list(MODELS), ids=lambda m: m.__name__)
def test_user_cnn_bit_exact_and_tracks_fake_quant(make, tmp_path):
    torch.manual_seed(0)
    pixels = make is not UNetish  # one model on float input
    model = _quantized(_randomise_bn(make()), per_channel=make is GroupedNet, pixels=pixels)
    result = _export(model, tmp_path, pixels)
    runtime = IntegerModel.load(result.path)
    assert MODELS[make] <= {n.op for n in runtime.nodes}
    x = _pixels(96, seed=2) if pixels else _pixels(96, seed=2).float() / 64 - 2
    got = runtime.run_int(x).to(torch.int64)
    assert torch.equal(got, Simulation(result.lowered).run_int(x))
    assert torch.equal(GpuModel(runtime, emulate=True).run_int(x).to(torch.int64), got)  # new ops: reference code
    with torch.no_grad():
        fq = model(_model_input(_pixels(96, seed=2), pixels))
    assert (runtime(x).argmax(1) == fq.argmax(1)).float().mean() >= 0.97
    assert (runtime(x) - fq).abs().max() <= 1e-3 * fq.abs().max()  # codes differ only at near-ties
    if available():
        for cap in CAPABILITIES:
            with forced_capability(cap):
                fast = FastModel(runtime)
            assert not fast.fallbacks and fast.capability == cap
            assert (fast(x).argmax(1) == runtime(x).argmax(1)).float().mean() >= 0.95
            layers = compare(fast, runtime, x)
            layers.pop(runtime.nodes[-1].inputs[0])  # logits: float32 rounding at 2^-30 of their bound
            assert all(v["frac_diff"] <= 0.01 and v["max_diff"] <= 1 for v in layers.values() if v["narrow"])
            assert all(v["max_diff"] <= 16 for v in layers.values())  # wide: 2^-16 code steps, clamps applied


@pytest.mark.parametrize("make", list(MODELS), ids=lambda m: m.__name__)
def test_user_cnn_runs_in_onnxruntime(make, tmp_path):
    pytest.importorskip("onnxruntime")
    from lowbit.export.onnx_export import OnnxModel, export_onnx

    model = _quantized(_randomise_bn(make()))
    runtime = IntegerModel.load(_export(model, tmp_path).path)
    x = _pixels(64, seed=3)
    got = OnnxModel(export_onnx(runtime, tmp_path / "m.onnx"), threads=1)(x)
    assert (got.argmax(1) == runtime(x).argmax(1)).float().mean() >= 0.95
    assert torch.allclose(got, runtime(x), rtol=0, atol=0.02 * float(runtime(x).abs().max()))


@pytest.mark.parametrize("op,attrs,match", [
    ("upsample_nearest", {"scale": [2, 0]}, "upsampling scale must be two positive integers"),
    ("concat", {"axis": 2}, "concat runs along axis 1"),
    ("clamp", {"lo": 3, "hi": 1}, "empty output range"),
])
def test_new_ops_are_validated_at_load(tmp_path, op, attrs, match):
    model = _quantized(_randomise_bn(UNetish()), pixels=False)
    manifest, tensors = read_model(_export(model, tmp_path, pixels=False).path)
    next(n for n in manifest["graph"] if n["op"] == op)["attrs"].update(attrs)
    with pytest.raises(LowbitError, match=match):
        IntegerModel.load(write_model(tmp_path / "bad.lowbit", manifest, tensors))


class _ClampNet(nn.Module):
    """A conv whose outputs often pass 6, so ReLU6 binds; its codes feed conv2's 4-bit quantizer directly."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        x = self.conv2(F.relu6(self.conv1(x)))
        return self.fc(torch.flatten(x, 1))


def test_relu6_codes_are_the_fake_quant_codes(tmp_path):
    """ReLU6 folded into conv1's requantization: where the clamp binds, the code is exactly the one conv2's
    quantizer gives the value 6, and elsewhere codes differ from the fake-quant model's only at near-ties."""
    model = _ClampNet()
    with torch.no_grad():
        model.conv1.weight.mul_(8)
    model = _quantized(model, Plan({"conv1": (8, 8), "conv2": (4, 4), "fc": (8, 8)}))
    q = model.conv2.input_quantizer
    assert float(6 / q.scale) % 1 != 0 and q.q_p > 6 / q.scale  # 6 is not a code, and below the clip
    result = _export(model, tmp_path)
    runtime = IntegerModel.load(result.path)
    x = _pixels(32, seed=4)
    codes = runtime.run_trace(x)["conv1"].to(torch.int64)
    with torch.no_grad():
        y = F.relu6(model.conv1(_model_input(x, True)))
    want = q.codes(y).to(torch.int64)
    binds = y == 6
    assert binds.float().mean() > 0.1 and runtime.nodes[1].attrs["hi"] == int(q.codes(torch.tensor(6.0)))
    assert torch.equal(codes[binds], want[binds])
    assert (codes != want).float().mean() < 1e-3


def test_relu6_after_a_residual_add_is_clamped_at_the_shared_scale(tmp_path):
    """The add of block2 takes its shortcut's scale (an exact integer sum); its folded ReLU6 bound must be 6 in
    units of that scale, not of the scale the add had before sharing."""
    model = _quantized(_randomise_bn(ResidualNet()))
    runtime = IntegerModel.load(_export(model, tmp_path).path)
    add = next(n.attrs for n in runtime.nodes if n.op == "add" and n.attrs["hi"] < 2**31 - 1)
    assert 2 ** add["shift"] in (add["multiplier_a"], add["multiplier_b"])  # the shortcut keeps its scale
    assert add["lo"] == 0 and add["hi"] == round(6 / add["out_scale"])


def test_rep_clamp_rounds_bounds_like_the_quantizer():
    narrow = Rep(0.4, -8, 7, bits=4)
    assert narrow.clamped(0.0, 6.0) == Rep(0.4, 0, 7, 4)  # 6 / 0.4 = 15 is past the code range: stays 7
    assert narrow.clamped(-1.0, 1.0) == Rep(0.4, -2, 2, 4)  # -2.5 and 2.5 round half to even
    assert narrow.clamped(None, -10.0) == Rep(0.4, -8, -8, 4)  # all below the range: one code
    wide = Rep(2.0**-16, -(2**31), 2**31 - 1)
    assert wide.clamped(0.0, 6.0) == Rep(2.0**-16, 0, 6 * 2**16)


# ------------------------------------------------------------------------------------------------ errors
class _Bad(nn.Module):
    """conv -> ``body`` -> a tail that runs on whatever shape ``body`` gives (the export reports ``body``)."""

    def __init__(self, body, flat):
        super().__init__()
        self.conv, self.fc, self.body, self.flat = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10), body, flat

    def forward(self, x):
        x = self.body(F.relu(self.conv(x)))
        return self.fc(x.flatten(1)[:, :8] if self.flat else x.mean((2, 3)))


def _sigmoid(x):
    return torch.sigmoid(x)


def _leaky(x):
    return F.leaky_relu(x)


def _batch_one(x):
    return x.view(1, -1)


def _not_trailing(x):
    return x.view(x.size(0), 2, -1)


def _cat_width(x):
    return torch.cat([x, x], dim=3)


def _bilinear(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear")


def _exclude_pad(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _uneven(x):
    return F.adaptive_avg_pool2d(x, 3)


def _indices(x):
    return F.max_pool2d(x, 2, return_indices=True)[0]


def _scale(x):
    return x * 2


def _dropout(x):
    return F.dropout(x, 0.1)


@pytest.mark.parametrize("body,match", [
    (_sigmoid, r"operation sigmoid \('sigmoid'\) is not supported by the integer export .* "
               r"\(at tests/export/test_user_models.py:\d+: return torch.sigmoid\(x\)\)$"),
    (_leaky, r"operation leaky_relu .* is not supported .*test_user_models.py:\d+: return F.leaky_relu\(x\)\)$"),
    (_batch_one, r"method .view\(\) .* moves the batch dimension: its output is \[1, 2048\] for one example and "
                 r"\[1, 4096\] for two.*test_user_models.py:\d+: return x.view\(1, -1\)\)$"),
    (_not_trailing, r"reshapes \[1, 8, 16, 16\] to \[1, 2, 1024\]; only flattening trailing dimensions"),
    (_cat_width, r"operation cat .* only concatenating tensors along the channel dimension \(dim=1\) is supported, "
                 r"got dim=3 .*test_user_models.py:\d+: return torch.cat\(\[x, x\], dim=3\)\)$"),
    (_bilinear, r"operation interpolate .* only nearest upsampling .* got mode 'bilinear'"),
    (_exclude_pad, r"operation avg_pool2d .* count_include_pad=False and padding \[1, 1\]"),
    (_uneven, r"adaptive pool 'adaptive_avg_pool2d': output 3x3 does not divide the input 16x16 .*"
              r"test_user_models.py:\d+: return F.adaptive_avg_pool2d\(x, 3\)\)$"),
    (_indices, r"operation max_pool2d_with_indices .* is not supported by the integer export \(it does not give "
               r"one tensor\)"),
    (_scale, r"operation mul \('mul'\) is not supported .*test_user_models.py:\d+: return x \* 2\)$"),
    (_dropout, r"operation dropout .* training=True drops values even in eval mode"),
], ids=lambda v: getattr(v, "__name__", "")[1:] if callable(v) else "")
def test_unsupported_code_is_one_line_naming_op_and_source(body, match):
    model = _quantized(_Bad(body, flat=body in (_batch_one, _not_trailing)), Plan({"conv": (8, 8), "fc": (8, 8)}))
    with pytest.raises(LowbitError) as e:
        lower_model(model, SHAPE, PIXELS)
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    assert re.search(match, text), text
