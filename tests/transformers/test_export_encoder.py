"""Encoder export: integer GEMMs with float glue, bit-exact against the simulation; fast path; ONNX; CLI."""

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export import export_model
from lowbit.export.simulate import EncoderSimulation
from lowbit.ir.format import read_model
from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
from lowbit.runtime import FastEncoderModel, IntegerModel, compare_encoder, fast_model

pytest.importorskip("transformers")

MODEL = "examples/tiny_bert.py:make_model"
DATA = "examples/tiny_bert.py:make_data"
DATA_ARGS = "{n_train: 128, n_val: 32, n_test: 48, seq_len: 16}"


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _quantized(bits="w4a8", matmuls=True, seed=0):
    import tiny_bert

    from lowbit.data import DataSplits

    data = DataSplits(*tiny_bert.make_data(n_train=64, n_val=16, n_test=32, seq_len=16))
    model = tiny_bert.make_model(seed=seed)
    q = quantize_(copy.deepcopy(model), Plan.preset(bits, model), QuantConfig(quantize_matmuls=matmuls,
                                                                               per_channel=True))
    batch = default_collate([data.train[i] for i in range(32)])
    calibrate_(q, [batch])
    return q.eval(), _inputs(default_collate([data.test[i] for i in range(32)]))


@pytest.fixture(scope="module", params=[True, False], ids=["quantized-matmuls", "float-matmuls"])
def exported(request, tmp_path_factory):
    torch.set_num_threads(1)
    q, x = _quantized(matmuls=request.param)
    path = tmp_path_factory.mktemp("enc") / "bert.lowbit"
    result = export_model(q, path, example=x)
    return result, IntegerModel.load(path), x, request.param


def test_file_marks_every_node_and_is_version_2(exported):
    result, runtime, x, matmuls = exported
    manifest, _ = read_model(result.path)
    assert manifest["version"] == 2 and manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    ops = {n["op"]: n["domain"] for n in manifest["graph"]}
    assert all(n["domain"] in ("int", "float") for n in manifest["graph"])
    assert ops["linear"] == "int" and ops["quantize"] == "int" and ops["layer_norm"] == "float"
    assert ops["softmax"] == ops["gelu"] == ops["embedding"] == ops["attention_mask"] == "float"
    assert ("matmul" in ops) == matmuls and ("float_matmul" in ops) != matmuls
    assert manifest["tracer"].startswith("torch.export")


def test_integer_nodes_bit_exact_against_the_simulation(exported):
    result, runtime, x, matmuls = exported
    sim = EncoderSimulation(result.lowered).run_trace(x)
    trace = runtime.run_trace(x)
    int_nodes = [n for n in runtime.nodes if n.op in ("quantize", "linear", "matmul")]
    assert {n.output for n in int_nodes} <= set(sim)
    for name, v in sim.items():
        assert torch.equal(v.to(torch.int64), trace[name].to(torch.int64)), name
    with torch.no_grad():
        fake = result.lowered.model(**x).logits
    assert (fake.argmax(1) == runtime(x).argmax(1)).float().mean() >= 0.9
    torch.testing.assert_close(runtime(x), fake, atol=0.05 * float(fake.abs().max()), rtol=0)


def test_verify_reports_codes_against_the_fake_quant_model(exported):
    from lowbit.deploy.verify import format_encoder_report, verify_encoder

    result, runtime, x, _ = exported
    r = verify_encoder(runtime, x, simulation=EncoderSimulation(result.lowered), lowered=result.lowered,
                       fast=FastEncoderModel(runtime, compile=False))
    assert r["simulation"]["bit_exact"] and r["fast_path"]["logits_differing"] == 0
    assert max(r["codes_vs_fake_quant"].values()) < 0.01  # float rounding near ties only
    assert "bit-exact" in format_encoder_report(r)


@pytest.mark.parametrize("capability", ["avx2", "amx"])
def test_fast_path_equals_the_reference_exactly(exported, capability):
    result, runtime, x, _ = exported
    fast = FastEncoderModel(runtime, capability=capability, compile=False)
    assert not fast.fallbacks and fast.paths
    assert torch.equal(fast.run_int(x), runtime.run_int(x))
    diffs = compare_encoder(fast, runtime, x)
    assert all(d["frac_diff"] == 0 for d in diffs.values()), {k: d for k, d in diffs.items() if d["frac_diff"]}
    assert isinstance(fast_model(runtime, compile=False), FastEncoderModel)


def test_onnx_runs_in_onnxruntime(exported, tmp_path):
    pytest.importorskip("onnxruntime")
    from lowbit.export.onnx_export import OnnxModel, export_onnx

    _, runtime, x, _ = exported
    out = OnnxModel(export_onnx(runtime, tmp_path / "bert.onnx"))(x)
    ref = runtime(x)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert float((out - ref).abs().max()) <= 1e-3 * float(ref.abs().max())


def test_wrong_inputs_are_one_line(exported):
    _, runtime, x, _ = exported
    with pytest.raises(LowbitError, match="input 'token_type_ids' is missing"):
        runtime({k: v for k, v in x.items() if k != "token_type_ids"})
    with pytest.raises(LowbitError, match="pad to 16 tokens"):
        runtime({k: v[:, :8] for k, v in x.items()})
    with pytest.raises(LowbitError, match=r"token ids must lie in \[0, 64\)"):
        runtime({**x, "input_ids": x["input_ids"] + 100})


@torch.library.custom_op("lowbit_test::swish", mutates_args=())
def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


_swish.register_fake(lambda x: torch.empty_like(x))


class _Swish(nn.Module):
    def forward(self, x):
        return _swish(x)


def test_an_unsupported_op_is_one_line_naming_it(tmp_path):
    q, x = _quantized()
    q.bert.encoder.layer[0].intermediate.intermediate_act_fn = _Swish()
    with pytest.raises(LowbitError) as e:
        export_model(q, tmp_path / "m.lowbit", example=x)
    msg = str(e.value)
    assert "swish" in msg and "not supported by the encoder export" in msg and "\n" not in msg
    assert not (tmp_path / "m.lowbit").exists()


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_export_infer_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE", "0")
    runs = tmp_path
    _cli(["train", "--model", MODEL, "--data", DATA, "--data-args", DATA_ARGS, "--epochs", "1", "--lr", "0.05",
          "--batch-size", "32", "--quiet", "--out", runs / "fp32"], capsys)
    _cli(["quantize", "--from", runs / "fp32", "--bits", "w4a8", "--quantize-matmuls", "--activation-init", "mse",
          "--epochs", "0", "--quiet", "--out", runs / "w4a8"], capsys)
    out = _cli(["export", "--from", runs / "w4a8", "--out", runs / "m.lowbit", "--verify",
                "--report", runs / "verify.json"], capsys)
    assert "simulation vs runtime: bit-exact" in out and "integer logits bit-exact" in out
    report = json.loads((runs / "verify.json").read_text())
    assert report["simulation"]["bit_exact"] and report["images"] == 48
    accs = []
    for backend in ("reference", "fast", "onnx"):
        out = _cli(["infer", runs / "m.lowbit", "--backend", backend, "--out", runs / f"{backend}.json"], capsys)
        assert "on 48 sequences" in out
        accs.append(json.loads((runs / f"{backend}.json").read_text())["predictions"])
    assert accs[0] == accs[1]
    rc = main(["infer", str(runs / "m.lowbit"), "--images", str(runs / "verify.json")])
    assert rc == 2 and "encoder" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_an_encoder_file(exported, tmp_path):
    from lowbit.deploy.bench import benchmark, format_table

    result, _, _, _ = exported
    res = benchmark(result.path, [2], runs=3, warmup=1, onnx=True, model_name=MODEL,
                    model_kwargs={})
    variants = {r["variant"] for r in res["rows"]}
    assert {"fp32 eager", "lowbit fast path", "PyTorch int8 (dynamic, Linear)"} <= variants
    assert "int8" in format_table(res)
