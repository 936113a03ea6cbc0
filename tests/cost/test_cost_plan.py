"""Plan costs on a hand-made 3-layer network, for every hardware profile."""

import math

import pytest
import torch
from torch import nn

from lowbit.cost import (
    LayerInfo,
    MeasuredProfile,
    PlanCost,
    bops,
    get_profile,
    list_profiles,
    plan_cost,
    plan_time,
    profile_layers,
    relative_throughput,
    w4a4_reference_plan,
    weight_bytes,
)
from lowbit.errors import LowbitError
from lowbit.io import load_json, save_json
from lowbit.quant import Plan

LAYERS = [
    LayerInfo("a", "conv", macs=1000, params=100, in_shape=(1, 3, 8, 8), out_shape=(1, 4, 8, 8)),
    LayerInfo("b", "conv", macs=2000, params=50, in_shape=(1, 4, 8, 8), out_shape=(1, 4, 8, 8)),
    LayerInfo("c", "linear", macs=500, params=30, in_shape=(1, 16), out_shape=(1, 2)),
]
PRESET = {"a": (8, 8), "b": (4, 4), "c": (8, 8)}  # W4A4, first/last at 8
PLAN = {"a": (8, 8), "b": (2, 2), "c": (4, 8)}
TABLE = {"device": "hand", "layers": {
    "a": {"8": 3e-3}, "b": {"4": 2e-3, "2": 1e-3}, "c": {"8": 1e-3, "w4a8": 0.8e-3},
}}


@pytest.fixture
def measured(tmp_path):
    save_json(tmp_path / "lat.json", TABLE)
    return MeasuredProfile.from_json(tmp_path / "lat.json")


def test_reference_plan_is_the_w4a4_preset():
    assert w4a4_reference_plan(LAYERS) == Plan(PRESET)


def test_bops_and_weight_bytes():
    assert bops(LAYERS, PLAN) == 1000 * 8 * 8 + 2000 * 2 * 2 + 500 * 4 * 8 == 88000
    # ceil(100*8/8) + ceil(50*2/8 = 12.5) + ceil(30*4/8)
    assert weight_bytes(LAYERS, PLAN) == 100 + 13 + 15
    # float counts 32 bits; a layer missing from the plan is float
    assert bops(LAYERS, {"a": (None, 8), "b": (4, 4)}) == 1000 * 32 * 8 + 2000 * 16 + 500 * 32 * 32
    assert weight_bytes(LAYERS, {}) == (100 + 50 + 30) * 4


def test_bits_proportional_throughput():
    # time = MACs * max(bw, ba) / 4: plan 1000*2 + 2000*0.5 + 500*2 = 4000; preset 2000 + 2000 + 1000 = 5000
    assert plan_time(LAYERS, PLAN) == 4000
    assert relative_throughput(LAYERS, PLAN) == 5000 / 4000


def test_bops_throughput():
    assert relative_throughput(LAYERS, PLAN, "bops") == (64000 + 32000 + 32000) / 88000


def test_size_throughput():
    assert relative_throughput(LAYERS, PLAN, "size") == (100 + 25 + 30) / 128


def test_measured_throughput(measured):
    assert math.isclose(relative_throughput(LAYERS, PLAN, measured), 6e-3 / 4.8e-3, rel_tol=1e-12)
    assert get_profile("measured", latency_table=TABLE).table == measured.table
    with pytest.raises(LowbitError, match="add --cost measured"):  # a table the chosen model would ignore
        get_profile("bops", latency_table=TABLE)


@pytest.mark.parametrize("profile", ["bits-proportional", "bops", "size", "measured"])
def test_preset_is_one_and_two_bits_are_faster(profile, measured):
    prof = measured if profile == "measured" else profile
    assert relative_throughput(LAYERS, PRESET, prof) == 1.0
    assert relative_throughput(LAYERS, {**PRESET, "b": (2, 2)}, prof) > 1.0


def test_measured_missing_entries_are_named(measured):
    with pytest.raises(LowbitError, match="no latency entry for layer 'b'"):
        MeasuredProfile.from_dict({"layers": {"a": {"8": 1.0}}}).layer_time(LAYERS[1], 4, 4)
    with pytest.raises(LowbitError, match=r"layer 'b' has no latency for bits '3'.*has: 2, 4"):
        relative_throughput(LAYERS, {**PRESET, "b": (3, 3)}, measured)
    with pytest.raises(LowbitError, match="'layers' mapping"):
        MeasuredProfile.from_dict({"a": {"8": 1.0}})
    with pytest.raises(LowbitError, match="needs a per-layer latency table"):
        get_profile("measured")


def test_profile_registry():
    assert list_profiles() == ["bits-proportional", "bops", "size", "measured"]
    with pytest.raises(LowbitError, match="valid: bits-proportional, bops, size, measured"):
        get_profile("roofline")


def test_plan_cost_bundle_roundtrips(tmp_path):
    class PlanObject:  # anything with a .layers mapping is a plan
        layers = PLAN

    cost = plan_cost(LAYERS, PlanObject(), candidates=["b", "c"])
    assert cost == PlanCost(macs=3500, bops=88000, weight_bytes=128, relative_throughput=1.25,
                            profile="bits-proportional", low_bit_mac_fraction=2000 / 2500)
    save_json(tmp_path / "cost.json", cost.to_dict())
    assert PlanCost(**load_json(tmp_path / "cost.json")) == cost
    assert plan_cost(LAYERS, PLAN, "bops", reference_plan=PLAN).relative_throughput == 1.0


def test_bad_plans():
    with pytest.raises(LowbitError, match="layer 'a' w_bits: unsupported bits 5: choose one of 2, 3, 4, 8"):
        bops(LAYERS, {"a": (5, 4)})
    with pytest.raises(LowbitError, match="does not fit the profiled layers: unknown layer 'z'"):
        bops(LAYERS, {"z": (4, 4)})
    with pytest.raises(LowbitError, match=r"expected name -> \[w_bits, a_bits\]"):
        bops(LAYERS, {"a": 4})
    with pytest.raises(LowbitError, match="must map layer names"):
        bops(LAYERS, [("a", (4, 4))])


def test_real_model_end_to_end():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    layers = profile_layers(model, torch.randn(1, 3, 6, 6))
    preset = w4a4_reference_plan(layers)
    assert preset.layers == {"0": (8, 8), "2": (4, 4), "4": (8, 8)}
    assert preset == Plan.preset("w4a4", model)  # one preset rule, whether from a model or its profile
    assert plan_cost(layers, preset).relative_throughput == 1.0
    # all-8-bit halves the 4-bit layer's speed; all-float is slower still
    assert relative_throughput(layers, {n: (8, 8) for n in preset.layers}) < 1.0
    assert relative_throughput(layers, {n: (None, None) for n in preset.layers}) < 1.0 / 4
