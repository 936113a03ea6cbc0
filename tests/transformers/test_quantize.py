"""Quantizing encoders: dict-batch calibration, quantized attention matmuls, fit with distillation."""

import copy

import pytest
import torch

from lowbit.data import DataSplits
from lowbit.models.hf import encoder_blocks, lowbit_attention
from lowbit.quant import (
    Plan,
    QuantConfig,
    QuantMatmul,
    build_quantized,
    calibrate_,
    quant_layers,
    quant_matmuls,
    quantize_,
)
from lowbit.train import FitConfig, evaluate, fit

pytest.importorskip("transformers")


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_quant_matmul_gradients_reach_both_steps():
    mm = QuantMatmul(4, 4)
    a, b = torch.randn(2, 3, 5, 8, requires_grad=True), torch.randn(2, 3, 8, 5, requires_grad=True)
    for q, x in ((mm.a_quantizer, a), (mm.b_quantizer, b)):
        q.init_from_(x.detach())
    mm(a, b).square().sum().backward()
    assert mm.a_quantizer.step.grad.abs() > 0 and mm.b_quantizer.step.grad.abs() > 0
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_lowbit_attention_equals_eager_without_quantizers(bert, batch):
    """The attention function itself (no QuantMatmul yet) is exactly HF's: same logits as sdpa."""
    from lowbit.models.hf import _register

    _register()
    ref = bert(**_inputs(batch)).logits
    patched = copy.deepcopy(bert)
    patched.config._attn_implementation = "lowbit"
    torch.testing.assert_close(patched(**_inputs(batch)).logits, ref, atol=1e-5, rtol=1e-4)
    assert lowbit_attention.__name__ == "lowbit_attention"


def test_quantize_calibrate_with_dict_batches_and_matmuls(bert, batch):
    ref = bert(**_inputs(batch)).logits
    model = quantize_(copy.deepcopy(bert), Plan.preset("w8a8", bert), QuantConfig(quantize_matmuls=True))
    assert len(quant_layers(model)) == 14 and len(quant_matmuls(model)) == 4
    assert model.config._attn_implementation == "lowbit" and bert.config._attn_implementation != "lowbit"
    calibrate_(model, [batch])
    mm = model.bert.encoder.layer[0].attention.self
    assert mm.qk_matmul.a_quantizer.signed and not mm.pv_matmul.a_quantizer.signed  # softmax output: unsigned
    out = model(**_inputs(batch)).logits
    assert torch.allclose(out, ref, atol=0.05)  # 8 bits everywhere: close to fp32
    out.square().sum().backward()
    for m in quant_matmuls(model).values():
        assert m.a_quantizer.step.grad is not None and m.b_quantizer.step.grad is not None
    state = model.state_dict()
    assert any(k.endswith("qk_matmul.a_quantizer.step") for k in state)
    rebuilt = build_quantized(copy.deepcopy(bert), Plan.preset("w8a8", bert), QuantConfig(quantize_matmuls=True),
                              state)
    torch.testing.assert_close(rebuilt(**_inputs(batch)).logits, out.detach())


def test_preset_by_name_and_new_config_fields(bert):
    model = quantize_(copy.deepcopy(bert), "w4a8")  # per-tensor by default: per-channel did not measure better
    assert not any(m.weight_quantizer.per_channel for m in quant_layers(model).values())
    assert quant_layers(model)["classifier"].w_bits == 8
    assert QuantConfig(quantize_matmuls=True).to_dict()["quantize_matmuls"] is True
    assert "quantize_matmuls" not in QuantConfig().to_dict()  # old fingerprints still match


def test_outlier_robust_activation_init():
    """Heavy tails (a transformer's residual stream): MSE init beats both the paper's mean rule and max|x|."""
    from lowbit.quant import LsqQuantizer

    x = torch.distributions.StudentT(2.0).sample((64, 256))
    quantizers = {init: LsqQuantizer(4, True, role="activation", init=init) for init in ("mean", "mse", "percentile")}
    for q in quantizers.values():
        q.init_from_(x)
    err = {init: (q(x) - x).square().mean().item() for init, q in quantizers.items()}
    max_step = x.abs().max() / 7
    max_err = ((x / max_step).clamp(-8, 7).round() * max_step - x).square().mean().item()
    assert err["mse"] <= min(err["mean"], max_err)
    assert quantizers["percentile"].scale < max_step and err["percentile"] < max_err


def test_fit_with_logit_and_hidden_state_distillation(bert, splits):
    teacher = bert
    fit(teacher, splits, FitConfig(epochs=1, batch_size=32, lr=0.05, quiet=True))
    student = quantize_(copy.deepcopy(teacher), Plan.preset("w4a8", teacher), QuantConfig(per_channel=True,
                                                                                             quantize_matmuls=True))
    calibrate_(student, [next(iter(torch.utils.data.DataLoader(splits.train, batch_size=32)))])
    cfg = FitConfig(epochs=1, batch_size=32, lr=0.01, distill=True, distill_features=encoder_blocks(teacher),
                    quiet=True)
    assert cfg.distill_features == ("bert.encoder.layer.0", "bert.encoder.layer.1")
    assert cfg.to_dict()["distill_features"] == list(cfg.distill_features)
    assert "distill_features" not in FitConfig().to_dict()
    state = fit(student, splits, cfg, teacher=teacher)
    assert state.rows[-1]["val_acc"] is not None and torch.isfinite(torch.tensor(state.rows[-1]["train_loss"]))
    assert not teacher.bert.encoder.layer[0]._forward_hooks  # taps removed
    assert evaluate(student, splits.val)[1] >= 0


def test_feature_distillation_names_are_checked(bert, splits):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="no module"):
        fit(copy.deepcopy(bert), splits, FitConfig(epochs=1, distill=True, distill_features=("nope",), quiet=True),
            teacher=bert)


def test_plain_model_rejects_matmul_quantization():
    from torch import nn

    from lowbit.errors import LowbitError

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(LowbitError, match="no attention block"):
        quantize_(model, Plan.preset("w8a8", model), QuantConfig(quantize_matmuls=True))


def test_data_splits_example_is_a_dict(splits):
    assert isinstance(splits, DataSplits) and set(splits.example(1)) == {"input_ids", "attention_mask",
                                                                          "token_type_ids"}


@pytest.mark.parametrize("method", ["eagl", "alps", "random"])
def test_w4a8_encoder_has_candidates(bert, splits, method):
    """The blocks' 12 Linear layers (4-bit weights, 8-bit inputs) are candidates; pooler and classifier are not."""
    from lowbit.sensitivity import score_layers

    model = quantize_(copy.deepcopy(bert), Plan.preset("w4a8", bert), QuantConfig(per_channel=True))
    calibrate_(model, [next(iter(torch.utils.data.DataLoader(splits.train, batch_size=32)))])
    options = {"epochs": 0.1, "batch_size": 32} if method == "alps" else None
    table = score_layers(method, model, splits, options=options)
    assert len(table.layers) == 12 and "classifier" not in table.layers
    macs = {r.layer: r.macs for r in table.rows}
    assert macs["bert.encoder.layer.0.intermediate.dense"] == 16 * 32 * 64  # the data's 16 tokens
