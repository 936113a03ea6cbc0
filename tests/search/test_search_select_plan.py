"""select_plan on a profiled model: every requested budget holds, and the choice is optimal."""

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from torch import nn

from lowbit.cost import (
    MeasuredProfile,
    bops,
    latency_key,
    low_bit_mac_fraction,
    plan_cost,
    plan_time,
    profile_layers,
    w4a4_reference_plan,
    weight_bytes,
)
from lowbit.errors import LowbitError
from lowbit.quant import Plan
from lowbit.search import select_plan

torch.manual_seed(0)
MODEL = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
    nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
    nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
    nn.Conv2d(16, 24, 1), nn.ReLU(),
    nn.Conv2d(24, 24, 3, padding=1, groups=4), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 10),
)
LAYERS = profile_layers(MODEL, torch.randn(1, 3, 16, 16))
BASE = w4a4_reference_plan(LAYERS)
CANDIDATES = [n for n, bits in BASE.layers.items() if bits == (4, 4)]
ALL_LOW = Plan({**BASE.layers, **{n: (2, 2) for n in CANDIDATES}})


def _plan(subset):
    return Plan({**BASE.layers, **{n: (2, 2) for n in subset}})


def _meets(plan, candidates, budgets, profile="bits-proportional"):
    """Exact feasibility in user units (throughput compared as time_ref >= t * time_plan)."""
    ok = True
    if "mac_fraction" in budgets:
        macs = {layer.name: layer.macs for layer in LAYERS}
        low = sum(macs[n] for n in candidates if plan.layers[n] == (2, 2))
        ok &= low >= Fraction(budgets["mac_fraction"]) * sum(macs[n] for n in candidates)
    if "min_throughput" in budgets:
        t_ref, t_plan = (Fraction(plan_time(LAYERS, p, profile)) for p in (BASE, plan))
        ok &= t_ref >= Fraction(budgets["min_throughput"]) * t_plan
    if "max_bops" in budgets:
        ok &= bops(LAYERS, plan) <= budgets["max_bops"]
    if "max_weight_bytes" in budgets:
        ok &= weight_bytes(LAYERS, plan) <= budgets["max_weight_bytes"]
    return ok


def _brute_force(scores, budgets, profile="bits-proportional"):
    best = None
    cands = list(scores)
    for mask in itertools.product((0, 1), repeat=len(cands)):
        subset = [n for n, m in zip(cands, mask) if m]
        if _meets(_plan(subset), cands, budgets, profile):
            obj = math.fsum(scores[n] for n in subset)
            best = obj if best is None else min(best, obj)
    return best


def _check(plan, cost, sel, scores, budgets, profile="bits-proportional"):
    assert isinstance(plan, Plan) and plan == _plan(sel.chosen)
    assert _meets(plan, list(scores), budgets, profile)
    # the reported PlanCost agrees with the budgets (float rounding is monotone, so these hold too)
    if "mac_fraction" in budgets:
        assert cost.low_bit_mac_fraction >= budgets["mac_fraction"]
    if "min_throughput" in budgets:
        assert cost.relative_throughput >= budgets["min_throughput"]
    if "max_bops" in budgets:
        assert cost.bops <= budgets["max_bops"]
    if "max_weight_bytes" in budgets:
        assert cost.weight_bytes <= budgets["max_weight_bytes"]


BASE_COST, LOW_COST = plan_cost(LAYERS, BASE), plan_cost(LAYERS, ALL_LOW)
RANGES = {  # each range runs from "met by the base plan" to just past "met by nothing"
    "mac_fraction": st.floats(0, 1),
    "min_throughput": st.floats(0.95, LOW_COST.relative_throughput * 1.02),
    "max_bops": st.integers(int(LOW_COST.bops * 0.98), BASE_COST.bops),
    "max_weight_bytes": st.integers(int(LOW_COST.weight_bytes * 0.98), BASE_COST.weight_bytes),
}
BUDGETS = st.sets(st.sampled_from(sorted(RANGES)), min_size=1).flatmap(
    lambda keys: st.fixed_dictionaries({k: RANGES[k] for k in keys}))


@given(st.lists(st.floats(-1, 4).map(lambda s: round(s, 2)), min_size=len(CANDIDATES),
                max_size=len(CANDIDATES)), BUDGETS)
def test_select_plan_is_optimal_and_meets_every_budget(score_list, budgets):
    scores = dict(zip(CANDIDATES, score_list))
    optimum = _brute_force(scores, budgets)
    event("infeasible" if optimum is None else "feasible")
    if optimum is None:
        with pytest.raises(LowbitError, match="is out of reach"):
            select_plan(LAYERS, BASE, scores, **budgets)
        return
    plan, cost, sel = select_plan(LAYERS, BASE, scores, **budgets)
    _check(plan, cost, sel, scores, budgets)
    assert abs(sel.objective - optimum) <= 1e-9


@pytest.mark.parametrize("profile", ["bops", "size"])
def test_other_profiles(profile):
    scores = {n: float(i) for i, n in enumerate(CANDIDATES)}
    low = plan_cost(LAYERS, ALL_LOW, profile).relative_throughput
    budgets = {"min_throughput": 1 + (low - 1) / 2}
    plan, cost, sel = select_plan(LAYERS, BASE, scores, profile=profile, **budgets)
    _check(plan, cost, sel, scores, budgets, profile)
    assert cost.profile == profile
    assert sel.objective == _brute_force(scores, budgets, profile)


def test_measured_profile():
    table = {"layers": {layer.name: {latency_key(b, b): layer.macs * b * 1e-12 + 1e-6 for b in (2, 4, 8)}
                        for layer in LAYERS}}
    measured = MeasuredProfile.from_dict(table)
    scores = {n: 1.0 for n in CANDIDATES}
    target = 1 + (plan_cost(LAYERS, ALL_LOW, measured).relative_throughput - 1) / 2
    plan, cost, sel = select_plan(LAYERS, BASE, scores, min_throughput=target, profile=measured)
    assert cost.relative_throughput >= target and cost.profile == "measured"
    assert 1 <= len(sel.chosen) < len(CANDIDATES)


def test_mac_fraction_uses_the_dp_and_reports_the_fraction():
    scores = {n: 1.0 + i for i, n in enumerate(CANDIDATES)}
    plan, cost, sel = select_plan(LAYERS, BASE, scores, mac_fraction=0.5)
    assert sel.solver == "dp"
    assert cost.low_bit_mac_fraction == low_bit_mac_fraction(LAYERS, plan, CANDIDATES) >= 0.5
    assert all(plan.layers[n] == (2, 2) if n in sel.chosen else plan.layers[n] == BASE.layers[n] for n in BASE.layers)


def test_zero_budget_keeps_the_base_and_low_bits_three():
    scores = {n: 1.0 for n in CANDIDATES}
    plan, cost, sel = select_plan(LAYERS, BASE, scores, mac_fraction=0.0)
    assert plan == BASE and cost.relative_throughput == 1.0 and sel.chosen == ()
    plan, _, sel = select_plan(LAYERS, BASE, scores, mac_fraction=1.0, low_bits=3)
    assert {plan.layers[n] for n in CANDIDATES} == {(3, 3)}


def test_user_errors():
    scores = {n: 1.0 for n in CANDIDATES}
    with pytest.raises(LowbitError, match="at least one budget"):
        select_plan(LAYERS, BASE, scores)
    with pytest.raises(LowbitError, match=r"min_throughput=9 is out of reach: the best is \d"):
        select_plan(LAYERS, BASE, scores, min_throughput=9)
    with pytest.raises(LowbitError, match="max_weight_bytes=0 is out of reach"):
        select_plan(LAYERS, BASE, scores, max_weight_bytes=0)
    with pytest.raises(LowbitError, match=r"mac_fraction must be a finite number in \[0.0, 1.0\]"):
        select_plan(LAYERS, BASE, scores, mac_fraction=1.5)
    with pytest.raises(LowbitError, match="does not have: 'nope'"):
        select_plan(LAYERS, BASE, {"nope": 1.0}, mac_fraction=0.5)
    with pytest.raises(LowbitError, match="would not lower it"):
        select_plan(LAYERS, ALL_LOW, scores, mac_fraction=0.5)
    with pytest.raises(LowbitError, match="unknown hardware profile"):
        select_plan(LAYERS, BASE, scores, min_throughput=1.1, profile="tpu")
