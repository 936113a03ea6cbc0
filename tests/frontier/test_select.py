"""Every plan the selector returns meets its budget; bad and unreachable budgets are one-line user errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.cost import low_bit_mac_fraction, profile_layers, relative_throughput
from lowbit.errors import LowbitError
from lowbit.frontier import PrecisionSelector, parse_budgets, select, select_layers
from lowbit.models import create_model
from lowbit.quant import Plan, calibrate_, plan_of, quantize_
from lowbit.sensitivity import SensitivityTable, candidate_layers

torch.manual_seed(0)
MODEL = quantize_(create_model("resnet8", width=0.5), "w4a4")
calibrate_(MODEL, [torch.randn(4, 1, 28, 28)])
X = torch.zeros(1, 1, 28, 28)
LAYERS = profile_layers(MODEL, X)
BASE = plan_of(MODEL).layers
CANDS = candidate_layers(MODEL)
T_MAX = relative_throughput(LAYERS, {**BASE, **{n: (2, 2) for n in CANDS}})

scores_st = st.lists(st.floats(-1, 1, allow_nan=False), min_size=len(CANDS), max_size=len(CANDS))


@given(scores_st, st.floats(0, 1), st.booleans(), st.sampled_from(["bits-proportional", "bops", "size"]))
def test_mac_fraction_budgets_hold(scores, f, clip, cost):
    plan, pc, sel = select_layers(LAYERS, BASE, dict(zip(CANDS, scores)), f, "mac-fraction", cost,
                                  clip_negative=clip)
    assert isinstance(plan, Plan) and set(plan.layers) == set(BASE)
    frac = low_bit_mac_fraction(LAYERS, plan.layers, CANDS)
    assert frac >= f and pc.low_bit_mac_fraction == frac
    assert {n for n, b in plan.layers.items() if b == (2, 2)} == set(sel.chosen)
    assert all(plan.layers[n] == BASE[n] for n in BASE if n not in sel.chosen)  # first/last stay 8-bit


@given(scores_st, st.floats(1.0, 1.0) | st.floats(0.5, float(T_MAX)), st.booleans())
def test_throughput_budgets_hold(scores, t, clip):
    plan, pc, _ = select_layers(LAYERS, BASE, dict(zip(CANDS, scores)), t, "throughput", clip_negative=clip)
    assert relative_throughput(LAYERS, plan.layers) >= t * (1 - 1e-12)
    assert pc.relative_throughput == pytest.approx(relative_throughput(LAYERS, plan.layers))


def test_negative_scores_do_not_overshoot_the_budget():
    scores = dict.fromkeys(CANDS, -0.01)  # e.g. noise-level ALPS drops: dropping looks free
    clipped, _, _ = select_layers(LAYERS, BASE, scores, 0.25)
    raw, _, _ = select_layers(LAYERS, BASE, scores, 0.25, clip_negative=False)
    assert low_bit_mac_fraction(LAYERS, raw.layers, CANDS) == 1.0  # the solver drops every "free" layer
    macs = [li.macs for li in LAYERS if li.name in CANDS]
    least = min(f for f in (sum(m for i, m in enumerate(macs) if mask >> i & 1) / sum(macs)
                            for mask in range(1 << len(macs))) if f >= 0.25)
    assert low_bit_mac_fraction(LAYERS, clipped.layers, CANDS) == pytest.approx(least)  # the least excess


def test_least_sensitive_layers_go_first():
    scores = {n: float(i) for i, n in enumerate(CANDS)}
    plan, _, sel = select_layers(LAYERS, BASE, scores, 1e-9)
    assert sel.chosen == (CANDS[0],)


@pytest.mark.parametrize("text,kind,needle", [
    ("abc", "mac-fraction", "not a number"),
    ("", "mac-fraction", "no budgets"),
    ("1.5", "mac-fraction", "must be in \\[0, 1\\]"),
    ("-0.1", "mac-fraction", "must be in \\[0, 1\\]"),
    ("0", "throughput", "> 0"),
    ("0.5", "bops-fraction", "unknown budget kind"),
])
def test_bad_budgets(text, kind, needle):
    with pytest.raises(LowbitError, match=needle):
        parse_budgets(text, kind)


def test_infeasible_budget_is_a_user_error():
    with pytest.raises(LowbitError, match="out of reach"):
        select_layers(LAYERS, BASE, dict.fromkeys(CANDS, 1.0), T_MAX * 1.01, "throughput")
    assert parse_budgets("0.5, 0.25,0.5") == (0.5, 0.25)


def test_selector_follows_sklearn_conventions():
    table = SensitivityTable.from_dict({"version": 1, "method": "random", "rows": [
        {"layer": n, "score": float(i), "macs": None, "params": 1} for i, n in enumerate(CANDS)]})
    sel = PrecisionSelector(budget=0.5, cost="bops")
    assert not hasattr(sel, "plan_")
    assert sel.fit(MODEL, table, X) is sel
    assert sel.cost_.profile == "bops" and sel.cost_.low_bit_mac_fraction >= 0.5
    assert set(sel.selection_.chosen) == {n for n, b in sel.plan_.layers.items() if b == (2, 2)}
    fresh = quantize_(create_model("resnet8", width=0.5), sel.plan_)  # the plan format of the quant core
    assert plan_of(fresh) == sel.plan_
    with pytest.raises(LowbitError, match="example_input"):
        PrecisionSelector().fit(MODEL, table)


def test_select_writes_a_plan_for_lowbit_quantize(w4a4, tmp_path):
    from lowbit.io import load_json
    from lowbit.sensitivity import sensitivity

    run, _ = w4a4
    sensitivity(run, "eagl", tmp_path / "s")
    r = select(run, tmp_path / "s", 0.5, tmp_path / "plan.yaml")
    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan == r.plan and sum(b == (2, 2) for b in plan.layers.values()) == len(r.selection.chosen) > 0
    cost = load_json(tmp_path / "plan.cost.json")
    assert cost["cost"]["low_bit_mac_fraction"] >= 0.5 and cost["method"] == "eagl"
    with pytest.raises(LowbitError, match="out of reach"):
        select(run, tmp_path / "s", 50, budget_kind="throughput")
