"""The GPU path against the reference runtime: bit-exact in CPU emulation, and on CUDA when there is one."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.exporter import export_model
from lowbit.models import create_model
from lowbit.quant import Plan, calibrate_, quantize_
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.gpu import (
    FP8,
    GpuModel,
    LayerPath,
    fp8_bounds_ok,
    fp8_codes_mm,
    fp8_exact,
    fp8_mm,
    fp8_representable,
    int8_codes_mm,
    int8_mm,
    plan_layer,
)

PIXELS = {"mean": 0.5, "std": 0.25}
MIXED = {"conv1": (8, 8), "layer1.0.conv1": (4, 4), "layer1.0.conv2": (2, 4), "layer2.0.conv1": (4, 2),
         "layer2.0.conv2": (3, 3), "layer2.0.downsample.0": (8, 4), "layer3.0.conv1": (2, 8),
         "layer3.0.conv2": (8, 2), "layer3.0.downsample.0": (4, 8), "fc": (8, 8)}


def _export(path, model, plan, shape=(1, 28, 28), pixels=PIXELS):
    """Random BN statistics (so requantization is not trivial), quantized, calibrated on noise, exported."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.randn(m.num_features, generator=g)
            m.running_var.data = torch.rand(m.num_features, generator=g) + 0.5
    quantize_(model, plan)
    calibrate_(model, [torch.randn(16, *shape, generator=g)])
    return IntegerModel.load(export_model(model.eval(), path, input_shape=shape, pixels=pixels).path)


@pytest.fixture(scope="module")
def w4a4(tmp_path_factory):
    """resnet8 (width 0.5) at W4A4, first/last layers at 8 bits (as the fast-path tests use)."""
    torch.manual_seed(0)
    model = create_model("resnet8", width=0.5)
    return _export(tmp_path_factory.mktemp("m") / "w4a4.lowbit", model, Plan.preset("w4a4", model))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """resnet8 with 2/3/4/8-bit weights and activations in every combination the paths distinguish."""
    torch.manual_seed(1)
    return _export(tmp_path_factory.mktemp("m") / "mixed.lowbit", create_model("resnet8", width=0.5), Plan(MIXED))


def _images(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    checker = (torch.arange(28).reshape(-1, 1) + torch.arange(28)) % 2 * 255
    worst = torch.stack([torch.full((1, 28, 28), 255), torch.zeros(1, 28, 28), checker[None]]).to(torch.uint8)
    return torch.cat([rand, worst])  # random, all white, all black, checkerboard (saturating input codes)


def _assert_trace_equal(gpu, ref, x):
    got, want = gpu.run_trace(x), ref.run_trace(x)
    assert set(got) == set(want)
    bad = [k for k in want if not torch.equal(got[k].cpu().to(torch.int64), want[k].to(torch.int64))]
    assert not bad, f"values differ from the reference: {bad}"
    return want


# ------------------------------------------------------------------------------------- exactness rules
def test_fp8_represents_exactly_the_integers_up_to_16():
    v = torch.arange(-16, 17, dtype=torch.float32)
    assert torch.equal(v.to(FP8).to(torch.float32), v)
    assert fp8_representable(v)
    for bad in (17, -17, 33):
        assert not fp8_representable(torch.tensor([float(bad)]))


def test_fp8_bound_is_float32_exactness():
    assert fp8_bounds_ok(139810, 15, 8)  # 4-bit codes: 139810 * 120 = 2^24 - 16
    assert not fp8_bounds_ok(139811, 15, 8)
    assert not fp8_bounds_ok(2**16, 16, 16)  # exactly 2^24: refused
    k = 139810  # all products -120, every partial sum a multiple of 120 below 2^24: exact in any order
    x, w = torch.full((1, k), 15), torch.full((2, k), -8)
    exact = x.to(FP8).float() @ w.to(FP8).float().T  # fp8 operands, fp32 sums: the bound holds at this K
    assert torch.equal(exact, torch.full((1, 2), -120.0 * k))
    assert not fp8_exact(x, w) and fp8_exact(x[:, :16384], w[:, :16384])  # but only K <= 16384 was measured
    assert not fp8_exact(torch.full((1, 4), 17), torch.ones(1, 4))
    with pytest.raises(ValueError, match="2\\^24"):
        fp8_codes_mm(torch.full((1, 20000), 15), torch.full((1, 20000), -8), emulate=True)


@pytest.mark.parametrize("k", [64, 576, 4608, 16384])
def test_fp8_worst_case_products(k):
    """All products at -120 (performance.md §8's worst case) and alternating-sign saturated operands."""
    x, w = torch.full((3, k), 15), torch.full((5, k), -8)
    w[1::2] = 7
    x[1, ::2] = 0
    assert torch.equal(fp8_codes_mm(x, w, emulate=True), x @ w.T)


@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 40), signed=st.booleans(),
       seed=st.integers(0, 2**31 - 1), saturate=st.booleans())
def test_int8_offset_trick_is_exact(m, k, n, signed, seed, saturate):
    """Unsigned 8-bit codes enter _int_mm as x - 128 and get 128 * sum(w) back; padding adds zeros."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-128, 127) if signed else (0, 255)
    x = torch.randint(lo, hi + 1, (m, k), generator=g)
    w = torch.randint(-128, 128, (n, k), generator=g)
    if saturate:
        x[:, ::2], w[::2] = hi, -128
    got = int8_codes_mm(x, w, offset=0 if signed else 128, emulate=True)
    assert got.dtype == torch.int64 and torch.equal(got, x @ w.T)


@given(m=st.integers(1, 33), k=st.integers(1, 50), n=st.integers(1, 35), bits=st.sampled_from([2, 3, 4]),
       seed=st.integers(0, 2**31 - 1))
def test_fp8_padding_keeps_products_exact(m, k, n, bits, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2**bits, (m, k), generator=g)
    w = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=g)
    assert torch.equal(fp8_codes_mm(x, w, emulate=True), x @ w.T)


def test_gemm_operands_follow_the_cuda_layout_rules():
    a = torch.zeros(4, 32, dtype=FP8)
    col = torch.zeros(16, 32, dtype=FP8).t()
    assert fp8_mm(a, col, emulate=True).shape == (4, 16)
    with pytest.raises(ValueError, match="column-major"):
        fp8_mm(a, torch.zeros(32, 16, dtype=FP8), emulate=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_mm(torch.zeros(4, 24, dtype=FP8), torch.zeros(16, 24, dtype=FP8).t(), emulate=True)
    with pytest.raises(ValueError, match="M >= 17"):
        int8_mm(torch.zeros(16, 8, dtype=torch.int8), torch.zeros(8, 8, dtype=torch.int8).t(), emulate=True)


def test_plan_layer_rules():
    assert plan_layer(576, (0, 15), 4).path == "fp8"
    p = plan_layer(32, (0, 255), 8)
    assert (p.path, p.offset) == ("int8", 128) and "128*sum(w)" in p.why
    assert plan_layer(9, (-128, 127), 8).offset == 0
    p = plan_layer(576, (0, 15), 4, fp8=False)
    assert p.path == "int8" and "no fp8" in p.why
    assert plan_layer(20000, (0, 15), 4).why.startswith("fp8 refused: K = 20000")
    assert plan_layer(64, (-(2**31), 2**31 - 1), 4).path == "reference"
    p = plan_layer(2**17, (0, 255), 8)
    assert p.path == "reference" and "2^31" in p.why
    assert isinstance(p, LayerPath) and str(p).startswith("reference: ")


# ------------------------------------------------------------------------------------------ whole models
def test_w4a4_is_bit_exact_and_runs_4bit_layers_on_fp8(w4a4):
    gpu = GpuModel(w4a4, emulate=True)
    paths = gpu.layer_paths()
    assert paths["conv1"].path == "int8" and paths["conv1"].offset == 0  # signed 8-bit input codes
    assert paths["fc"].path == "int8" and paths["fc"].offset == 128  # unsigned 8-bit pooled codes
    assert all(p.path == "fp8" for n, p in paths.items() if n not in ("conv1", "fc"))
    x = _images()
    want = _assert_trace_equal(gpu, w4a4, x)
    assert torch.equal(gpu(x), w4a4(x))
    assert int(want["layer1.0.conv1"].max()) == 15  # activation codes do reach saturation


def test_mixed_bits_are_bit_exact(mixed):
    gpu = GpuModel(mixed, emulate=True)
    paths = gpu.layer_paths()
    for name, (w_bits, a_bits) in MIXED.items():
        want = "fp8" if w_bits <= 4 and a_bits <= 4 else "int8"
        assert paths[name].path == want, (name, paths[name])
    assert paths["layer3.0.conv1"].offset == 128 and paths["layer2.0.downsample.0"].offset == 0
    _assert_trace_equal(gpu, mixed, _images(seed=2))


def test_worst_case_weights_and_inputs(mixed):
    """Every weight code at an extreme of its range (random sign), saturating images: the largest sums."""
    ref = copy.copy(mixed)
    ref.params = {k: dict(v) for k, v in mixed.params.items()}
    g = torch.Generator().manual_seed(3)
    for node in ref.nodes:
        if node.op in ("conv2d", "conv2d_add", "linear"):
            p, b = ref.params[node.name], node.attrs["w_bits"]
            p["weight"] = torch.where(torch.rand(p["weight"].shape, generator=g) < 0.5,
                                      -(2 ** (b - 1)), 2 ** (b - 1) - 1).to(torch.int32)
    gpu = GpuModel(ref, emulate=True)
    want = _assert_trace_equal(gpu, ref, _images(4, seed=4))
    narrow = [n for n in ref.nodes if n.op == "conv2d" and n.attrs["hi"] < 2**31 - 1]
    assert narrow and all(int(want[n.outputs[0]].max()) == n.attrs["hi"] for n in narrow)  # saturated


def test_large_k_refuses_fp8_then_int8(tmp_path):
    """fc1 has K = 512*512: at 4 bits K*8*8 = 2^24 (fp8 refused, int8 exact); at 8 bits K*128*128 >= 2^31."""
    paths = {}
    for bits in (4, 8):
        torch.manual_seed(0)
        model = create_model("mlp", image_size=512, hidden=8)
        ref = _export(tmp_path / f"big{bits}.lowbit", model, Plan({"fc1": (bits, bits), "fc2": (4, 4),
                                                                   "fc3": (8, 8)}), (1, 512, 512), None)
        gpu = GpuModel(ref, emulate=True)
        paths[bits] = gpu.layer_paths()["fc1"]
        x = torch.randn(3, 1, 512, 512, generator=torch.Generator().manual_seed(bits)) * 4  # saturates
        _assert_trace_equal(gpu, ref, x)
    assert paths[4].path == "int8" and "fp8 refused" in paths[4].why and "2^24" in paths[4].why
    assert paths[8].path == "reference" and "2^31" in paths[8].why


def test_grouped_dilated_strided_conv(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    ref = _export(tmp_path / "g.lowbit", model, Plan({"0": (8, 8), "3": (4, 4), "8": (8, 8)}), (1, 12, 12))
    gpu = GpuModel(ref, emulate=True)
    assert gpu.layer_paths()["3"].path == "fp8" and "4 groups" in gpu.layer_paths()["3"].why
    x = torch.randint(0, 256, (5, 1, 12, 12), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    _assert_trace_equal(gpu, ref, x)


def test_real_scaled_mm_and_int_mm_on_cpu(w4a4):
    """The non-emulated call sequence (torch._scaled_mm / torch._int_mm, same operands) on their CPU kernels."""
    try:
        one = torch.ones(())
        torch._scaled_mm(torch.zeros(16, 16, dtype=FP8), torch.zeros(16, 16, dtype=FP8).t(), scale_a=one,
                         scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no CPU _scaled_mm in this build: {str(e).splitlines()[0]}")
    _assert_trace_equal(GpuModel(w4a4, device="cpu"), w4a4, _images(4, seed=6))


@pytest.mark.slow
def test_compiled_epilogue_is_bit_exact(w4a4):
    """Inductor's fused requantization (about 30 s to compile on a small CPU) equals the eager integer ops."""
    _assert_trace_equal(GpuModel(w4a4, emulate=True, compile=True), w4a4, _images(4, seed=8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_without_cuda_the_error_names_emulation(w4a4):
    with pytest.raises(LowbitError, match="emulate=True"):
        GpuModel(w4a4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_bench_exits_2_without_cuda():
    bench = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
    r = subprocess.run([sys.executable, str(bench)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "CUDA is not available" in r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["w4a4", "mixed"])
def test_cuda_matches_reference(which, request):
    ref = request.getfixturevalue(which)
    gpu = GpuModel(ref, device="cuda")
    if torch.cuda.get_device_capability() >= (8, 9):
        assert any(p.path == "fp8" for p in gpu.layer_paths().values())
    x = _images(16, seed=7)
    _assert_trace_equal(gpu, ref, x)
    assert torch.equal(gpu.run_int(x.cuda()).cpu(), ref.run_int(x))
