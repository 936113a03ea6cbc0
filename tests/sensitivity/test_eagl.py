import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant import Plan, calibrate_, quant_layers, quantize_
from lowbit.sensitivity import candidate_layers, code_entropy, eagl_scores, load_w4a4_run


@pytest.mark.parametrize("codes,expected", [
    (torch.arange(-8, 8).repeat(5), 4.0),           # all 16 levels equally often
    (torch.full((100,), 3), 0.0),                   # one level
    (torch.tensor([-8, 7] * 10), 1.0),              # two levels
    (torch.tensor([0, 0, 1, 2]), 1.5),              # p = 1/2, 1/4, 1/4
    (torch.tensor([-2, -1, 0, 1]), 2.0),            # all 4 levels of a 2-bit code
])
def test_entropy_of_known_histograms(codes, expected):
    q_n, q_p = (2, 1) if expected == 2.0 else (8, 7)
    assert code_entropy(codes, q_n, q_p) == pytest.approx(expected, abs=1e-12)


def test_codes_outside_the_levels_are_refused():
    with pytest.raises(LowbitError, match="outside"):
        code_entropy(torch.tensor([0, 8]), 8, 7)


@given(st.lists(st.integers(-8, 7), min_size=1, max_size=200), st.randoms())
def test_entropy_bounds_and_order_invariance(values, rnd):
    codes = torch.tensor(values)
    h = code_entropy(codes, 8, 7)
    assert 0.0 <= h <= math.log2(min(16, len(values))) + 1e-9
    shuffled = values[:]
    rnd.shuffle(shuffled)
    assert code_entropy(torch.tensor(shuffled), 8, 7) == pytest.approx(h, abs=1e-12)


def _model_with_known_codes():
    """Four linear layers at W4A4 (first/last at 8 bits); the two middle weights have hand-set codes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                          nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.copy_(torch.arange(-8, 8).float().repeat(16, 1) * 0.1)  # 16 levels, uniform: H = 4
        model[4].weight.copy_(torch.tensor([-0.1, 0.1]).repeat(8, 8))               # 2 levels, even: H = 1
    quantize_(model, Plan.preset("w4a4", model))
    calibrate_(model, [torch.randn(32, 8)])
    for name in ("2", "4"):
        quant_layers(model)[name].weight_quantizer.set_step_(0.1)
    return model


def test_eagl_scores_follow_the_code_entropy():
    model = _model_with_known_codes()
    t = eagl_scores(model, example_input=torch.randn(1, 8))
    assert t.method == "eagl" and t.layers == ["2", "4"]  # first and last layers are no candidates
    assert t.scores == pytest.approx({"2": 4.0, "4": 1.0})
    assert [r.layer for r in t.sorted_rows()] == ["2", "4"]
    assert {r.layer: r.macs for r in t.rows} == {"2": 256, "4": 128}
    assert t.passes == {"forward": 0, "backward": 0, "hvp": 0, "epochs": 0.0}
    weighted = eagl_scores(model, "h4-weighted").scores
    assert weighted == pytest.approx({"2": 256 * 4.0, "4": 128 * 1.0})
    diff = eagl_scores(model, "h4-h2")
    for r in diff.rows:
        assert r.score == pytest.approx(r.extra["entropy"] - r.extra["entropy_low"])
        assert 0 <= r.extra["entropy_low"] <= 2
    assert eagl_scores(model, include_first_last=True).layers == ["0", "2", "4", "6"]


def test_bad_variant_and_candidates():
    model = _model_with_known_codes()
    with pytest.raises(LowbitError, match="variant"):
        eagl_scores(model, "h3")
    with pytest.raises(LowbitError, match="not quantized layers"):
        eagl_scores(model, candidates=["2", "nope"])
    assert candidate_layers(model, "4,2") == ["2", "4"]  # module order whatever the given order


def test_on_a_trained_w4a4_run(w4a4):
    run, _ = w4a4
    model, _ = load_w4a4_run(run)
    t = eagl_scores(model, example_input=torch.zeros(1, 1, 28, 28))
    assert "conv1" not in t.layers and "fc" not in t.layers and len(t.layers) == 8
    assert all(0 < r.score <= 4 and r.macs > 0 for r in t.rows)
    assert t.wall_seconds < 5
