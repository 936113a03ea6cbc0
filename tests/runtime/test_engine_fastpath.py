"""The reference runtime's load-time validation, the fast path against it, ONNX, the bench and latency table."""

import copy
import json

import pytest
import torch
from torch import nn

from lowbit.cost import MeasuredProfile, latency_key
from lowbit.errors import LowbitError
from lowbit.export.exporter import export_model
from lowbit.export.format import read_model, write_model
from lowbit.models import create_model
from lowbit.quant import Plan, calibrate_, quantize_
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import FastModel, available, compare

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


def test_fast_path_agrees_with_reference(exported):
    ref = IntegerModel.load(exported)
    fast = FastModel(ref)
    x = _images()
    layers = compare(fast, ref, x)
    narrow = [v for v in layers.values() if v["narrow"]]
    assert narrow and all(v["frac_diff"] <= 1e-3 and v["max_diff"] <= 2 for v in narrow)
    got, want = fast(x), ref(x)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95
    assert torch.allclose(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))


def test_exact_path_is_bit_exact_where_int8_would_saturate(tmp_path):
    """8-bit weights with large codes on 8-bit signed input: u8 x s8 pairs could overflow int16 on AVX2."""
    torch.manual_seed(0)
    model = create_model("mlp", hidden=32)
    quantize_(model, Plan.preset("w4a4", model))  # fc1 and fc3 at w8a8
    calibrate_(model, [torch.randn(16, 1, 28, 28)])
    with torch.no_grad():  # large weight codes: |w| up to 127
        model.fc1.weight.copy_(model.fc1.weight.sign() * model.fc1.weight_quantizer.scale * 120)
    path = export_model(model.eval(), tmp_path / "mlp.lowbit", input_shape=(1, 28, 28)).path
    ref = IntegerModel.load(path)
    fast = FastModel(ref, vnni=False)
    assert fast.paths["fc1"].startswith("exact (int16") and fast.paths["fc2"] == "int8"
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    got, want = fast.run(x, trace=True)["fc1"].codes(), ref.run_trace(x)["fc1"].to(torch.int64)
    assert want.max() > 0 and torch.equal(got, want)  # fc1's output is narrow codes (only fc2 reads it)


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


def test_latency_table_reads_as_measured_profile(exported, tmp_path):
    from lowbit.io import save_json
    from lowbit.runtime.bench import latency_table

    table = latency_table(exported, batch=2, runs=2, warmup=1)
    path = save_json(tmp_path / "lat.json", table)
    profile = MeasuredProfile.from_json(path)
    names = [n["name"] for n in IntegerModel.load(exported).nodes if n["op"] in ("conv2d", "linear")]
    assert set(profile.table) == set(names)
    for entry in profile.table.values():
        assert {"2", "3", "4", "8", "32", latency_key(4, 8), latency_key(8, 2)} <= set(entry)
        assert all(v > 0 for v in entry.values())
    paths = json.loads(path.read_text())["paths"]["layer1.0.conv1"]
    assert paths["4"] == paths["8"] == "int8" and paths["8_exact"].startswith("exact") and paths["32"] == "fp32"


def test_benchmark_rows(exported):
    from lowbit.runtime.bench import benchmark, format_table

    res = benchmark(exported, [2], runs=2, warmup=1, budget_s=5, onnx=False)
    variants = {r["variant"] for r in res["rows"]}
    assert variants == {"fp32 eager", "fp32 channels-last", "bf16 autocast", "lowbit fast path"}
    row = next(r for r in res["rows"] if r["variant"] == "lowbit fast path")
    assert row["median_ms"] > 0 and row["speedup_vs_fp32"] > 0 and row["peak_mib"] is not None
    text = format_table(res)
    assert "lowbit fast path" in text and "fewer than 30 runs" in text and "flags" in text


def test_int8_kernel_rounds_ties_like_requantize():
    """Power-of-two multipliers and half-integer offsets: many exact ties, all rounded half to even alike."""
    from lowbit.runtime.dyadic import requantize
    from lowbit.runtime.fastpath import _Val, layer_step
    from lowbit.runtime.reference import conv2d_int

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (2, 8, 6, 6), generator=g, dtype=torch.uint8)
    w = torch.randint(-8, 8, (8, 8, 3, 3), generator=g, dtype=torch.int32)
    p = {"weight": w, "multiplier": torch.full((8,), 2**30, dtype=torch.int32),  # M = 2^-(k-30)
         "shift": torch.tensor([33, 34, 35, 33, 34, 35, 33, 34], dtype=torch.int8),
         "bias": (torch.arange(8, dtype=torch.int64) - 4) * 2**33 + 2**32}  # offsets -3.5 .. 3.5 at k = 33
    a = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "lo": 0, "hi": 15}
    step, path = layer_step("conv2d", a, p, (0, 15), 0, 0, vnni=False)
    got = step([_Val(x.contiguous(memory_format=torch.channels_last), 0)]).t.to(torch.int64)
    acc = conv2d_int(x, w, 1, 1)
    want = requantize(acc, p["multiplier"], p["shift"], p["bias"], lo=0, hi=15)
    exact = (acc * 2**30 + p["bias"].reshape(-1, 1, 1)).double() / 2.0 ** p["shift"].double().reshape(-1, 1, 1)
    assert path == "int8" and ((exact - exact.floor()) == 0.5).float().mean() > 0.05  # ties do occur
    assert torch.equal(got, want.to(torch.int64))
