"""The exact solvers against brute force over every subset."""

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.search import Selection, solve

SCORES = st.floats(-5, 5, allow_nan=False).map(lambda s: round(s, 3))
INT_WEIGHTS = st.integers(0, 20)


@st.composite
def instances(draw, n_budgets=1, weight=INT_WEIGHTS):
    """Random instances whose requirement sometimes exceeds what all candidates can save."""
    n = draw(st.integers(1, 10))
    names = [f"layer{i}" for i in range(n)]
    scores = {name: draw(SCORES) for name in names}
    savings, required = {}, {}
    for b in range(n_budgets):
        savings[f"b{b}"] = {name: draw(weight) for name in names}
        total = sum(savings[f"b{b}"].values())
        required[f"b{b}"] = draw(st.one_of(st.integers(-24, int(8 * total) + 16).map(lambda r: r / 8),
                                            st.sampled_from([0, total])))
    return scores, savings, required


def brute_force(scores, savings, required):
    """Least objective over all feasible subsets, or None when none is feasible."""
    names = list(scores)
    best = None
    for mask in itertools.product((0, 1), repeat=len(names)):
        subset = [n for n, m in zip(names, mask) if m]
        if all(sum(Fraction(savings[b][n]) for n in subset) >= Fraction(r) for b, r in required.items()):
            obj = math.fsum(scores[n] for n in subset)
            best = obj if best is None else min(best, obj)
    return best


def check(sel: Selection, scores, savings, required, optimum):
    for b, r in required.items():
        assert sum(Fraction(savings[b][n]) for n in sel.chosen) >= Fraction(r), b
        assert sel.achieved[b] == float(sum(Fraction(savings[b][n]) for n in sel.chosen))
    assert sel.objective == math.fsum(scores[n] for n in sel.chosen)
    assert all(n in sel.chosen for n, s in scores.items() if s < 0)  # negative scores always drop
    if optimum is not None:
        assert abs(sel.objective - optimum) <= 1e-9


@given(instances())
def test_one_budget_dp_and_ilp_match_brute_force(instance):
    optimum = brute_force(*instance)
    for method in ("dp", "ilp", "auto"):
        if optimum is None:
            with pytest.raises(LowbitError, match="budget 'b0' cannot be met"):
                solve(*instance, method=method)
        else:
            sel = solve(*instance, method=method)
            assert sel.solver in ({"dp", "ilp"} if method == "auto" else {method}) | {"presolve"}
            check(sel, *instance, optimum)


@given(instances(weight=st.integers(0, 40).map(lambda w: w / 8)))
def test_fractional_savings_are_exact(instance):
    """Savings that are multiples of 1/8 (like MACs * b / 4) still go through the exact DP."""
    optimum = brute_force(*instance)
    if optimum is None:
        return
    for method in ("dp", "ilp"):
        check(solve(*instance, method=method), *instance, optimum)


@given(instances(n_budgets=3))
def test_several_budgets_ilp_matches_brute_force(instance):
    optimum = brute_force(*instance)
    if optimum is None:
        with pytest.raises(LowbitError, match="cannot be met"):
            solve(*instance)
        return
    sel = solve(*instance)
    assert sel.solver in ("ilp", "dp", "presolve")  # "dp" when the forced drops meet all but one budget
    check(sel, *instance, optimum)


@given(instances(n_budgets=2))
def test_greedy_is_feasible_but_not_better_than_exact(instance):
    optimum = brute_force(*instance)
    if optimum is None:
        return
    sel = solve(*instance, method="greedy")
    check(sel, *instance, None)
    assert sel.objective >= optimum - 1e-9


def test_large_weights_fall_back_to_ilp():
    scores = {"a": 1.0, "b": 2.0, "c": 2.5}
    savings = {"macs": {"a": 1_000_000_007, "b": 1_000_000_009, "c": 2_000_000_011}}
    sel = solve(scores, savings, {"macs": 2_000_000_010})
    assert sel.solver == "ilp" and sel.chosen == ("c",)
    with pytest.raises(LowbitError, match="more than 2000000 cells"):
        solve(scores, savings, {"macs": 2_000_000_010}, method="dp")


def test_gcd_keeps_big_mac_counts_in_the_dp():
    scores = {"a": 1.0, "b": 2.0, "c": 2.5}
    savings = {"macs": {"a": 3 * 10**9, "b": 5 * 10**9, "c": 7 * 10**9}}
    sel = solve(scores, savings, {"macs": 7 * 10**9})
    assert sel.solver == "dp" and sel.chosen == ("c",)


def test_infeasible_message_names_budget_and_best():
    message = r"budget 'bytes' cannot be met: it needs a saving of 10, .* gives 3"
    with pytest.raises(LowbitError, match=message):
        solve({"a": 1.0, "b": 0.5}, {"bytes": {"a": 1, "b": 2}}, {"bytes": 10})


def test_no_budget_drops_only_negative_scores():
    sel = solve({"a": 1.0, "b": -0.5, "c": 0.0}, {}, {})
    assert sel.chosen == ("b",) and sel.solver == "presolve" and sel.objective == -0.5


@pytest.mark.parametrize("scores, savings, required, message", [
    ({"a": math.nan}, {}, {}, "score of 'a' must be a finite number"),
    ({"a": 1.0}, {"x": {"a": -1}}, {"x": 0}, "savings must be >= 0"),
    ({"a": 1.0}, {"x": {}}, {"x": 0}, r"missing \['a'\]"),
    ({"a": 1.0}, {"x": {"a": 1}}, {"y": 0}, "same budgets"),
    ({"a": 1.0}, {"x": {"a": 1}, "y": {"a": 1}}, {"x": 1, "y": 1}, "method 'dp' handles one budget"),
])
def test_bad_input(scores, savings, required, message):
    with pytest.raises(LowbitError, match=message):
        solve(scores, savings, required, method="dp")
    with pytest.raises(LowbitError, match="unknown method 'magic'"):
        solve({"a": 1.0}, {}, {}, method="magic")
