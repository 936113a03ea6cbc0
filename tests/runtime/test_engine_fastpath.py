"""The reference runtime's load-time validation, the fast path against it, ONNX, the bench and latency table.

Fast-path tests take the ``capability`` fixture (tests/runtime/conftest.py): each runs with the CPU capability
forced to avx2, vnni and amx in turn, and asserts only what holds on any x86 machine under that assumption.
"""

import copy
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lowbit.cost import MeasuredProfile, latency_key
from lowbit.errors import LowbitError
from lowbit.export.exporter import export_model
from lowbit.ir.format import read_model, write_model
from lowbit.models import create_model
from lowbit.quant import Plan, calibrate_, quantize_
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import (
    CAPABILITIES,
    FastModel,
    available,
    compare,
    cpu_capability,
    detect_capability,
    forced_capability,
)

pytestmark = pytest.mark.skipif(not available(), reason="no oneDNN quantized ops in this PyTorch build")
PIXELS = {"mean": 0.5, "std": 0.25}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random resnet8 (width 0.5) at w4a4 with random BN statistics, exported."""
    torch.manual_seed(0)
    model = create_model("resnet8", width=0.5)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.randn(m.num_features, generator=g)
            m.running_var.data = torch.rand(m.num_features, generator=g) + 0.5
    quantize_(model, Plan.preset("w4a4", model))
    calibrate_(model, [torch.randn(32, 1, 28, 28, generator=g)])
    meta = {"model": {"name": "resnet8", "kwargs": {"width": 0.5}, "num_classes": 10}}
    return export_model(model.eval(), tmp_path_factory.mktemp("m") / "m.lowbit", input_shape=(1, 28, 28),
                        pixels=PIXELS, metadata=meta).path


def _node(manifest, name):
    return next(n for n in manifest["graph"] if n["name"] == name)


def _images(n=32, seed=1):
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_fast_path_agrees_with_reference(exported, capability):
    ref = IntegerModel.load(exported)
    fast = FastModel(ref, compile=False)
    assert fast.capability == capability and not fast.fallbacks
    x = _images()
    layers = compare(fast, ref, x)
    narrow = [v for v in layers.values() if v["narrow"]]
    assert narrow and all(v["max_diff"] == 0 for v in layers.values())  # bit-exact, every value
    assert torch.equal(fast.run_int(x), ref.run_int(x)) and torch.equal(fast(x), ref(x))


def test_exact_path_is_bit_exact_where_int8_would_saturate(tmp_path, capability):
    """8-bit weights with large codes on 8-bit signed input: u8 x s8 pairs could overflow int16 on AVX2, so
    there the layer takes the exact path; with VNNI or AMX the int8 kernel takes it (its exactness on such a
    CPU is checked by the AVX2 emulation test below, which needs no such CPU)."""
    torch.manual_seed(0)
    model = create_model("mlp", hidden=32)
    quantize_(model, Plan.preset("w4a4", model))  # fc1 and fc3 at w8a8
    calibrate_(model, [torch.randn(16, 1, 28, 28)])
    with torch.no_grad():  # large weight codes: |w| up to 127
        model.fc1.weight.copy_(model.fc1.weight.sign() * model.fc1.weight_quantizer.scale * 120)
    path = export_model(model.eval(), tmp_path / "mlp.lowbit", input_shape=(1, 28, 28)).path
    ref = IntegerModel.load(path)
    fast = FastModel(ref, compile=False)
    assert fast.paths["fc2"] == "int8"
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast.run_int(x), ref.run_int(x))
    if capability != "avx2":
        assert fast.paths["fc1"] == "int8"
        return
    assert fast.paths["fc1"].startswith("fp32 linear (u8 x s8 pair sums could saturate int16")
    got, want = fast.run_trace(x)["fc1"], ref.run_trace(x)["fc1"].to(torch.int64)
    assert want.max() > 0 and torch.equal(got, want)


@pytest.mark.parametrize("corrupt,match", [
    (lambda m, t: _node(m, "layer1.0.conv2")["params"].update(_node(m, "layer2.0.conv2")["params"]),
     "does not fit its"),
    (lambda m, t: t.__setitem__("conv1.shift", t["conv1.shift"].to(torch.int32)) or
     m["tensors"]["conv1.shift"].update(dtype="int32"), "shift must be int8"),
    (lambda m, t: _node(m, "conv1")["attrs"].update(lo=5, hi=1), "empty output range"),
    (lambda m, t: m["graph"][-1]["attrs"].update(scale=-1.0), "output scale"),
    (lambda m, t: m["input"].update(shape=[2, 28, 28]), "lut"),
    (lambda m, t: _node(m, "fc")["attrs"].update(w_bits=4), "packed as signed 4-bit"),
])
def test_mismatched_files_fail_at_load(exported, tmp_path, corrupt, match):
    manifest, tensors = read_model(exported)
    manifest, tensors = copy.deepcopy(manifest), dict(tensors)
    corrupt(manifest, tensors)
    path = write_model(tmp_path / "bad.lowbit", manifest, tensors)
    with pytest.raises(LowbitError, match=match) as e:
        IntegerModel.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_runtime_checks_inputs(exported):
    model = IntegerModel.load(exported)
    with pytest.raises(LowbitError, match="input shape"):
        model(torch.zeros(1, 1, 27, 28, dtype=torch.uint8))
    with pytest.raises(LowbitError, match="uint8"):
        model(torch.zeros(1, 1, 28, 28))


def test_onnx_runs_in_onnxruntime(exported, tmp_path):
    pytest.importorskip("onnxruntime")
    from lowbit.export.onnx_export import OnnxModel, export_onnx

    ref = IntegerModel.load(exported)
    x = _images(32, seed=3)
    for int4 in (True, False):
        path = export_onnx(ref, tmp_path / f"m{int4}.onnx", int4=int4)
        got = OnnxModel(path, threads=1)(x)
        assert got.shape == (32, 10)
        assert (got.argmax(1) == ref(x).argmax(1)).float().mean() >= 0.9
        assert torch.allclose(got, ref(x), rtol=0, atol=0.05 * float(ref(x).abs().max()))
    assert (tmp_path / "mTrue.onnx").stat().st_size < (tmp_path / "mFalse.onnx").stat().st_size  # INT4 packs


def test_latency_table_reads_as_measured_profile(exported, tmp_path, capability):
    from lowbit.deploy.bench import latency_table
    from lowbit.io import save_json

    table = latency_table(exported, batch=2, runs=2, warmup=1)
    path = save_json(tmp_path / "lat.json", table)
    profile = MeasuredProfile.from_json(path)
    names = [n.name for n in IntegerModel.load(exported).nodes if n.op in ("conv2d", "conv2d_add", "linear")]
    assert set(profile.table) == set(names)
    for entry in profile.table.values():
        assert {"2", "3", "4", "8", "32", latency_key(4, 8), latency_key(8, 2)} <= set(entry)
        assert all(v > 0 for v in entry.values())
    saved = json.loads(path.read_text())
    paths = saved["paths"]["layer1.0.conv1"]
    assert saved["capability"] == capability
    assert paths["4"] == paths["8"] == "int8" and paths["32"] == "fp32"
    # full-range w8a8 codes saturate int16 pair sums only without VNNI
    assert paths["8_exact"].startswith("exact") if capability == "avx2" else paths["8_exact"] == "int8"


def test_benchmark_rows(exported, capability):
    from lowbit.deploy.bench import benchmark, format_table

    res = benchmark(exported, [2], runs=2, warmup=1, budget_s=5, onnx=False)
    assert res["capability"] == capability
    variants = {r["variant"] for r in res["rows"]}
    int8 = {v for v in variants if v.startswith("PyTorch int8")}
    assert len(int8) == 1  # PT2E with torchao, eager torch.ao without
    assert variants == {"fp32 eager", "fp32 channels-last", "fp32 compiled", "bf16 autocast", "lowbit fast path"} | int8
    row = next(r for r in res["rows"] if r["variant"] == "lowbit fast path")
    assert row["median_ms"] > 0 and row["speedup_vs_fp32"] > 0 and row["peak_mib"] is not None
    assert all(v > 0 for v in res["compile_s"].values()) and "lowbit fast path (batch 2)" in res["compile_s"]
    text = format_table(res)
    assert "lowbit fast path" in text and "fewer than 30 runs" in text and "flags" in text
    assert f"fast path ({capability} assumed), bit-exact: " in text and "first-call compile: " in text
    other = [n for n, p in res["paths"].items() if not p.startswith("int8")]  # "int8 fused" is int8 too
    assert ("exact float conv for" in text) == bool(other)


def test_bench_lists_paths():
    """int8 layers, exact float layers with their reason, int64 requantizations and reference fallbacks."""
    from lowbit.deploy.bench import format_table

    result = {"machine": {"cpu": "x", "threads": 1, "flags": [], "torch": "2"}, "rows": [], "capability": "avx2",
              "sizes": {"lowbit_file_bytes": 1000, "fp32_weight_bytes": 4000},
              "paths": {"conv1": "fp32 conv2d (why)", "layer1.0.conv2": "int8", "fc": "int8 fused"},
              "requant": {"conv1": "int32", "add": "int64", "fc": "in the int8 kernel"}, "fallbacks": ["neg"]}
    line = next(v for v in format_table(result).splitlines() if v.startswith("fast path"))
    assert line == ("fast path (avx2 assumed), bit-exact: 2/3 conv/linear layers on oneDNN int8 (1 requantizing in "
                    "the kernel, uint8 out); exact float conv for conv1 [fp32 conv2d (why)]; glue requantization in "
                    "int32 x1, int64 x1; reference kernel for neg")


def test_int8_kernel_rounds_ties_like_requantize(capability):
    """Power-of-two multipliers and half-integer offsets: many exact ties, all rounded half to even alike."""
    from lowbit.ir.dyadic import requantize
    from lowbit.runtime.fastpath import _Val, layer_step
    from lowbit.runtime.reference import conv2d_int

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (2, 8, 6, 6), generator=g, dtype=torch.uint8)
    w = torch.randint(-8, 8, (8, 8, 3, 3), generator=g, dtype=torch.int32)
    p = {"weight": w, "multiplier": torch.full((8,), 2**30, dtype=torch.int32),  # M = 2^-(k-30)
         "shift": torch.tensor([33, 34, 35, 33, 34, 35, 33, 34], dtype=torch.int8),
         "bias": (torch.arange(8, dtype=torch.int64) - 4) * 2**33 + 2**32}  # offsets -3.5 .. 3.5 at k = 33
    a = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "lo": 0, "hi": 15}
    step, path = layer_step("conv2d", a, p, (0, 15), 0, 0, capability)
    got = step([_Val(x.contiguous(memory_format=torch.channels_last), 0)]).t.to(torch.int64)
    acc = conv2d_int(x, w, 1, 1)
    want = requantize(acc, p["multiplier"], p["shift"], p["bias"], lo=0, hi=15)
    exact = (acc * 2**30 + p["bias"].reshape(-1, 1, 1)).double() / 2.0 ** p["shift"].double().reshape(-1, 1, 1)
    assert path == "int8" and ((exact - exact.floor()) == 0.5).float().mean() > 0.05  # ties do occur
    assert torch.equal(got, want.to(torch.int64))


def test_capability_is_forced_not_read(monkeypatch, exported):
    """A forced block beats LOWBIT_CPU_ISA, which beats the CPU; ONEDNN_MAX_CPU_ISA caps what is detected."""
    monkeypatch.setenv("LOWBIT_CPU_ISA", "avx512_vnni")
    assert cpu_capability() == "vnni"
    with forced_capability("avx2"):
        assert cpu_capability() == "avx2"
        with forced_capability("AMX_INT8"):
            assert cpu_capability() == "amx" and FastModel(IntegerModel.load(exported)).capability == "amx"
        assert cpu_capability() == "avx2"
    assert cpu_capability() == "vnni"
    monkeypatch.setenv("LOWBIT_CPU_ISA", "sse4")
    with pytest.raises(LowbitError, match="LOWBIT_CPU_ISA 'sse4' is not a CPU int8 capability: choose one of "
                                          "avx2, vnni, amx"):
        cpu_capability()
    with pytest.raises(LowbitError, match="not a CPU int8 capability"):
        FastModel(IntegerModel.load(exported), capability="neon")
    monkeypatch.delenv("LOWBIT_CPU_ISA")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert detect_capability() == cpu_capability() == "avx2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert detect_capability() in CAPABILITIES[:2]


_AVX2_SCRIPT = """
import json
import torch
from lowbit.ir.dyadic import requantize
from lowbit.runtime.fastpath import _Val, cpu_capability, layer_step
from lowbit.runtime.reference import conv2d_int

g = torch.Generator().manual_seed(0)
x = torch.randint(200, 256, (2, 32, 5, 5), generator=g, dtype=torch.uint8)
w = torch.randint(100, 128, (8, 32, 3, 3), generator=g, dtype=torch.int32)  # 2 * 255 * 127 > 32767
p = {"weight": w, "multiplier": torch.full((8,), 2**30, dtype=torch.int32),
     "shift": torch.full((8,), 50, dtype=torch.int8), "bias": torch.zeros(8, dtype=torch.int64)}
a = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "lo": 0, "hi": 255}
want = requantize(conv2d_int(x, w, 1, 1), p["multiplier"], p["shift"], p["bias"], lo=0, hi=255).to(torch.int64)
xv = _Val(x.contiguous(memory_format=torch.channels_last), 0)
out = {"detected": cpu_capability()}
for cap in ("vnni", out["detected"]):
    step, path = layer_step("conv2d", a, p, (0, 255), 0, 0, cap)
    got = step([xv]).t.to(torch.int64)
    out[cap] = {"path": path, "equal": bool(torch.equal(got, want))}
print(json.dumps(out))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 oneDNN ISA emulation")
def test_avx2_emulation_saturates_int8_and_the_exact_path_does_not():
    """``ONEDNN_MAX_CPU_ISA=AVX2`` makes any newer x86 CPU run oneDNN's AVX2 int8 kernels: the capability is
    detected as avx2, the saturating layer takes the exact path and matches the reference, and the int8 kernel
    a VNNI machine would use really does saturate there (what the avx2 capability guards against)."""
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_CPU_ISA"}
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_AVX2_SCRIPT)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["detected"] == "avx2"
    assert out["avx2"]["path"].startswith("exact (int16") and out["avx2"]["equal"]
    assert out["vnni"]["path"] == "int8"
    if out["vnni"]["equal"]:
        pytest.skip("this oneDNN build does not honour ONEDNN_MAX_CPU_ISA: no saturation to show")
