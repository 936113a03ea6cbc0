"""Crafted or corrupt .lowbit files: each is refused at load with one LowbitError line, never a traceback and never
a file that loads and then fails, wraps or splits the backends mid-run."""

import copy
import json
from fractions import Fraction

import pytest
import safetensors.torch
import torch

from lowbit.errors import LowbitError
from lowbit.ir import Graph
from lowbit.ir.format import FORMAT_NAME, MANIFEST_KEY, pack_tensor, write_model
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import CAPABILITIES, FastModel, available, forced_capability

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
needs_fast = pytest.mark.skipif(not available(), reason="no oneDNN quantized ops in this PyTorch build")


def _fast_matches(model, x):
    """The fast path equals the reference under every CPU capability, forced rather than read from this machine."""
    for cap in CAPABILITIES:
        with forced_capability(cap):
            assert torch.equal(FastModel(model, compile=False).run_int(x), model.run_int(x)), cap


def _quantize_input(lo=-8, hi=7, **attrs):
    return {"op": "quantize_input", "name": "q", "inputs": ["x"], "outputs": ["xq"],
            "attrs": {"bits": 4, "signed": True, "scale": 1.0, "lo": lo, "hi": hi, **attrs}}


def _graph(nodes, shape=(1,), tensors=None, entries=None):
    """An image graph: ``nodes`` (the first a quantize_input) then dequantize_output of the last value."""
    out = {"op": "dequantize_output", "name": "dq", "inputs": [nodes[-1]["outputs"][0]], "outputs": ["logits"],
           "attrs": {"scale": 1.0}}
    return {"format": FORMAT_NAME, "version": 1, "inputs": ["x"], "outputs": ["logits"],
            "input": {"shape": list(shape)}, "graph": [*nodes, out], "tensors": entries or {}}, tensors or {}


def _add_graph(m):
    """x in [-8, 7] -> w = x * 2^28 (a wide int32 value) -> (w*m + w*m) * 2^-62."""
    wide = {"op": "requantize", "name": "wide", "inputs": ["xq"], "outputs": ["w"],
            "attrs": {"multiplier": 2**28, "shift": 0, "bias": 0, "lo": INT32_MIN, "hi": INT32_MAX}}
    add = {"op": "add", "name": "add", "inputs": ["w", "w"], "outputs": ["s"],
           "attrs": {"multiplier_a": m, "multiplier_b": m, "shift": 62, "bias": 0, "lo": INT32_MIN, "hi": INT32_MAX}}
    return _graph([_quantize_input(), wide, add])


def _conv_graph():
    """quantize_input -> 3x3 conv (3-bit weights, per-channel requantization) -> flatten -> logits."""
    w, w_entry = pack_tensor(torch.randint(-4, 4, (4, 3, 3, 3), generator=torch.Generator().manual_seed(0)), 3, True)
    tensors = {"conv.weight": w, "conv.multiplier": torch.full((4,), 2**30, dtype=torch.int32),
               "conv.shift": torch.full((4,), 33, dtype=torch.int8), "conv.bias": torch.arange(4, dtype=torch.int64)}
    entries = {"conv.weight": w_entry, "conv.multiplier": {"dtype": "int32", "shape": [4]},
               "conv.shift": {"dtype": "int8", "shape": [4]}, "conv.bias": {"dtype": "int64", "shape": [4]}}
    conv = {"op": "conv2d", "name": "conv", "inputs": ["xq"], "outputs": ["c"],
            "attrs": {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "w_bits": 3,
                      "lo": 0, "hi": 15},
            "params": {"weight": "conv.weight", "multiplier": "conv.multiplier", "shift": "conv.shift",
                       "bias": "conv.bias"}}
    flat = {"op": "flatten", "name": "flat", "inputs": ["c"], "outputs": ["f"], "attrs": {"start_dim": 1}}
    return _graph([_quantize_input(-128, 127), conv, flat], (3, 8, 8), tensors, entries)


def _refused(manifest, tensors, match, tmp_path):
    """Written (the writer validates only the schema) and loaded: one LowbitError line naming the file."""
    path = write_model(tmp_path / "bad.lowbit", manifest, tensors)
    with pytest.raises(LowbitError, match=match) as e:
        Graph.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_an_add_that_could_wrap_int64_is_refused_at_load(tmp_path):
    # |w| <= 2^31, so 2 * 2^31 * (2^31 - 1) is below 2^63 but leaves no room for round_shift's 2^61 offset
    _refused(*_add_graph(2**31 - 1), "int64 could overflow", tmp_path)
    model = IntegerModel(Graph.from_manifest(*_add_graph(2**30)))  # 2^62: within the bound
    x = torch.tensor([[-8.0], [-3.0], [7.0]])
    want = [round(Fraction(2 * int(v) * 2**28 * 2**30, 2**62)) for v in x.reshape(-1).tolist()]
    assert model.run_int(x).reshape(-1).tolist() == want
    if available():
        _fast_matches(model, x)


@needs_fast
def test_fast_add_refuses_a_sum_beyond_int64():
    """A graph edited after loading (so never checked) still cannot make the fast add wrap."""
    model = IntegerModel(Graph.from_manifest(*_add_graph(2**30)))
    model.graph.node("add").attrs.update(multiplier_a=2**31 - 1, multiplier_b=2**31 - 1)
    with forced_capability("avx2"), pytest.raises(LowbitError, match="beyond int64"):
        FastModel(model, compile=False)


def test_concat_range_must_cover_its_inputs(tmp_path):
    def concat(lo, hi):
        cat = {"op": "concat", "name": "cat", "inputs": ["xq", "xq"], "outputs": ["c"],
               "attrs": {"axis": 1, "lo": lo, "hi": hi}}
        flat = {"op": "flatten", "name": "f", "inputs": ["c"], "outputs": ["fl"], "attrs": {"start_dim": 1}}
        return _graph([_quantize_input(), cat, flat], (1, 2, 2))

    _refused(*concat(0, 7), r"range \[0, 7\] does not cover input 'xq'", tmp_path)  # codes -8..-1 would wrap
    model = IntegerModel(Graph.from_manifest(*concat(-8, 7)))
    x = torch.tensor([[[[-3.0, 2.0], [5.0, -8.0]]]])
    assert model.run_int(x).tolist() == [[-3, 2, 5, -8] * 2]
    if available():
        _fast_matches(model, x)


def test_a_lookup_table_needs_uint8_input(tmp_path):
    q = _quantize_input(0, 255, bits=8, signed=False, scale=0.5)
    q["params"] = {"lut": "lut"}
    manifest, _ = _graph([q, {"op": "flatten", "name": "f", "inputs": ["xq"], "outputs": ["fl"],
                               "attrs": {"start_dim": 1}}], (1, 2), entries={"lut": {"dtype": "int16",
                                                                                   "shape": [1, 256]}})
    lut = (255 - torch.arange(256)).to(torch.int16).reshape(1, 256)
    _refused(manifest, {"lut": lut}, "'lut' maps uint8 pixels; this model's input is not uint8", tmp_path)


def _token_graph(lo, hi):
    """A version-2 graph: token ids -> embedding (float) -> quantize -> logits."""
    nodes = [{"op": "embedding", "name": "emb", "inputs": ["input_ids"], "outputs": ["e"], "params": {"weight": "w"},
              "domain": "float"},
             {"op": "quantize", "name": "qz", "inputs": ["e"], "outputs": ["q"], "domain": "int",
              "attrs": {"bits": 8, "signed": True, "scale": 2.0**-20, "lo": lo, "hi": hi}},
             {"op": "dequantize_output", "name": "dq", "inputs": ["q"], "outputs": ["logits"], "domain": "int",
              "attrs": {"scale": 1.0}}]
    return ({"format": FORMAT_NAME, "version": 2, "inputs": ["input_ids"], "outputs": ["logits"],
             "input": {"dtype": "int64", "shape": [3]}, "graph": nodes,
             "tensors": {"w": {"dtype": "float32", "shape": [5, 2]}}}, {"w": torch.randn(5, 2)})


@pytest.mark.parametrize("make", [lambda lo, hi: _graph([_quantize_input(lo, hi)]), _token_graph],
                         ids=["quantize_input", "quantize"])
def test_float_quantizers_clamp_to_a_range_exact_in_float32(make, tmp_path):
    # hi = 2^31 - 1 is 2^31 in float32: the clamped value wrapped to -2^31 in int32
    _refused(*make(-(2**31), 2**31 - 1), r"must lie within \[-2\^24, 2\^24\]", tmp_path)
    manifest, tensors = make(-(2**24), 2**24)
    Graph.load(write_model(tmp_path / "ok.lowbit", manifest, tensors))


def _write_raw(path, tensors, text):
    path.write_bytes(safetensors.torch.save(tensors, metadata={MANIFEST_KEY: text}))
    return path


def _text(edit):
    manifest, tensors = _conv_graph()
    edit(manifest)
    return json.dumps(manifest)


@pytest.mark.parametrize("text, match", [
    (_text(lambda m: m["graph"][2].update(op=["flatten"])), r"unknown op \['flatten'\]"),
    (_text(lambda m: m["tensors"]["conv.bias"].update(dtype=["int64"])), r"dtype \['int64'\] is not one of"),
    (_text(lambda m: m.update(input=[3, 8, 8])), "'input' must be a JSON object"),
    ('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON .maximum recursion depth"),
    (_text(lambda m: None)[:-1] + ', "x": ' + "9" * 5000 + "}", "not valid JSON .Exceeds the limit"),
], ids=["op list", "dtype list", "input list", "deep nesting", "huge integer"])
def test_malformed_manifests_are_one_error_line(tmp_path, text, match):
    path = _write_raw(tmp_path / "bad.lowbit", _conv_graph()[1], text)
    with pytest.raises(LowbitError, match=match) as e:
        Graph.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def _pool(attrs):
    def edit(m, t):
        m["graph"].insert(2, {"op": "adaptive_avgpool", "name": "ap", "inputs": ["c"], "outputs": ["p"],
                              "attrs": {"multiplier": 1, "shift": 0, "bias": 0, "lo": 0, "hi": 15, **attrs}})
        m["graph"][3]["inputs"] = ["p"]
    return edit


@pytest.mark.parametrize("edit, match", [
    (lambda m, t: m["graph"][1]["attrs"].update(stride=[0, 0]), r"'stride' must be an integer or two integers >= 1"),
    (lambda m, t: m["graph"][1]["attrs"].update(padding=[-1, -1]), r"'padding' must be .* >= 0"),
    (lambda m, t: m["graph"][1]["attrs"].update(dilation=[0, 0]), r"'dilation' must be .* >= 1"),
    (_pool({"output_size": [0, 1]}), "output_size must be two positive integers"),
    (lambda m, t: t.update({"conv.bias": torch.full((4,), 2**62, dtype=torch.int64)}), r"bias must be in \[-2\^61"),
    (lambda m, t: (m.update(outputs=["y"]), m["graph"][-1].update(outputs=["y"])), "output must be 'logits'"),
], ids=["conv stride 0", "conv padding -1", "conv dilation 0", "adaptive output 0", "bias 2^62", "output y"])
def test_files_that_would_fail_mid_run_are_refused_at_load(tmp_path, edit, match):
    manifest, tensors = copy.deepcopy(_conv_graph())
    edit(manifest, tensors)
    _refused(manifest, tensors, match, tmp_path)


def _widened(m, t):
    """A requantize that widens the codes to int32 before the conv: |x| up to 2^31."""
    m["graph"].insert(1, {"op": "requantize", "name": "wide", "inputs": ["xq"], "outputs": ["w"],
                          "attrs": {"multiplier": 2**24, "shift": 0, "bias": 0, "lo": INT32_MIN, "hi": INT32_MAX}})
    m["graph"][2]["inputs"] = ["w"]


def _then_conv_add(m, t):
    """A second conv over the first's output, adding that output back (conv2d_add); the first conv's declared
    range is widened to int32."""
    m["graph"][1]["attrs"].update(lo=INT32_MIN, hi=INT32_MAX)
    w, entry = pack_tensor(torch.ones(4, 4, 3, 3, dtype=torch.int32), 3, True)
    t.update({"c2.weight": w, "c2.multiplier": torch.full((4,), 2**30, dtype=torch.int32),
              "c2.shift": torch.full((4,), 40, dtype=torch.int8), "c2.bias": torch.zeros(4, dtype=torch.int64),
              "c2.residual_multiplier": torch.ones(4, dtype=torch.int32)})
    m["tensors"].update({"c2.weight": entry, **{f"c2.{k}": {"dtype": d, "shape": [4]} for k, d in (
        ("multiplier", "int32"), ("shift", "int8"), ("bias", "int64"), ("residual_multiplier", "int32"))}})
    m["graph"].insert(2, {"op": "conv2d_add", "name": "c2", "inputs": ["c", "c"], "outputs": ["c2"],
                          "attrs": {"stride": 1, "padding": 1, "dilation": 1, "groups": 1, "w_bits": 3, "lo": 0,
                                    "hi": 15},
                          "params": {k: f"c2.{k}" for k in ("weight", "multiplier", "shift", "bias",
                                                            "residual_multiplier")}})
    m["graph"][3]["inputs"] = ["c2"]


@pytest.mark.parametrize("edit, match", [
    (lambda m, t: (_widened(m, t), m["graph"][2].update(op="avgpool2d", params={}, attrs={
        "kernel_size": 3, "stride": 1, "padding": 1, "multiplier": 2**31 - 1, "shift": 40, "bias": 0, "lo": 0,
        "hi": 15})), r"\|acc\|·\|multiplier\| may reach 2\^65"),  # a 3x3 window of int32 values
    (_widened, r"\|acc\|·\|multiplier\| may reach 2\^6"),  # sum |w| * 2^31 * 2^30
    (_then_conv_add, r"\|acc\*m \+ b \+ r\*m_r\| may reach"),
], ids=["avgpool2d", "conv2d", "conv2d_add"])
def test_accumulators_that_could_wrap_int64_are_refused_at_load(tmp_path, edit, match):
    manifest, tensors = copy.deepcopy(_conv_graph())
    edit(manifest, tensors)
    _refused(manifest, tensors, match, tmp_path)


def test_the_conv_graph_itself_loads_and_runs():
    """The base of the edits above is valid: each refusal is the edit's."""
    for edit in (lambda m, t: None, _pool({"output_size": [2, 1]})):
        manifest, tensors = copy.deepcopy(_conv_graph())
        edit(manifest, tensors)
        assert IntegerModel(Graph.from_manifest(manifest, tensors)).run_int(torch.randn(2, 3, 8, 8)).shape[0] == 2
