"""One plan type, one validator: a bad plan fails with the same one-line error at every entry point."""

import pytest
import torch
from torch import nn

from lowbit.cost import as_plan, bops, plan_cost, profile_layers, relative_throughput, w4a4_reference_plan
from lowbit.errors import LowbitError
from lowbit.frontier import select_layers
from lowbit.quant import Plan, quantize_
from lowbit.search import select_plan

MODEL = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
LAYERS = profile_layers(MODEL, torch.randn(1, 3, 6, 6))
SCORES = {"2": 1.0}

ENTRY_POINTS = {
    "Plan": lambda p: Plan(p),
    "Plan.from_dict": lambda p: Plan.from_dict({"layers": p}),
    "quant.quantize_": lambda p: quantize_(nn.Sequential(nn.Conv2d(3, 4, 3)), p),
    "cost.as_plan": lambda p: as_plan(p, LAYERS),
    "cost.bops": lambda p: bops(LAYERS, p),
    "cost.plan_cost": lambda p: plan_cost(LAYERS, p),
    "cost.reference_plan": lambda p: relative_throughput(LAYERS, w4a4_reference_plan(LAYERS), reference_plan=p),
    "search.select_plan": lambda p: select_plan(LAYERS, p, SCORES, mac_fraction=0.5),
    "frontier.select_layers": lambda p: select_layers(LAYERS, p, SCORES, 0.5),
}
BAD = [{"0": (5, 4)}, {"0": (4, "4")}, {"0": (4, True)}, {"0": 4}, {"0": (4, 4, 4)}]


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bad_plan_same_error_everywhere(entry, bad):
    with pytest.raises(LowbitError) as expected:
        Plan(bad)
    with pytest.raises(LowbitError) as got:
        ENTRY_POINTS[entry](bad)
    assert str(got.value) == str(expected.value) and "\n" not in str(got.value)


def test_cost_and_search_return_plans():
    base = w4a4_reference_plan(LAYERS)
    assert isinstance(base, Plan) and base == Plan.preset("w4a4", MODEL)
    for given in (base, base.layers, base.to_dict()):
        plan, _, sel = select_plan(LAYERS, given, SCORES, mac_fraction=0.5)
        assert isinstance(plan, Plan) and plan == base.with_bits("2", 2, 2) and sel.chosen == ("2",)
        assert select_layers(LAYERS, given, SCORES, 0.5)[0] == plan


def test_unknown_layers_are_named():
    with pytest.raises(LowbitError, match=r"does not fit the profiled layers: unknown layer '2x' \(did you mean 2"):
        bops(LAYERS, {"2x": (4, 4)})
