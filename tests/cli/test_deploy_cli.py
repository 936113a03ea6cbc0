"""``lowbit export / infer / bench`` through the CLI, and every bad .lowbit file is one line with exit code 2."""

import copy
import json

import numpy as np
import pytest
import torch

from lowbit.cli.main import main
from lowbit.data import synthetic, write_idx
from lowbit.export.format import read_model, write_model
from lowbit.io import save_checkpoint
from lowbit.models import create_model
from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
from lowbit.train.checkpoint import model_spec


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A quantized run directory (calibrated, not fine-tuned: the CLI, not accuracy, is under test)."""
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "width": 0.5}
    model = create_model("resnet8", 10, **kwargs)
    plan, cfg = Plan.preset("w4a4", model), QuantConfig()
    quantize_(model, plan, cfg)
    calibrate_(model, [(x, y) for x, y in _batches()])
    root = tmp_path_factory.mktemp("run")
    save_checkpoint(root / "checkpoint.pt", {
        "kind": "quantized", "spec": model_spec("resnet8", kwargs, 10, (1, 28, 28), "synthetic"),
        "plan": plan.to_dict(), "quant_config": cfg.to_dict(), "state_dict": model.state_dict(), "source": None})
    return root


def _batches():
    from lowbit.data import iterate

    return iterate(synthetic().train, 64, limit=64)


@pytest.fixture(scope="module")
def lowbit_file(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "m.lowbit"
    assert main(["export", "--from", str(run_dir), "--out", str(out)]) == 0
    return out


def _run(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_verify_infer(run_dir, lowbit_file, tmp_path, capsys):
    rc, out, _ = _run(["export", "--from", run_dir, "--out", tmp_path / "v.lowbit", "--verify", "--limit", 32,
                       "--report", tmp_path / "r.json"], capsys)
    assert rc == 0 and "smaller" in out and "bit-exact on every image" in out and "fast path" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["simulation"]["bit_exact"] and report["images"] == 32
    for backend in ("reference", "fast"):
        rc, out, _ = _run(["infer", lowbit_file, "--backend", backend, "--data", "synthetic", "--limit", 40],
                          capsys)
        assert rc == 0 and f"{backend}: accuracy" in out and "40 images" in out


def test_infer_predicts_npy_and_idx_images(lowbit_file, tmp_path, capsys):
    test = synthetic().test
    images = test.images[:5, 0].numpy()
    np.save(tmp_path / "x.npy", images)
    write_idx(tmp_path / "x.idx.gz", images)
    np.save(tmp_path / "y.npy", test.labels[:5].numpy())
    outs = []
    for f in ("x.npy", "x.idx.gz"):
        rc, out, _ = _run(["infer", lowbit_file, "--images", tmp_path / f, "--labels", tmp_path / "y.npy",
                           "--out", tmp_path / "p.json"], capsys)
        assert rc == 0 and "accuracy" in out
        outs.append(json.loads((tmp_path / "p.json").read_text())["predictions"])
        assert [line.split("\t")[0] for line in out.splitlines()[:5]] == ["0", "1", "2", "3", "4"]
    assert outs[0] == outs[1] and len(outs[0]) == 5
    np.save(tmp_path / "bad.npy", np.zeros((2, 27, 28), np.uint8))
    rc, _, err = _run(["infer", lowbit_file, "--images", tmp_path / "bad.npy"], capsys)
    assert rc == 2 and "do not fit the model's input" in err and err.count("\n") == 1


def test_bench_and_latency_table(lowbit_file, tmp_path, capsys):
    rc, out, err = _run(["bench", lowbit_file, "--batch", "1,2", "--runs", 2, "--warmup", 1, "--no-onnx", "--quiet",
                         "--out", tmp_path / "b.json", "--latency-table", tmp_path / "lat.json",
                         "--table-batch", 1], capsys)
    assert rc == 0 and "lowbit fast path" in out and "bf16 autocast" in out
    res = json.loads((tmp_path / "b.json").read_text())
    assert {r["batch"] for r in res["rows"]} == {1, 2} and res["machine"]["flags"] is not None
    from lowbit.cost import MeasuredProfile

    assert "layer1.0.conv1" in MeasuredProfile.from_json(tmp_path / "lat.json").table
    rc, _, err = _run(["bench", lowbit_file, "--batch", "x"], capsys)
    assert rc == 2 and "--batch" in err


def test_onnx_export(run_dir, lowbit_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    rc, out, _ = _run(["export", "--from", run_dir, "--format", "onnx", "--out", tmp_path / "m.onnx"], capsys)
    assert rc == 0 and (tmp_path / "m.onnx").stat().st_size > 0
    rc, out, _ = _run(["export", "--from", lowbit_file, "--format", "onnx", "--out", tmp_path / "c.onnx"], capsys)
    assert rc == 0 and "QDQ ONNX" in out
    rc, out, _ = _run(["infer", lowbit_file, "--backend", "onnx", "--data", "synthetic", "--limit", 16], capsys)
    assert rc == 0 and "onnx: accuracy" in out


def _truncate(path, out):
    out.write_bytes(path.read_bytes()[:-100])


def _corrupt_header(path, out):
    data = bytearray(path.read_bytes())
    data[20:40] = b"\x00" * 20
    out.write_bytes(bytes(data))


def _wrong_declared_shape(path, out):
    """Valid safetensors and manifest JSON, but a packed tensor's declared shape does not match its bytes."""
    manifest, tensors = read_model(path)
    manifest = copy.deepcopy(manifest)
    manifest["tensors"]["fc.weight"]["shape"][0] -= 1
    out.write_bytes(_raw(manifest, dict(tensors)))


def _raw(manifest, tensors):
    import safetensors.torch

    from lowbit.export.format import MANIFEST_KEY

    return safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})


def _mismatched_graph(path, out):
    """Every tensor declared and present, but a layer's weights belong to another layer."""
    manifest, tensors = read_model(path)
    manifest = copy.deepcopy(manifest)
    node = next(n for n in manifest["graph"] if n["name"] == "layer1.0.conv2")
    node["params"] = dict(next(n for n in manifest["graph"] if n["name"] == "layer2.0.conv2")["params"])
    write_model(out, manifest, tensors)


def _future_version(path, out):
    manifest, tensors = read_model(path)
    out.write_bytes(_raw({**manifest, "version": 99}, dict(tensors)))


@pytest.mark.parametrize("make,needle", [
    (_truncate, "not valid safetensors"),
    (_corrupt_header, "not a .lowbit file"),
    (_wrong_declared_shape, "tensor 'fc.weight'"),
    (_mismatched_graph, "does not fit its input"),
    (_future_version, "version 99 is not supported"),
])
@pytest.mark.parametrize("command", ["infer", "bench"])
def test_bad_files_exit_2_with_one_line(lowbit_file, tmp_path, capsys, make, needle, command):
    bad = tmp_path / "bad.lowbit"
    make(lowbit_file, bad)
    rc, out, err = _run([command, bad, "--data", "synthetic"] if command == "infer" else [command, bad], capsys)
    assert rc == 2, err
    assert needle in err and str(bad) in err and err.count("\n") == 1 and "Traceback" not in err


def test_other_user_errors(run_dir, lowbit_file, tmp_path, capsys):
    rc, _, err = _run(["infer", tmp_path / "missing.lowbit"], capsys)
    assert rc == 2 and "file not found" in err
    rc, _, err = _run(["export", "--from", lowbit_file, "--out", tmp_path / "x.lowbit"], capsys)
    assert rc == 2 and "already a .lowbit file" in err
    rc, _, err = _run(["export", "--from", tmp_path / "nowhere"], capsys)
    assert rc == 2 and err.count("\n") == 1
    for bad in ("0", "0.75", "-1"):  # a budget outside (0, 0.5] output steps: one line, no file
        rc, _, err = _run(["export", "--from", run_dir, "--out", tmp_path / "e.lowbit", "--epilogue-error", bad],
                          capsys)
        assert rc == 2 and "epilogue_error must be in (0, 0.5]" in err and err.count("\n") == 1
        assert not (tmp_path / "e.lowbit").exists()


def test_inputs_that_were_silently_wrong(run_dir, lowbit_file, tmp_path, capsys):
    np.save(tmp_path / "y.npy", np.zeros(3, np.int64))
    rc, _, err = _run(["infer", lowbit_file, "--data", "synthetic", "--labels", tmp_path / "y.npy"], capsys)
    assert rc == 2 and "--labels goes with --images" in err and err.count("\n") == 1
    np.save(tmp_path / "empty.npy", np.zeros((0, 28, 28), np.uint8))
    rc, _, err = _run(["infer", lowbit_file, "--images", tmp_path / "empty.npy"], capsys)
    assert rc == 2 and "no examples to predict" in err and err.count("\n") == 1
    (tmp_path / "code.py").write_text("x = 1\n")
    rc, _, err = _run(["infer", lowbit_file, "--images", tmp_path / "code.py"], capsys)
    assert rc == 2 and "give a .npy array or an IDX file" in err and "Debian" not in err
    (tmp_path / "folder.json").mkdir()
    rc, _, err = _run(["infer", lowbit_file, "--data", "synthetic", "--limit", 4, "--out", tmp_path / "folder.json"],
                      capsys)
    assert rc == 2 and "it is a folder" in err and err.count("\n") == 1
    rc, _, err = _run(["export", "--from", run_dir, "--out", tmp_path / "v.lowbit", "--verify", "--report",
                       tmp_path / "folder.json"], capsys)
    assert rc == 2 and "--report" in err and "it is a folder" in err and not (tmp_path / "v.lowbit").exists()


def test_fast_backend_forwards_only_lowbits_own_warnings(monkeypatch, capsys):
    import warnings

    from lowbit.cli import deploy
    from lowbit.runtime import fast_encoder

    def fast_model(model):
        warnings.warn_explicit("`torch.jit.script_method` is deprecated", DeprecationWarning,
                               "/site-packages/torch/jit/_script.py", 1)
        warnings.warn_explicit("node(s) conv1 run on the reference kernel", UserWarning,
                               "/site-packages/lowbit/runtime/fastpath.py", 485)
        return "fast"

    monkeypatch.setattr(fast_encoder, "fast_model", fast_model)
    assert deploy._fast(None) == "fast"
    err = capsys.readouterr().err
    assert err == "warning: node(s) conv1 run on the reference kernel\n"
