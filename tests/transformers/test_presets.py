"""Presets by role on a BERT config, and ``lowbit plan --show``."""

import importlib

import pytest

from lowbit.cli import plan as plan_cli
from lowbit.quant import Plan, is_transformer, layer_roles

pytest.importorskip("transformers")


def test_roles_of_a_bert_classifier(bert):
    roles = layer_roles(bert)
    assert is_transformer(bert)
    assert roles["bert.pooler.dense"] == "head" and roles["classifier"] == "head"
    body = [n for n, r in roles.items() if r == "body"]
    assert len(body) == 12  # 2 blocks x (Q, K, V, attention output, FFN in, FFN out)
    assert "bert.encoder.layer.0.attention.self.query" in body


@pytest.mark.parametrize("bits, body", [("w4a8", (4, 8)), ("w4a4", (4, 4)), ("w8a8", (8, 8))])
def test_preset_goes_by_role_not_module_order(bert, bits, body):
    plan = Plan.preset(bits, bert)
    assert plan.layers["bert.encoder.layer.0.attention.self.query"] == body  # the first Linear is no "edge"
    assert plan.layers["bert.encoder.layer.1.output.dense"] == body
    assert plan.layers["bert.pooler.dense"] == (8, 8) and plan.layers["classifier"] == (8, 8)
    assert Plan.preset(bits, bert, first_last_bits=None).layers["classifier"] == (None, None)


def test_order_rule_is_still_there_on_request(bert):
    plan = Plan.preset("w4a4", bert, roles="order")
    assert plan.layers["bert.encoder.layer.0.attention.self.query"] == (8, 8)


def test_unused_pooler_stays_float_with_an_example(batch):
    import transformers

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    model = transformers.BertForTokenClassification(cfg)  # no pooler at all
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plan = Plan.preset("w4a8", model, example_input=inputs)
    assert plan.layers["classifier"] == (8, 8) and "bert.pooler.dense" not in plan.layers
    encoder = transformers.BertModel(cfg)  # a pooler that runs: 8 bits
    assert Plan.preset("w4a8", encoder, example_input=inputs).layers["pooler.dense"] == (8, 8)


def test_cnn_presets_unchanged():
    from lowbit.models import create_model

    model = create_model("resnet8")
    assert not is_transformer(model)
    assert set(layer_roles(model).values()) == {"edge", "body"}


def _cli():
    """The CLI module, with ``plan`` registered until main.py lists it itself."""
    main = importlib.import_module("lowbit.cli.main")
    if "plan" not in main._stage_commands():
        main.register("plan", *plan_cli.COMMANDS["plan"])
    return main


def test_plan_show_cli(capsys, tmp_path):
    main = _cli()
    out = tmp_path / "plan.yaml"
    code = main.main(["plan", "--show", "--model", "examples/tiny_bert.py:make_model", "--bits", "w4a8",
                      "--quantize-matmuls", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "bert.encoder.layer.0.attention.self.query body" in " ".join(text.split())
    line = next(ln for ln in text.splitlines() if ln.startswith("classifier "))
    assert line.split()[1] == "head" and line.split()[-2:] == ["8", "8"]
    assert "bert.encoder.layer.1.attention.self.pv_matmul" in text and "matmul" in text
    assert Plan.load(out).layers["bert.pooler.dense"] == (8, 8)
    assert main.main(["plan", "--bits", "w4a8"]) == 2  # neither --model nor --from: one line
    assert "give a model" in capsys.readouterr().err
