"""The .lowbit file: round trip, and every kind of bad file is one LowbitError line naming the path."""

import copy
import json
import os

import pytest
import safetensors.torch
import torch

from lowbit.errors import LowbitError
from lowbit.export.format import (
    FORMAT_NAME,
    MANIFEST_KEY,
    OPS,
    OpSpec,
    load_codes,
    pack_tensor,
    read_model,
    register_op,
    validate_manifest,
    write_model,
)


def tiny_model():
    """quantize_input -> conv2d (3-bit packed weight, per-channel requant) -> relu -> flatten -> dequant."""
    g = torch.Generator().manual_seed(0)
    w_codes = torch.randint(-4, 4, (4, 3, 3, 3), generator=g)
    w, w_entry = pack_tensor(w_codes, 3, signed=True)
    tensors = {
        "conv.weight": w,
        "conv.multiplier": torch.full((4,), 2**30, dtype=torch.int64),
        "conv.shift": torch.full((4,), 40, dtype=torch.int64),
        "conv.bias": torch.arange(4, dtype=torch.int64),
    }
    manifest = {
        "format": FORMAT_NAME, "version": 1, "inputs": ["x"], "outputs": ["y"],
        "producer": {"tool": "lowbit", "note": "extra keys survive"},
        "graph": [
            {"op": "quantize_input", "name": "q", "inputs": ["x"], "outputs": ["x_q"],
             "attrs": {"bits": 8, "signed": True, "scale": 0.02, "lo": -128, "hi": 127}},
            {"op": "conv2d", "name": "conv", "inputs": ["x_q"], "outputs": ["c"],
             "attrs": {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "w_bits": 3,
                       "lo": 0, "hi": 15},
             "params": {"weight": "conv.weight", "multiplier": "conv.multiplier", "shift": "conv.shift",
                        "bias": "conv.bias"}},
            {"op": "relu", "name": "relu", "inputs": ["c"], "outputs": ["r"]},
            {"op": "flatten", "name": "flat", "inputs": ["r"], "outputs": ["f"], "attrs": {"start_dim": 1}},
            {"op": "dequantize_output", "name": "dq", "inputs": ["f"], "outputs": ["y"],
             "attrs": {"scale": 0.1}},
        ],
        "tensors": {
            "conv.weight": w_entry,
            "conv.multiplier": {"dtype": "int64", "shape": [4]},
            "conv.shift": {"dtype": "int64", "shape": [4]},
            "conv.bias": {"dtype": "int64", "shape": [4]},
        },
    }
    return manifest, tensors, w_codes


def test_round_trip(tmp_path):
    manifest, tensors, w_codes = tiny_model()
    path = write_model(tmp_path / "m.lowbit", manifest, tensors)
    assert os.listdir(tmp_path) == ["m.lowbit"]  # atomic write leaves no temp file
    got_manifest, got = read_model(path)
    assert got_manifest == manifest
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert torch.equal(load_codes(got_manifest, got, "conv.weight"), w_codes.to(torch.int32))
    assert torch.equal(load_codes(got_manifest, got, "conv.shift"), tensors["conv.shift"])


def _write_raw(path, tensors, manifest=None):
    metadata = None if manifest is None else {MANIFEST_KEY: json.dumps(manifest)}
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    return path


def _assert_one_line_error(path, match):
    with pytest.raises(LowbitError, match=match) as info:
        read_model(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_truncated_file(tmp_path):
    manifest, tensors, _ = tiny_model()
    good = write_model(tmp_path / "good.lowbit", manifest, tensors).read_bytes()
    for cut in (0, 5, 20, len(good) // 2, len(good) - 1):
        bad = tmp_path / f"cut{cut}.lowbit"
        bad.write_bytes(good[:cut])
        _assert_one_line_error(bad, "not a .lowbit file")


def test_random_bytes_and_pickle_are_rejected_without_running_code(tmp_path):
    (tmp_path / "rand.lowbit").write_bytes(os.urandom(4096))
    _assert_one_line_error(tmp_path / "rand.lowbit", "not valid safetensors")
    torch.save({"w": torch.zeros(3)}, tmp_path / "ckpt.pt")  # a pickle is never unpickled
    _assert_one_line_error(tmp_path / "ckpt.pt", "not valid safetensors")
    _assert_one_line_error(tmp_path / "missing.lowbit", "file not found")


def test_plain_safetensors_without_manifest(tmp_path):
    path = _write_raw(tmp_path / "plain.safetensors", {"w": torch.zeros(2)})
    _assert_one_line_error(path, "without a 'lowbit_manifest'")
    path = tmp_path / "bad_manifest.lowbit"
    path.write_bytes(safetensors.torch.save({"w": torch.zeros(2)}, metadata={MANIFEST_KEY: "{not json"}))
    _assert_one_line_error(path, "not valid JSON")


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_wrong_version(tmp_path, version):
    manifest, tensors, _ = tiny_model()
    manifest["version"] = version
    _assert_one_line_error(_write_raw(tmp_path / "v.lowbit", tensors, manifest), "version")


def test_wrong_format_name(tmp_path):
    manifest, tensors, _ = tiny_model()
    manifest["format"] = "onnx"
    _assert_one_line_error(_write_raw(tmp_path / "f.lowbit", tensors, manifest), "format is 'onnx'")


@pytest.mark.parametrize("name, tensor, match", [
    ("conv.bias", torch.arange(4, dtype=torch.int32), "is int32, declared int64"),
    ("conv.bias", torch.arange(5, dtype=torch.int64), r"shape \[5\], declared \[4\]"),
    ("conv.weight", torch.zeros(40, dtype=torch.uint8), "pack into 41 bytes"),  # 108 codes * 3 bits
    ("conv.weight", torch.zeros(41, dtype=torch.int8), "is int8, declared uint8"),
    ("extra", torch.zeros(1), "not declared"),
])
def test_tensor_mismatch(tmp_path, name, tensor, match):
    manifest, tensors, _ = tiny_model()
    tensors[name] = tensor
    _assert_one_line_error(_write_raw(tmp_path / "t.lowbit", tensors, manifest), match)


def test_missing_tensor(tmp_path):
    manifest, tensors, _ = tiny_model()
    del tensors["conv.shift"]
    _assert_one_line_error(_write_raw(tmp_path / "t.lowbit", tensors, manifest), "declared but missing")


def _edit(fn):
    manifest, _, _ = tiny_model()
    fn(manifest)
    return manifest


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("graph"), "'graph'"),
    (lambda m: m["graph"][1].update(op="conv3d"), "unknown op 'conv3d'"),
    (lambda m: m["graph"][1]["attrs"].pop("groups"), r"needs attrs \['groups'\]"),
    (lambda m: m["graph"][1]["params"].pop("weight"), r"needs params \['weight'\]"),
    (lambda m: m["graph"][1]["params"].update(weight="nope"), "not declared in 'tensors'"),
    (lambda m: m["graph"][1].update(inputs=["r"]), "not a graph input or an earlier node's output"),
    (lambda m: m["graph"][2].update(outputs=["c"]), "defined twice"),
    (lambda m: m["graph"][2].update(name="conv"), "duplicate node name"),
    (lambda m: m["graph"][2].update(inputs=["c", "c"]), "takes 1 input"),
    (lambda m: m["graph"][2].update(op="concat", attrs={"axis": 1, "lo": 0, "hi": 7}), "takes at least 2 input"),
    (lambda m: m.update(outputs=["z"]), "never computed"),
    (lambda m: m["tensors"]["conv.weight"].update(bits=5), "bits must be one of"),
    (lambda m: m["tensors"]["conv.weight"].pop("signed"), "needs 'signed'"),
    (lambda m: m["tensors"]["conv.bias"].update(shape=[-1]), "non-negative"),
    (lambda m: m["tensors"]["conv.bias"].update(dtype="complex64"), "dtype 'complex64'"),
])
def test_schema_errors(edit, match):
    with pytest.raises(LowbitError, match=match):
        validate_manifest(_edit(edit))


def test_writer_validates_and_writes_nothing(tmp_path):
    manifest, tensors, _ = tiny_model()
    bad = copy.deepcopy(manifest)
    bad["graph"][0]["attrs"]["scale"] = float("nan")  # not strict JSON
    with pytest.raises(LowbitError, match="cannot write"):
        write_model(tmp_path / "m.lowbit", bad, tensors)
    tensors["conv.bias"] = tensors["conv.bias"].to(torch.int32)
    with pytest.raises(LowbitError, match="declared int64"):
        write_model(tmp_path / "m.lowbit", manifest, tensors)
    assert os.listdir(tmp_path) == []


def test_op_registry_is_extensible():
    assert "conv2d" in OPS
    with pytest.raises(LowbitError, match="already registered"):
        register_op("conv2d", OpSpec(1))
    register_op("test_sigmoid_lut", OpSpec(1, params=("table",)))
    try:
        manifest = _edit(lambda m: m["graph"][2].update(op="test_sigmoid_lut", params={"table": "conv.bias"}))
        validate_manifest(manifest)
    finally:
        del OPS["test_sigmoid_lut"]
