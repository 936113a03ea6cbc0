import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.frontier.stats import compare_methods, jaccard, paired_difference


def test_paired_difference_matches_a_hand_computed_t_interval():
    r = paired_difference([0.92, 0.931, 0.909], [0.90, 0.91, 0.89])
    diffs = [0.92 - 0.90, 0.931 - 0.91, 0.909 - 0.89]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert r["mean"] == pytest.approx(mean) and r["low"] == pytest.approx(mean - half)
    assert r["high"] == pytest.approx(mean + half) and r["excludes_zero"]
    assert r["sd"] == pytest.approx(sd)
    # (z_0.975 + z_0.8)^2 * sd^2 / mean^2 = (1.959964 + 0.841621)^2 * (sd / mean)^2, rounded up, at least 2
    assert r["seeds_for_power"] == max(2, math.ceil((2.801585 * sd / mean) ** 2))
    noisy = paired_difference([0.92, 0.90, 0.93, 0.89], [0.91, 0.91, 0.91, 0.90])
    nd = [0.01, -0.01, 0.02, -0.01]
    nm, ns = sum(nd) / 4, math.sqrt(sum((d - sum(nd) / 4) ** 2 for d in nd) / 3)
    assert noisy["seeds_for_power"] == math.ceil((2.801585 * ns / nm) ** 2) > 4
    assert paired_difference([0.5, 0.6], [0.4, 0.7])["seeds_for_power"] is None  # mean 0
    one = paired_difference([0.5], [0.4])
    assert math.isnan(one["low"]) and not one["excludes_zero"]
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


@given(st.lists(st.floats(-1, 1), min_size=2, max_size=8), st.floats(-0.5, 0.5))
def test_interval_contains_the_mean_and_shifts_with_it(xs, shift):
    r = paired_difference([x + shift for x in xs], xs)
    assert r["low"] <= r["mean"] + 1e-12 and r["mean"] <= r["high"] + 1e-12
    assert r["mean"] == pytest.approx(shift, abs=1e-9)


def test_jaccard_and_compare():
    assert jaccard([], []) == 1.0 and jaccard(["a"], ["b"]) == 0.0 and jaccard("ab", "bc") == pytest.approx(1 / 3)

    def payload(acc_e, acc_r, low_e, low_r):
        return {"points": [{"method": "eagl", "budget": 0.5, "test_acc": acc_e, "low_layers": low_e},
                           {"method": "random", "budget": 0.5, "test_acc": acc_r, "low_layers": low_r},
                           {"method": "uniform-w4a4", "budget": None, "test_acc": 0.9, "low_layers": []}]}

    rows = compare_methods([payload(0.9, 0.8, ["a"], ["a"]), payload(0.91, 0.8, ["a"], ["b"])],
                           [("eagl", "random")])
    assert len(rows) == 1 and rows[0]["n"] == 2 and rows[0]["mean"] == pytest.approx(0.105)
    assert rows[0]["plan_overlap"] == pytest.approx(0.5)
