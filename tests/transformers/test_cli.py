"""The run-directory commands on a BERT encoder named by import path: train, quantize, plan, sensitivity, frontier."""

import json

import pytest

from lowbit.cli import main

pytest.importorskip("transformers")

MODEL = "examples/tiny_bert.py:make_model"
DATA = "examples/tiny_bert.py:make_data"
DATA_ARGS = "{n_train: 192, n_val: 48, n_test: 48, seq_len: 16}"


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("bert-runs")
    assert main(["train", "--model", MODEL, "--data", DATA, "--data-args", DATA_ARGS, "--epochs", "2", "--lr", "0.05",
                 "--batch-size", "32", "--quiet", "--out", str(runs / "fp32")]) == 0
    assert main(["quantize", "--from", str(runs / "fp32"), "--bits", "w4a4", "--per-channel", "--distill",
                 "--epochs", "1", "--batch-size", "32", "--quiet", "--out", str(runs / "w4a4")]) == 0
    return runs


def test_quantize_run_gets_bits_by_role(runs):
    from lowbit.io import load_checkpoint

    ckpt = load_checkpoint(runs / "w4a4" / "checkpoint.pt")
    layers = ckpt["plan"]["layers"]
    assert layers["bert.encoder.layer.0.attention.self.query"] == [4, 4]  # not an "edge" by module order
    assert layers["classifier"] == [8, 8] and layers["bert.pooler.dense"] == [8, 8]
    assert ckpt["quant_config"]["per_channel"] is True
    summary = json.loads((runs / "w4a4" / "summary.json").read_text())
    assert summary["val_acc"] is not None


def test_plan_show_from_a_run(runs, capsys):
    out = _cli(["plan", "--show", "--from", runs / "w4a4"], capsys)
    assert "head" in out and "w4a4 x12" in out
    out = _cli(["plan", "--from", runs / "fp32", "--bits", "w4a8", "--data", DATA, "--data-args", DATA_ARGS], capsys)
    assert "w4a8 x12" in out and "w8a8 x2" in out


@pytest.mark.parametrize("method", ["eagl", "alps", "hessian", "random"])
def test_sensitivity_on_an_encoder(runs, method, tmp_path, capsys):
    _cli(["sensitivity", "--from", runs / "w4a4", "--method", method, "--epochs", "0.2", "--max-iter", "2",
          "--hessian-examples", "32", "--quiet", "--out", tmp_path / "s"], capsys)
    table = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    layers = {r["layer"] for r in table["rows"]}
    assert len(layers) == 12 and "classifier" not in layers and "bert.pooler.dense" not in layers
    macs = {r["layer"]: r["macs"] for r in table["rows"]}
    # MACs traced at the data's sequence length (16 tokens): Q is 32x32 per token
    assert macs["bert.encoder.layer.0.attention.self.query"] == 16 * 32 * 32


def test_frontier_on_an_encoder(runs, tmp_path, capsys):
    _cli(["frontier", "--from", runs / "w4a4", "--methods", "eagl,random", "--budgets", "0.5", "--epochs", "0.2",
          "--quiet", "--out", tmp_path / "fr"], capsys)
    payload = json.loads((tmp_path / "fr" / "frontier.json").read_text())
    assert len(payload["points"]) == 4 and all(p["val_acc"] is not None for p in payload["points"])


def test_a_w4a8_encoder_with_quantized_matmuls_through_the_cli(runs, tmp_path, capsys):
    _cli(["quantize", "--from", runs / "fp32", "--bits", "w4a8", "--quantize-matmuls", "--activation-init", "mse",
          "--epochs", "0", "--quiet", "--out", tmp_path / "w4a8"], capsys)
    from lowbit.io import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "w4a8" / "checkpoint.pt")
    assert ckpt["quant_config"]["quantize_matmuls"] is True
    assert any("qk_matmul" in k for k in ckpt["state_dict"])
    _cli(["sensitivity", "--from", tmp_path / "w4a8", "--method", "eagl", "--quiet", "--out", tmp_path / "s"], capsys)
    table = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert len(table["rows"]) == 12  # the blocks' 4-bit-weight layers are the W4A8 candidates
