"""The fast backend is bit-exact against the reference runtime: on real exports (embedded W4A4 resnet8, a mixed
4/2 plan, a torchvision-shaped residual net with max pool), on random full-range codes and exact ties, eager and
compiled, under every forced CPU capability (tests/runtime/conftest.py); a model it cannot take runs on the
reference with one warning."""

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.exporter import export_model
from lowbit.ir.dyadic import float32_epilogue_exact
from lowbit.models import create_model
from lowbit.quant import Plan, calibrate_, quantize_
from lowbit.runtime import fastpath
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import FastModel, acc_bounds, available, compare, value_bounds

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
    narrow = [n.name for n in ref.nodes if n.op in ("conv2d", "conv2d_add", "linear") and n.attrs["w_bits"] <= 4]
    assert narrow and all(fast.paths[n].startswith("int8") for n in narrow)
    assert all(p in ("int8", "int8 fused") or p.startswith(("fp32", "fp64")) for p in fast.paths.values())
    # a 4-bit layer that writes codes requantizes in the kernel, or says why not (random BN gammas near 0 keep
    # some channels' 31-bit multipliers: narrowing them would move values by more than 2^-10 steps; a fused
    # residual add needs uint8 residual codes and the uint8 output range for oneDNN's sum post-op)
    codes_out = [n for n in narrow if fast.model.graph.node(n).attrs["hi"] < 256]
    assert codes_out and all(n in fast.epilogue for n in codes_out)
    assert all(fast.paths[n] == "int8 fused" or "not exact in a float32 epilogue" in fast.epilogue[n]
               or fast.model.graph.node(n).op == "conv2d_add" and fast.epilogue[n].startswith("compiled glue")
               for n in codes_out), fast.epilogue
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


def test_large_batches_run_in_equal_chunks_bit_exactly(exports, monkeypatch):
    """``chunk`` 3: 4 images run as two chunks of 2 (not 3 + 1 padded to 3), 7 as three of 3 (the last padded
    with zero input), 8 as three of 3 too; every image's integers equal the reference's. Every chunk, the padded
    one included, has the channels-last strides the prologue gives pixels (a compiled graph guards on strides)."""
    ref = IntegerModel.load(exports["resnet18-shaped w4a4"])  # 3 channels: NCHW and channels-last differ
    fast = FastModel(ref, compile=False, chunk=3, capability="vnni")
    shapes, strides = [], set()
    real = fastpath.run_logits

    def spy(fm, shape, x):
        shapes.append(shape[0])
        strides.add(x.is_contiguous(memory_format=torch.channels_last))
        return real(fm, shape, x)

    monkeypatch.setattr(fastpath, "run_logits", spy)
    for n in (2, 4, 7, 8):
        x = _pixels(ref.input_spec["shape"], n=n, seed=n)
        assert torch.equal(fast.run_int(x), ref.run_int(x)), n
    assert shapes == [2, 2, 2, 3, 3, 3, 3, 3, 3] and strides == {True}
    with pytest.raises(LowbitError, match="chunk must be at least 1"):
        FastModel(ref, compile=False, chunk=0)


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
    multipliers and half-integer offsets, so many results are exact ties. A conv2d_add (a fused residual add) gets
    a random residual multiplier too."""
    ref = IntegerModel.load(path)
    g = torch.Generator().manual_seed(seed)
    for node in ref.nodes:
        if node.op not in ("conv2d", "conv2d_add", "linear"):
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
        if node.op == "conv2d_add":
            p["residual_multiplier"] = torch.randint(0, 2**20, (c,), generator=g, dtype=torch.int32)
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


def _epilogue_worst_case(path, seed):
    """The export with random full-range weights and, on every layer that writes codes, random constants a float32
    epilogue computes exactly (:func:`float32_epilogue_exact`): multipliers of either sign and of 4 to 12 bits,
    shifts so that the output range is crossed, biases on exact ties (``b = 2^(k-1) mod 2^k``) on half the
    channels, zero multipliers on a few."""
    ref = _worst_case(path, seed)
    g = torch.Generator().manual_seed(seed + 100)
    bounds = value_bounds(ref)
    for node in ref.nodes:
        a = node.attrs
        if node.op not in ("conv2d", "linear") or a["hi"] > 255:
            continue
        p = ref.params[node.name]
        c = p["weight"].shape[0]
        lo_c, hi_c = acc_bounds(p["weight"], bounds[node.inputs[0]])
        span = (hi_c - lo_c).clamp_min(1).double()
        bits = torch.randint(4, 13, (c,), generator=g)
        m = torch.randint(0, 1 << 20, (c,), generator=g) % (1 << bits) | (1 << (bits - 1))
        m = m * torch.where(torch.rand(c, generator=g) < 0.3, -1, 1) * (torch.rand(c, generator=g) > 0.1)
        # |m| * 2^-k ~ (hi - lo) / (span / 4): the middle of the accumulator range crosses the codes
        k = torch.floor(torch.log2(m.abs().clamp_min(1) * span / 4 / (a["hi"] - a["lo"] + 1))).to(torch.int64)
        k = k.clamp(1, 30)
        b = torch.randint(-(2**20), 2**20, (c,), generator=g) % (1 << (k + 3)) - (1 << (k + 2))
        tie = torch.rand(c, generator=g) < 0.5
        b = torch.where(tie, (b >> k << k) + (1 << (k - 1)), b)
        zp = max(0, -bounds[node.output][0])
        ok, _ = float32_epilogue_exact(m, k, b, a["lo"], a["hi"], zp, lo_c, hi_c)
        # a channel the epilogue cannot take gets multiplier 0 (a constant output) on odd layers, keeps
        # _worst_case's 31-bit constants on even ones (that layer then stays in the glue)
        if len(node.name) % 2:
            m, k, b = torch.where(ok, m, 0), torch.where(ok, k, 4), torch.where(ok, b, b % 512 - 256)
        else:
            m, k, b = (torch.where(ok, v, p[r].to(torch.int64)) for v, r in ((m, "multiplier"), (k, "shift"),
                                                                           (b, "bias")))
        p.update(multiplier=m.to(torch.int32), shift=k.to(torch.int8), bias=b)
    return ref


def test_in_kernel_requantization_worst_cases_are_bit_exact(exports, capability):
    """Random codes, exact ties, negative and zero multipliers, extreme inputs: the uint8-output kernels equal the
    reference on every value."""
    fused = 0
    for seed, name in enumerate(("resnet8 w4a4", "resnet8 mixed 4/2", "resnet18-shaped w4a4")):
        ref = _epilogue_worst_case(exports[name], seed)
        fast = FastModel(ref, compile=False)
        fused += sum(p == "int8 fused" for p in fast.paths.values())
        x = _pixels(ref.input_spec["shape"], n=8, seed=seed)
        _assert_exact(fast, ref, x)
    assert fused >= 4


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE", "AVX512_CORE_VNNI"])
def test_in_kernel_requantization_is_exact_under_capped_isa(isa):
    """oneDNN's own kernels for a weaker ISA (its epilogue may order the multiply and add differently): the same
    worst cases, in a subprocess with ``ONEDNN_MAX_CPU_ISA`` set (read once, at oneDNN's first use)."""
    import os
    import subprocess
    import sys

    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("already capped")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa)
    test = f"{__file__}::test_in_kernel_requantization_worst_cases_are_bit_exact"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
                        test], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]


def test_trained_like_exports_requantize_every_code_layer_in_the_kernel(tmp_path, capability):
    """BN gammas of trained size (|gamma| in [0.5, 1.5], either sign): the export narrows every code-writing
    layer's multipliers, the fast path runs all of them with uint8 output, bit-exact; with
    ``EPILOGUE_MULTIPLIERS`` off the same model keeps 31-bit multipliers and the accumulator path."""
    import lowbit.export.lower as lower

    def trained_like(model):
        g = torch.Generator().manual_seed(3)
        for m in _randomise_bn(model).modules():
            if isinstance(m, nn.BatchNorm2d):
                sign = torch.where(torch.rand(m.num_features, generator=g) < 0.2, -1.0, 1.0)
                m.weight.data = (torch.rand(m.num_features, generator=g) + 0.5) * sign
        return model

    for name, model, plan, shape, pixels in (
            ("r8m", create_model("resnet8", width=0.5), _mixed_42, (1, 28, 28), PIXELS1),
            ("tv", TinyResNet18(), "w4a4", (3, 32, 32), PIXELS3)):
        for on in (True, False):
            lower.EPILOGUE_MULTIPLIERS = on
            try:
                path = _export(trained_like(copy.deepcopy(model)), tmp_path / f"{name}{on}.lowbit", plan, shape,
                               pixels)
            finally:
                lower.EPILOGUE_MULTIPLIERS = True
            ref = IntegerModel.load(path)
            fast = FastModel(ref, compile=False)
            codes_out = [n.name for n in ref.nodes if n.op in ("conv2d", "linear") and n.attrs["hi"] < 256]
            assert codes_out
            want = "int8 fused" if on else "int8"
            assert all(fast.paths[n] == want for n in codes_out), fast.epilogue
            if not on:
                assert all("more than 24 bits" in fast.epilogue[n] for n in codes_out)
            _assert_exact(fast, ref, _pixels(shape))


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


class _PoolNet(nn.Module):
    """conv -> ReLU -> max pool twice, then two linear layers: max pools on uint8 codes, a fused linear_u8."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


@pytest.fixture(scope="module")
def pool_net(tmp_path_factory):
    return _export(_randomise_bn(_PoolNet()), tmp_path_factory.mktemp("pool") / "pool.lowbit", "w4a4", (3, 16, 16),
                   PIXELS3)


def test_max_pool_on_codes_and_linear_u8_are_bit_exact(pool_net, capability):
    """Max pools select on the uint8 codes themselves, the hidden linear layer requantizes in oneDNN's epilogue
    (``lowbit::linear_u8``): equal to the reference eagerly and compiled, on the export and on worst-case
    constants (random full-range weights, ties, negative and zero multipliers)."""
    ref = IntegerModel.load(pool_net)
    fast = FastModel(ref, compile=False)
    pools = [n for n in ref.nodes if n.op == "maxpool2d"]
    assert len(pools) == 2 and all(fast._zp[n.inputs[0]] is not None for n in pools)  # codes in, codes out
    assert fast.paths["fc1"].startswith("int8")  # fused where its multipliers allow (the worst cases below)
    x = _pixels(ref.input_spec["shape"])
    _assert_exact(fast, ref, x)
    assert torch.equal(FastModel(ref, compile=True).run_int(x), ref.run_int(x))
    fused = 0
    for seed in range(3):
        worst = _epilogue_worst_case(pool_net, seed)
        fast = FastModel(worst, compile=False)
        fused += fast.paths["fc1"] == "int8 fused"
        _assert_exact(fast, worst, _pixels(worst.input_spec["shape"], seed=seed))
    assert fused >= 1


# ------------------------------------------------------------------------ glue arithmetic at its bounds
def _requant_ref(v, m, k, b, lo, hi):
    from lowbit.ir.dyadic import requantize

    return requantize(v.to(torch.int64), m, k, b, lo=lo, hi=hi, axis=1).to(torch.int64)


def _edge_values(v_max, n, g, m=None, k=None, b=None):
    """Random values in [-v_max, v_max], both ends, and (given m, k, b) values whose ``v*m + b`` is an exact
    tie ``(q + 1/2) * 2^k`` where one exists nearby."""
    v = torch.randint(-v_max, v_max + 1, (n,), generator=g, dtype=torch.int64)
    v[:4] = torch.tensor([-v_max, v_max, 0, 1])
    if m is not None and m % 2 == 1 and k > 0:  # m odd: v = (2^(k-1) - b) * m^-1 mod 2^k is a tie
        inv = pow(m, -1, 1 << k)
        t = ((1 << (k - 1)) - b) * inv % (1 << k)
        ties = torch.tensor([t - (1 << k) * i for i in range(8) if abs(t - (1 << k) * i) <= v_max], dtype=torch.int64)
        v[4:4 + ties.numel()] = ties
    return v


@pytest.mark.parametrize("mode, limit", [("float32", 2**24), ("int32", 2**31), ("int64", 2**53), ("int64", 2**61)])
def test_glue_requantization_is_exact_at_its_bounds(mode, limit):
    """Each arithmetic :class:`_Requant` picks, with ``max|v|*|m| + |b|`` at the edge of its limit (``2^24`` on
    float32 accumulators, ``2^31`` with the rounding offset) or far past float64's ``2^53``, on random
    full-range values, both ends and exact ties, for every output clamp (narrow codes, a ReLU, the int32
    limits): equal to the reference's shift-and-round, eagerly and compiled."""
    from lowbit.runtime.fastpath import _Requant

    g = torch.Generator().manual_seed(7)
    for trial in range(6):
        k = int(torch.randint(1, 30, (1,), generator=g)) if mode != "float32" else int(torch.randint(1, 12, (1,),
                                                                                                      generator=g))
        m = int(torch.randint(1, 1 << 20, (1,), generator=g)) | 1
        if trial % 2:
            m = -m
        b = int(torch.randint(-(1 << k), 1 << k, (1,), generator=g))
        room = limit - abs(b) - (1 << (k - 1) if mode == "int32" else 0) - 1
        v_max = room // abs(m)
        if mode != "int64":  # at the edge of the narrower arithmetic
            assert v_max * abs(m) + abs(b) + (1 << (k - 1) if mode == "int32" else 0) < limit  # at the edge
        for lo, hi in ((0, 15), (-8, 7), (0, 2**31 - 1), (-(2**31), 2**31 - 1)):
            rq = _Requant(m, k, b, lo, hi, v_max, 1, 2, float32_input=mode == "float32")
            assert rq.mode == mode, (rq.mode, v_max, m, k, b)
            v = _edge_values(min(v_max, 2**31 - 1), 4096, g, m, k, b).reshape(-1, 1)
            if mode == "float32":
                v = v.clamp(-(2**24), 2**24)
            x = v.to(torch.float32 if mode == "float32" else torch.int32 if v_max < 2**31 else torch.int64)
            want = _requant_ref(v, m, k, b, lo, hi)
            assert torch.equal(rq(x).to(torch.int64), want)
            if trial == 0:
                _assert_compiled_equal(rq, (x,), want)


def _assert_compiled_equal(fn, args, want):
    """Compiled by Inductor with its widest vectors and with 256-bit (AVX2) ones: the same integers."""
    import torch._inductor.config as inductor_config

    for simdlen in (None, 256):
        with inductor_config.patch({"cpp.simdlen": simdlen}):
            torch._dynamo.reset()
            assert torch.equal(torch.compile(fn, dynamic=False)(*args).to(torch.int64), want), simdlen


def _add_case(ma, mb, s, bias, va, vb, lo, hi, za=None, zb=None, zp=None):
    """A stand-alone ``add`` node with the given constants and input bounds, as the fast backend builds it."""
    from types import SimpleNamespace

    from lowbit.runtime.fastpath import _fast_add

    node = SimpleNamespace(name="add", inputs=["a", "b"], output="y",
                           attrs={"multiplier_a": ma, "multiplier_b": mb, "shift": s, "bias": bias, "lo": lo, "hi": hi})
    fm = SimpleNamespace(_zp={"a": za, "b": zb, "y": zp}, bounds={"a": (-va, va), "b": (-vb, vb)}, requant={})
    return _fast_add(fm, node, {}), fm.requant["add"]


@pytest.mark.parametrize("path", ["int32", "below 2^53", "past 2^53 into codes", "wide"])
def test_residual_add_paths_are_exact_at_their_bounds(path):
    """The residual add in int32 (at the edge of ``2^31``) and int64 (sums below ``2^53``, sums up to ``2^55.6``
    into codes: large terms that cancel into the output window, exact ties; a wide output): random full-range
    inputs, the ends, values that land in the output window after cancelling and exact ties, against the
    reference's :func:`add_requant`."""
    from lowbit.runtime.reference import add_requant

    g = torch.Generator().manual_seed(11)
    n = 20000
    for trial in range(4):
        odd = int(torch.randint(1 << 28, 1 << 30, (1,), generator=g)) | 1
        b0 = int(torch.randint(-40, 40, (1,), generator=g))
        if path == "int32":
            ma, mb, s, bias, va, vb, lo, hi = 1 << 3, odd >> 17, 12, 1 << 11, 2**20, 2**17, 0, 15
            va = (2**31 - 1 - (1 << 11) - vb * mb - bias) // ma
        elif path == "below 2^53":
            ma, mb, s, bias, va, vb, lo, hi = 1 << 29, odd, 45, 0, 2**21, 2**22, 0, 15
        elif path == "past 2^53 into codes":  # up to 2^55.5; ties where b = b0 and a is a multiple of 2^16
            ma, mb, s, va, vb, lo, hi = 1 << 29, odd, 45, 2**25, 2**25, 0, 15
            bias = (1 << 44) - b0 * mb
        else:  # a wide output: no narrow window, int64
            ma, mb, s, bias, va, vb, lo, hi = 1 << 29, odd, 23, 0, 2**25, 2**25, -(2**31), 2**31 - 1
        if trial % 2:
            mb = -mb
            bias = (1 << 44) - b0 * mb if path == "past 2^53 into codes" else bias
        step, how = _add_case(ma, mb, s, bias, va, vb, lo, hi)
        assert how == ("int32" if path == "int32" else "int64"), how
        a = torch.randint(-va, va + 1, (n,), generator=g, dtype=torch.int64)
        b = torch.randint(-vb, vb + 1, (n,), generator=g, dtype=torch.int64)
        a[:4], b[:4] = torch.tensor([-va, va, va, -va]), torch.tensor([-vb, vb, -vb, vb])
        # terms that cancel into the output window: a ~ -(b*m_b + bias) / m_a, plus a few steps
        q = torch.randint(-3, 20, (n // 4,), generator=g)
        bw = torch.randint(-min(vb, va * abs(ma) // abs(mb)), min(vb, va * abs(ma) // abs(mb)) + 1, (n // 4,),
                           generator=g)
        aw = (q * (1 << s) - bw * mb - bias) // ma
        ok = aw.abs() <= va
        a[4:4 + int(ok.sum())], b[4:4 + int(ok.sum())] = aw[ok], bw[ok]
        if path == "past 2^53 into codes":  # exact ties: T = a*2^29 + 2^44 with a = 2^16 * q
            t = torch.arange(-3, 20) * (1 << 16)
            a[-t.numel():], b[-t.numel():] = t, b0
        want = add_requant(a.to(torch.int32), b.to(torch.int32), ma, mb, s, bias=bias, lo=lo, hi=hi).to(torch.int64)
        env = {"a": a.to(torch.int32), "b": b.to(torch.int32)}
        assert torch.equal(step(env).to(torch.int64), want)
        if trial == 0:
            _assert_compiled_equal(step, (env,), want)
