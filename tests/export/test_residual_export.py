"""Residual streams as narrow codes: models with :class:`~lowbit.quant.QuantAct` modules after each residual join's
ReLU (8-bit residual codes, as PyTorch's own int8 models carry them) export to, and run on, 8-bit codes. Models are
defined here: a small residual CNN with a max pool, a downsample shortcut, 4-bit convs (and a mixed 4/2 plan), a
torchvision-shaped one, and odd placements (a QuantAct on a value read elsewhere too, two in a row). Checked: the
manifest (add outputs are the QuantAct's 8-bit codes, readers with their own quantizer get a codes->codes
requantize), reference == simulation bit for bit, the independent lowering check (QuantAct codes included), the
fast path bit-exact under every forced CPU capability, eager and compiled, and on random worst-case constants,
ONNX and the GPU emulation against the reference, and ``lowbit infer``."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowbit.deploy.lowering import check_lowering
from lowbit.errors import LowbitError
from lowbit.export.exporter import export_model
from lowbit.export.lower import Program, Rep, _needed
from lowbit.export.simulate import Simulation, normalize_pixels
from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
from lowbit.quant.modules import QuantAct
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import CAPABILITIES, FastModel, available, compare, forced_capability
from lowbit.runtime.gpu import GpuModel
from lowbit.runtime.reference import add_requant
from tests.export.test_user_models import _randomise_bn

PIXELS = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.3, 0.2]}
SHAPE = (3, 16, 16)
fast_only = pytest.mark.skipif(not available(), reason="no oneDNN quantized ops in this PyTorch build")


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, a 1x1 strided downsample where the shape changes, ``self.rq(F.relu(out + identity))``."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.rq = nn.Identity()  # a QuantAct(8) once quantized

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.rq(F.relu(out + identity))


class ResidualCodesNet(nn.Module):
    """Stem conv + max pool, an identity block, a downsampling block, an identity block, mean, fc."""

    def __init__(self, width=8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b1, self.b2, self.b3 = Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.stem(x))))
        x = self.b3(self.b2(self.b1(x)))
        return self.fc(x.mean((2, 3)))


class TvBlock(nn.Module):
    """torchvision's BasicBlock (one ReLU module called twice, ``out += identity``) with a QuantAct after it."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.rq = nn.Identity()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.rq(self.relu(out))


class TvResNet(nn.Module):
    """ResNet-18's layout in small: 7x7/2 stem, 3x3/2 max pool, two stages of two blocks, adaptive pool, fc."""

    def __init__(self, width=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(TvBlock(width, width, 1), TvBlock(width, width, 1))
        self.layer2 = nn.Sequential(TvBlock(width, 2 * width, 2), TvBlock(2 * width, 2 * width, 1))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class OddNet(nn.Module):
    """QuantActs where the add cannot make their codes: on a value read elsewhere too (a requantize node named
    after the QuantAct) and two in a row (codes -> codes), then a residual add of codes and a wide value."""

    def __init__(self, width=8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width)
        self.conv, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.rq, self.rq2 = nn.Identity(), nn.Identity()
        self.head = nn.Conv2d(width, width, 3, 1, 1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.bn2(self.conv(x)) + x)
        y = self.rq2(self.rq(h))
        z = F.relu(self.head(y) + h)
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


def _pixels(n, seed, shape=SHAPE):
    x = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    x[:1], x[1:2] = 0, 255  # the ends of the input range
    return x


def _calibrate(model, batches):
    """calibrate_, with every QuantAct's quantizer observing the same pass (and initialised after it) in case
    calibrate_ leaves QuantActs alone."""
    qs = [m.input_quantizer for m in model.modules() if isinstance(m, QuantAct)]
    for q in qs:
        q._reset_stats()
        q.observing = True
    try:
        calibrate_(model, batches)
        for q in qs:
            if not q._ready:
                q.finish_observation_()
    finally:
        for q in qs:
            q.observing = False
    return model


def _with_qacts(model, plan="w4a4", cfg=None, shape=SHAPE):
    """quantize_ with ``plan``, a QuantAct(8) in every ``rq`` slot, calibrated on normalised random pixels."""
    torch.manual_seed(0)
    cfg = cfg or QuantConfig()
    quantize_(model, plan(model) if callable(plan) else Plan.preset(plan, model), cfg)
    for m in list(model.modules()):
        for slot in ("rq", "rq2"):
            if isinstance(getattr(m, slot, None), nn.Identity):
                setattr(m, slot, QuantAct(8, cfg))
    _calibrate(model, [normalize_pixels(_pixels(64, seed=1, shape=shape), PIXELS["mean"], PIXELS["std"])])
    # A global mean pool feeding a layer calibrated on the same values gets the QuantAct's step to ~1e-7, so
    # that sum/n lands within float32 noise of a tie for 1 in 2n windows; trained steps never match so closely.
    fc = model.fc.input_quantizer
    fc.set_step_(fc.step.detach() * 1.03)
    if isinstance(getattr(model, "rq2", None), QuantAct):  # calibrated on rq's output: the same step, no node
        model.rq2.input_quantizer.set_step_(model.rq2.input_quantizer.step.detach() * 1.7)
    return model.eval()


def _mixed_42(model):
    plan = Plan.preset("w4a4", model)
    return Plan({n: (2, 2) if n.startswith(("b2", "b3")) else b for n, b in plan.layers.items()})


MODELS = {
    "w4a4": (ResidualCodesNet, "w4a4", SHAPE),
    "mixed 4/2": (ResidualCodesNet, _mixed_42, SHAPE),
    "torchvision-shaped": (TvResNet, "w4a4", (3, 32, 32)),
    "odd placements": (OddNet, "w4a4", SHAPE),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("residual")
    out = {}
    for i, (name, (make, plan, shape)) in enumerate(MODELS.items()):
        model = _with_qacts(_randomise_bn(make(), seed=i), plan, shape=shape)
        out[name] = (model, export_model(model, tmp / f"{i}.lowbit", input_shape=shape, pixels=PIXELS), shape)
    return out


def _acts(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantAct)}


@pytest.mark.parametrize("name", ["w4a4", "mixed 4/2", "torchvision-shaped"])
def test_residual_stream_is_8bit_codes(exports, name):
    model, result, shape = exports[name]
    runtime = IntegerModel.load(result.path)
    check_codes_stream(runtime, model, "conv2d_add")
    x = _pixels(96, seed=2, shape=shape)
    assert torch.equal(runtime.run_int(x).to(torch.int64), Simulation(result.lowered).run_int(x))
    check = check_lowering(runtime, model, x)
    assert check.ok, check.failures
    assert set(check.activations) == set(_acts(model)) and all(c.elements for c in check.activations.values())
    assert "QuantActs' codes differing" in check.summary()


def check_codes_stream(runtime, model, join):
    """Each QuantAct's codes are the output of its residual join (``join``: the fused ``conv2d_add``, or ``add``),
    8-bit codes at its step, with no node of its own; a join reads its branch (a conv nothing else reads) and a
    shortcut that is the join before it (codes), a downsample conv, or the first block's (the stem's max pool, read
    by a conv too: float in the model); readers with their own quantizer get the codes through a requantize."""
    graph, acts = runtime.graph, _acts(model)
    assert acts and {a["name"] for a in runtime.manifest["activations"]} == set(acts)
    joins = [n for n in runtime.nodes if n.op == join]
    assert len(joins) == len(acts) and not [n for n in runtime.nodes if n.op in ("add", "conv2d_add") and n.op != join]
    for a in runtime.manifest["activations"]:
        node = graph.producer(a["value"])
        assert node.op == join and node.attrs["out_bits"] == 8 and (node.attrs["lo"], node.attrs["hi"]) == (0, 255)
        assert node.attrs["out_scale"] == a["scale"] == float(acts[a["name"]].input_quantizer.scale)
        assert a["name"] not in {n.name for n in runtime.nodes}
    for node in joins:
        for v in node.inputs[1:] if join == "conv2d_add" else node.inputs:
            producer = graph.producer(v)
            branch = producer.op == "conv2d" and [r.name for r in graph.readers(v)] == [node.name]
            assert branch or producer.op == join or (node is joins[0] and producer.op == "maxpool2d"), (node.name, v)
    codes_in = [n for n in runtime.nodes if n.op == "requantize" and graph.producer(n.inputs[0]).op == join]
    assert codes_in and all(n.attrs["out_bits"] in (2, 4) for n in codes_in)


def test_unfused_residual_adds_are_exact_too(tmp_path, monkeypatch):
    """Without the conv2d_add fusion the join is an add of the wide conv branch and the codes, rounded into the
    QuantAct's codes: the same checks pass (a second rounding, 2^-16 steps below the branch's, is the only change)."""
    import lowbit.export.lower as lower

    monkeypatch.setattr(lower, "FUSE_RESIDUAL_ADDS", False)
    model = _with_qacts(_randomise_bn(ResidualCodesNet(), seed=0))
    result = export_model(model, tmp_path / "m.lowbit", input_shape=SHAPE, pixels=PIXELS)
    runtime = IntegerModel.load(result.path)
    check_codes_stream(runtime, model, "add")
    x = _pixels(96, seed=2)
    assert torch.equal(runtime.run_int(x).to(torch.int64), Simulation(result.lowered).run_int(x))
    assert check_lowering(runtime, model, x).ok
    if available():
        _assert_exact(FastModel(runtime, compile=False), runtime, x[:16])


def test_odd_placements(exports):
    """A QuantAct on a value read elsewhere gets a requantize node named after it; a second QuantAct requantizes
    the first one's codes; both agree with the simulation and pass the lowering check."""
    model, result, shape = exports["odd placements"]
    runtime = IntegerModel.load(result.path)
    rq, rq2 = runtime.graph.node("rq"), runtime.graph.node("rq2")
    assert rq.op == rq2.op == "requantize" and rq2.inputs == [rq.output]
    assert runtime.graph.producer(rq.inputs[0]).attrs["out_bits"] is None  # a wide value, read by the last add
    assert rq.attrs["out_bits"] == rq2.attrs["out_bits"] == 8
    x = _pixels(96, seed=3, shape=shape)
    assert torch.equal(runtime.run_int(x).to(torch.int64), Simulation(result.lowered).run_int(x))
    check = check_lowering(runtime, model, x)
    assert check.ok and set(check.activations) == {"rq", "rq2"}, check.failures


def test_codes_for_another_quantizer_are_still_refused():
    """Only a QuantAct's codes may be requantized for a reader: codes made for another layer's quantizer would be
    rounded a second time, which the model never does."""
    p = Program()
    p.value_of["v"], p.reps["v"] = "v", Rep(0.1, 0, 255, 8)
    target = Rep(0.3, 0, 15, 4)
    for kind, ok in (("qlayer", False), ("add", False), ("qact", True)):
        byname = {"v": SimpleNamespace(kind=kind, inputs=[])}
        if ok:
            assert _needed(p, "v", target, "conv", byname=byname) == "conv.requantize"
            assert p.graph[-1].op == "requantize" and p.graph[-1].attrs["out_bits"] == 4
        else:
            with pytest.raises(LowbitError, match="made for another quantizer"):
                _needed(p, "v", target, "conv", byname=byname)


@fast_only
@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_bit_exact_on_codes(exports, name):
    _, result, shape = exports[name]
    ref = IntegerModel.load(result.path)
    x = _pixels(16, seed=4, shape=shape)
    for cap in CAPABILITIES:
        with forced_capability(cap):
            fast = FastModel(ref, compile=False)
        assert not fast.fallbacks and fast.capability == cap
        adds = [n.output for n in ref.nodes if n.op in ("add", "conv2d_add") and n.attrs["out_bits"] == 8]
        assert (name == "odd placements" or adds) and all(fast._zp[v] is not None for v in adds)  # uint8 codes
        _assert_exact(fast, ref, x)


def _assert_exact(fast, ref, x):
    assert torch.equal(fast.run_int(x), ref.run_int(x))
    layers = compare(fast, ref, x[:4])
    assert layers and all(v["max_diff"] == 0 for v in layers.values()), layers


@fast_only
def test_fast_path_compiled_bit_exact(exports):
    _, result, shape = exports["torchvision-shaped"]
    ref = IntegerModel.load(result.path)
    fast = FastModel(ref, compile=True)
    for n in (1, 5):
        x = _pixels(n, seed=n, shape=shape)
        assert torch.equal(fast.run_int(x), ref.run_int(x))


@fast_only
@pytest.mark.parametrize("name", ["w4a4", "torchvision-shaped"])
def test_fast_path_worst_case_constants(exports, name):
    """Random full-range weight codes and random constants on every conv, requantize and add (31-bit multipliers of
    either sign, biases across the code range, shifts that cross the uint8 window): bit-exact eagerly under every
    capability, and compiled."""
    _, result, shape = exports[name]
    ref = _worst_case(result.path, seed=len(name))
    x = _pixels(8, seed=5, shape=shape)
    for cap in CAPABILITIES:
        with forced_capability(cap):
            fast = FastModel(ref, compile=False)
        _assert_exact(fast, ref, x)
    assert torch.equal(FastModel(ref, compile=True).run_int(x), ref.run_int(x))


def _worst_case(path, seed):
    from tests.runtime.test_fast_exact import _worst_case as conv_worst_case

    ref = conv_worst_case(path, seed)
    g = torch.Generator().manual_seed(seed)
    for node in ref.nodes:
        a = node.attrs
        if node.op == "requantize":
            a["multiplier"] = int(torch.randint(-(2**31) + 1, 2**31, (1,), generator=g))
            a["shift"] = int(torch.randint(30, 40, (1,), generator=g))
            a["bias"] = int(torch.randint(-(2**40), 2**40, (1,), generator=g))
        elif node.op == "add":
            a["multiplier_a"], a["multiplier_b"] = (int(v) for v in torch.randint(-(2**30), 2**30, (2,), generator=g))
            a["shift"] = int(torch.randint(20, 36, (1,), generator=g))
            a["bias"] = int(torch.randint(-(2**36), 2**36, (1,), generator=g))
    return ref


def _fm(zps, bounds):
    return SimpleNamespace(_zp=zps, bounds=bounds, requant={})


@fast_only
@given(m=st.integers(-(2**31) + 1, 2**31 - 1), k=st.integers(0, 62), b=st.integers(-(2**61), 2**61),
       code_in=st.sampled_from([(0, 255), (-128, 127), (0, 15), (-8, 7)]),
       out=st.sampled_from([(0, 255), (0, 15), (-8, 7), (-(2**31), 2**31 - 1)]))
def test_codes_to_codes_requantize_is_exact_on_every_code(m, k, b, code_in, out):
    """The fast path's requantize on stored uint8 codes (any zero point) equals the reference on every code."""
    from lowbit.ir.dyadic import requantize
    from lowbit.runtime.fastpath import _fast_requantize

    (lo_in, hi_in), (lo, hi) = code_in, out
    zp_in = max(0, -lo_in)
    zp = max(0, -lo) if hi + max(0, -lo) <= 255 else None
    node = SimpleNamespace(name="rq", inputs=["x"], output="y",
                           attrs={"multiplier": m, "shift": k, "bias": b, "lo": lo, "hi": hi})
    step = _fast_requantize(_fm({"x": zp_in, "y": zp}, {"x": (lo_in, hi_in)}), node, {})
    codes = torch.arange(lo_in, hi_in + 1, dtype=torch.int64)
    got = step({"x": (codes + zp_in).to(torch.uint8)}).to(torch.int64) - (zp or 0)
    assert torch.equal(got, requantize(codes, m, k, b, lo=lo, hi=hi).to(torch.int64))


@fast_only
@given(ma=st.integers(-(2**30), 2**30), mb=st.integers(-(2**30), 2**30), s=st.integers(0, 50),
       bias=st.integers(-(2**40), 2**40), wide=st.integers(1, 2**31 - 1), seed=st.integers(0, 2**16))
def test_add_of_a_wide_branch_and_codes_into_codes_is_exact(ma, mb, s, bias, wide, seed):
    """The residual add of a wide int32 branch and stored uint8 shortcut codes into uint8 codes (random constants,
    full-range values): equal to the reference's add_requant."""
    from lowbit.runtime.fastpath import _fast_add

    node = SimpleNamespace(name="add", inputs=["a", "b"], output="y",
                           attrs={"multiplier_a": ma, "multiplier_b": mb, "shift": s, "bias": bias, "lo": 0, "hi": 255})
    step = _fast_add(_fm({"a": None, "b": 0, "y": 0}, {"a": (-wide, wide), "b": (0, 255)}), node, {})
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-wide, wide + 1, (4096,), generator=g, dtype=torch.int64)
    b = torch.randint(0, 256, (4096,), generator=g, dtype=torch.int64)
    a[:2], b[:2] = torch.tensor([-wide, wide]), torch.tensor([0, 255])
    got = step({"a": a.to(torch.int32), "b": b.to(torch.uint8)}).to(torch.int64)
    want = add_requant(a, b, ma, mb, s, bias=bias, lo=0, hi=255).to(torch.int64)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_and_gpu_emulation_agree_with_the_reference(exports, name, tmp_path):
    _, result, shape = exports[name]
    _assert_onnx_and_gpu(IntegerModel.load(result.path), _pixels(64, seed=6, shape=shape), tmp_path)


def _assert_onnx_and_gpu(ref, x, tmp_path):
    """The GPU emulation bit for bit; onnxruntime (float QDQ) on top-1 and within 2% of the largest logit."""
    assert torch.equal(GpuModel(ref, emulate=True).run_int(x), ref.run_int(x))
    pytest.importorskip("onnxruntime")
    from lowbit.export.onnx_export import OnnxModel, export_onnx

    got, want = OnnxModel(export_onnx(ref, tmp_path / "m.onnx"), threads=1)(x), ref(x)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95
    assert torch.allclose(got, want, rtol=0, atol=0.02 * float(want.abs().max()))


def test_infer_cli_on_a_residual_codes_model(exports, tmp_path, capsys):
    import numpy as np

    from lowbit.cli.main import main

    _, result, shape = exports["w4a4"]
    np.save(tmp_path / "x.npy", _pixels(6, seed=7, shape=shape).numpy())
    outs = []
    for backend in ("reference", "fast") if available() else ("reference",):
        assert main(["infer", str(result.path), "--images", str(tmp_path / "x.npy"), "--backend", backend]) == 0
        outs.append(capsys.readouterr().out.splitlines()[:6])
    want = IntegerModel.load(result.path)(_pixels(6, seed=7, shape=shape)).argmax(1).tolist()
    assert all([int(line.split("\t")[1]) for line in out] == want for out in outs), outs


def _sum_epilogue_worst_case(path, seed):
    """The export with random full-range weights and, on every conv2d_add that writes uint8 codes from uint8 residual
    codes, random constants a float32 epilogue with a sum post-op computes exactly: multipliers of 4 to 12 bits of
    either sign (some zero), shifts that cross the code range, biases on exact ties on half the channels, one residual
    scale ``M*2^-K`` (``m_r = M << (k - K)``)."""
    from lowbit.ir.dyadic import float32_sum_epilogue_exact
    from lowbit.runtime.fastpath import acc_bounds, value_bounds

    ref = _worst_case(path, seed)
    g = torch.Generator().manual_seed(seed + 100)
    for node in ref.nodes:
        bounds = value_bounds(ref)
        if node.op != "conv2d_add" or bounds[node.inputs[1]][1] - bounds[node.inputs[1]][0] > 255:
            continue  # (a wide residual: the sum post-op reads uint8 codes only)
        p = ref.params[node.name]
        c = p["weight"].shape[0]
        lo_c, hi_c = acc_bounds(p["weight"], bounds[node.inputs[0]])
        span = (hi_c - lo_c).clamp_min(1).double()
        bits = torch.randint(4, 13, (c,), generator=g)
        m = torch.randint(0, 1 << 20, (c,), generator=g) % (1 << bits) | (1 << (bits - 1))
        m = m * torch.where(torch.rand(c, generator=g) < 0.3, -1, 1) * (torch.rand(c, generator=g) > 0.1)
        k = torch.floor(torch.log2(m.abs().clamp_min(1) * span / 4 / 256)).to(torch.int64).clamp(2, 12)
        b = torch.randint(-(2**20), 2**20, (c,), generator=g) % (1 << (k + 8)) - (1 << (k + 7))
        b = torch.where(torch.rand(c, generator=g) < 0.5, (b >> k << k) + (1 << (k - 1)), b)
        big_k = int(k.min())  # S = M * 2^-K up to 4: the residual moves the output across the code range
        mr = torch.full((c,), int(torch.randint(1, 1 << (big_k + 2), (), generator=g))) << (k - big_k)
        zp, (r_lo, r_hi) = 0, bounds[node.inputs[1]]
        ok, why = float32_sum_epilogue_exact(m, k, b, mr, node.attrs["lo"], node.attrs["hi"], zp, lo_c, hi_c, r_lo,
                                             r_hi, 0)
        assert bool(ok.all()), why
        p.update(multiplier=m.to(torch.int32), shift=k.to(torch.int8), bias=b, residual_multiplier=mr.to(torch.int32))
    return ref


@fast_only
def test_in_kernel_residual_sum_worst_cases(exports):
    """Constants a float32 epilogue computes exactly (which real 8-bit residual codes never get: the narrowing would
    move values by more than 2^-10 steps), so that conv2d_add runs as one oneDNN int8 conv with a sum post-op writing
    uint8 codes: equal to the reference on every value under every capability, eagerly and compiled."""
    fused = 0
    for seed, name in enumerate(("w4a4", "torchvision-shaped")):
        _, result, shape = exports[name]
        ref = _sum_epilogue_worst_case(result.path, seed)
        x = _pixels(8, seed=8, shape=shape)
        for cap in CAPABILITIES:
            with forced_capability(cap):
                fast = FastModel(ref, compile=False)
            sums = [n.name for n in ref.nodes if n.op == "conv2d_add" and fast._zp[n.inputs[1]] is not None]
            assert sums and all(fast.paths[n] == "int8 fused" for n in sums), fast.epilogue
            assert all("residual sum post-op" in fast.epilogue[n] for n in sums)
            fused += len(sums)
            _assert_exact(fast, ref, x)
        assert torch.equal(FastModel(ref, compile=True).run_int(x), ref.run_int(x))
    assert fused >= 6


# ------------------------------------------------------------- a 4-bit stream from residual_bits, wider epilogue budget
def _residual_bits_model(bits=4):
    """TvResNet with ``QuantConfig(residual_bits=bits)``: QuantActs after each join and on each shortcut into a conv
    branch (the stem's output, the downsample's), so every join is ``conv branch + codes``."""
    torch.manual_seed(0)
    model = _randomise_bn(TvResNet(), seed=5)
    model = quantize_(model, Plan.preset("w4a4", model), QuantConfig(residual_bits=bits))
    shape = (3, 32, 32)
    calibrate_(model, [normalize_pixels(_pixels(64, seed=1, shape=shape), PIXELS["mean"], PIXELS["std"])])
    fc = model.fc.input_quantizer
    fc.set_step_(fc.step.detach() * 1.03)  # see _with_qacts
    return model.eval(), shape


# A budget the random batch norms here need (gammas near 0 widen a channel's accumulator window; a fused add
# needs every channel within budget); ResNet-18 with random weights fuses every join at 2^-5 (bench/deploy.py).
WIDE = 2.0**-3


@pytest.fixture(scope="module")
def budgets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget")
    model, shape = _residual_bits_model()
    return model, shape, {e: export_model(model, tmp / f"{i}.lowbit", input_shape=shape, pixels=PIXELS,
                                          epilogue_error=e)
                          for i, e in enumerate((None, WIDE))}


def test_a_4bit_residual_stream_fuses_every_join_into_its_conv(budgets):
    model, shape, results = budgets
    ref = IntegerModel.load(results[None].path)
    adds = [n for n in ref.nodes if n.op == "conv2d_add"]
    assert len(adds) == 4 and not [n for n in ref.nodes if n.op == "add"]  # every join: conv branch + codes
    codes = {a["value"]: a["bits"] for a in ref.manifest["activations"]}
    for n in adds:
        assert codes.get(n.inputs[1]) == 4, n.name  # the shortcut is the 4-bit codes of a QuantAct
    # every 4-bit layer reading the stream shares its step (share_residual_steps): no requantize node anywhere
    assert not [n.name for n in ref.nodes if n.op == "requantize"]
    assert sum(ref.graph.producer(n.inputs[0]).op in ("conv2d_add", "maxpool2d") for n in ref.nodes
               if n.op == "conv2d") == 5  # four conv1s and the downsample read the codes as they are
    assert ref.manifest["epilogue_error"] == 2.0**-10
    assert IntegerModel.load(results[WIDE].path).manifest["epilogue_error"] == WIDE
    x = _pixels(16, seed=7, shape=shape)
    for result in results.values():
        ref = IntegerModel.load(result.path)
        sim = Simulation(result.lowered).run_int(x)
        assert torch.equal(ref.run_int(x), sim)
        check = check_lowering(ref, model, x)
        assert check.ok, check.failures


@fast_only
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_a_wider_epilogue_budget_puts_more_layers_in_the_kernel_bit_exactly(budgets, capability):
    model, shape, results = budgets
    x = _pixels(16, seed=8, shape=shape)
    fused = {}
    with forced_capability(capability):
        for e, result in results.items():
            ref = IntegerModel.load(result.path)
            fast = FastModel(ref, compile=False)
            assert torch.equal(fast.run_int(x), ref.run_int(x)), (capability, e)  # in-place adds included
            # every value as the reference has it (run_trace keeps them: no add writes into its residual then)
            assert all(v["max_diff"] == 0 for v in compare(fast, ref, x[:4]).values())
            fused[e] = {n for n, p in fast.paths.items() if p == "int8 fused"}
    assert fused[None] < fused[WIDE]
    assert any(ref.graph.node(n).op == "conv2d_add" for n in fused[WIDE])


def test_epilogue_error_out_of_range_is_refused(budgets, tmp_path):
    model, shape, _ = budgets
    for bad in (0, 0.6, "x"):
        with pytest.raises(LowbitError, match="epilogue_error must be"):
            export_model(model, tmp_path / "x.lowbit", input_shape=shape, pixels=PIXELS, epilogue_error=bad)
    assert not (tmp_path / "x.lowbit").exists()


def test_a_4bit_stream_on_onnx_and_the_gpu_emulation(budgets, tmp_path):
    _, shape, results = budgets
    _assert_onnx_and_gpu(IntegerModel.load(results[WIDE].path), _pixels(64, seed=9, shape=shape), tmp_path)


@fast_only
def test_fused_adds_write_into_the_residual_only_where_it_is_dead(budgets, monkeypatch):
    """The in-place kernel runs for adds that are their residual's last reader, and the logits stay exact."""
    from lowbit.runtime import fastpath

    _, shape, results = budgets
    ref = IntegerModel.load(results[WIDE].path)
    calls = []
    real = fastpath.conv_add_u8_
    monkeypatch.setattr(fastpath, "conv_add_u8_", lambda x, r, key: calls.append(r.data_ptr()) or real(x, r, key))
    x = _pixels(8, seed=10, shape=shape)
    with forced_capability("vnni"):  # the paths are the capability's, not this machine's
        fast = FastModel(ref, compile=False)
        assert torch.equal(fast.run_int(x), ref.run_int(x))
    in_kernel = [n for n in ref.nodes if n.op == "conv2d_add" and fast.paths[n.name] == "int8 fused"]
    assert in_kernel and len(calls) == len(in_kernel)
    assert all(fast.last_reader[n.inputs[1]] == n.name and n.inputs[1] in fast.consumed for n in in_kernel)
