"""QuantMatmul, outlier-robust LSQ activation inits, role presets and the new QuantConfig fields (no transformers)."""

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant import LsqQuantizer, Plan, QuantConfig, QuantMatmul, is_transformer, layer_roles


def test_quant_matmul_both_operands_learn():
    mm = QuantMatmul(4, 8)
    a, b = torch.randn(3, 4, 6, requires_grad=True), torch.rand(3, 6, 5, requires_grad=True)
    mm.a_quantizer.init_from_(a.detach())
    mm.b_quantizer.init_from_(b.detach())
    assert mm.a_quantizer.signed and not mm.b_quantizer.signed  # auto: probabilities are unsigned
    out = mm(a, b)
    assert out.shape == (3, 4, 5)
    out.sum().backward()
    assert mm.a_quantizer.step.grad != 0 and mm.b_quantizer.step.grad != 0
    assert mm.bits == (4, 8) and "a_bits=4, b_bits=8" in repr(mm)


def test_quant_matmul_with_a_float_operand():
    mm = QuantMatmul(None, 8)
    b = torch.randn(2, 3)
    mm.b_quantizer.init_from_(b)
    assert mm.a_quantizer is None and len(mm.quantizers) == 1
    torch.testing.assert_close(mm(torch.eye(2), b), mm.b_quantizer(b))


def test_new_config_fields_keep_old_fingerprints():
    d = QuantConfig().to_dict()
    assert "quantize_matmuls" not in d and "activation_init" not in d
    cfg = QuantConfig(quantize_matmuls=True, activation_init="mse")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LowbitError, match="activation_init"):
        QuantConfig(activation_init="max")
    with pytest.raises(LowbitError, match="quantize_matmuls"):
        QuantConfig(quantize_matmuls="yes")


def test_lsq_init_applies_to_activations_only():
    w = LsqQuantizer(4, True, role="weight", init="mse")
    assert w.init == "mean"
    with pytest.raises(LowbitError, match="init"):
        LsqQuantizer(4, True, role="activation", init="max")


@pytest.mark.parametrize("init", ["mse", "percentile"])
def test_robust_init_uses_every_batch_and_keeps_the_outlier_range_in_check(init):
    q = LsqQuantizer(8, None, role="activation", init=init)
    q._reset_stats()
    q.observe(torch.randn(256, 64))
    x = torch.randn(256, 64)
    x[0, 0] = 200.0
    q.observe(x)
    q.finish_observation_()
    assert q.signed and 0 < q.scale < 200 / 127  # never just max|x| / Q_P


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.ffn = nn.Linear(8, 8)

    def forward(self, x):
        a = torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2), -1) @ self.value(x)
        return x + self.ffn(a)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_proj = nn.Linear(4, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed_proj(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def test_role_preset_on_a_hand_written_encoder():
    model = Encoder()
    assert is_transformer(model)
    roles = layer_roles(model)
    assert roles["embed_proj"] == "embedding" and roles["head"] == "head" and roles["layers.0.query"] == "body"
    plan = Plan.preset("w4a8", model)
    assert plan.layers["embed_proj"] == (None, None) and plan.layers["head"] == (8, 8)
    assert plan.layers["layers.0.query"] == (4, 8) and plan.layers["layers.1.ffn"] == (4, 8)
    with pytest.raises(LowbitError, match="roles"):
        Plan.preset("w4a8", model, roles="layers")
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(LowbitError, match="no stack of attention blocks"):
        layer_roles(mlp, "transformer")


def test_w4a8_candidates_are_the_4_bit_weight_layers():
    from lowbit.quant import calibrate_, quantize_
    from lowbit.sensitivity.candidates import candidate_layers

    model = Encoder()
    quantize_(model, Plan.preset("w4a8", model), QuantConfig())
    calibrate_(model, [torch.randn(4, 5, 4)])
    names = candidate_layers(model)
    assert "head" not in names and len(names) == 8 and "layers.0.query" in names
