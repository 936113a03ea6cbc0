"""Exact selection of the layers to drop to low precision under one or more budgets.

Problem: candidates C, each with a score s_l (lower = safer to drop; any real) and, per budget b, a
non-negative saving a_bl. Choose S in C to

    minimise sum_{l in S} s_l   subject to   sum_{l in S} a_bl >= r_b   for every budget b.

Every budget of the search is of this form because each cost (low-bit MACs, modelled time, BOPs, weight
bytes) is a sum of per-layer terms and dropping a layer never hurts it (EAGL/ALPS step 2, HAWQ-V3's ILP).

Presolve: a layer with a negative score is always dropped (it lowers the objective and only adds
savings); budgets it already meets are removed. Then:

* ``"dp"``: one budget, exact 0/1 knapsack over the layers *kept* at high precision,
  max sum_K s_l s.t. sum_K a_l <= sum_C a_l - r, by dynamic programming on integer weights. Savings are
  read as exact rationals and divided by their gcd (MACs -> units of gcd MACs); used when the capacity
  stays under :data:`DP_MAX_CAPACITY` cells.
* ``"ilp"``: ``scipy.optimize.milp`` (HiGHS, zero relative gap) with one row per budget; any number of
  budgets and any weights. Its answer is re-checked in exact arithmetic.
* ``"greedy"``: score per share of the unmet need, then a pruning pass. A documented fallback; not exact.
* ``"auto"`` (default): ``"dp"`` when it applies, else ``"ilp"``.

All budget checks use exact rational arithmetic (ints, floats and Fractions are all exact rationals), so a
returned set meets every budget exactly as given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction
from numbers import Real
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

METHODS = ("auto", "dp", "ilp", "greedy")
DP_MAX_CAPACITY = 2_000_000  # knapsack capacity cells (one score array of this length)
DP_MAX_TABLE_BITS = 400_000_000  # items * cells decision bits kept for the backtrack (50 MB)


@dataclass(frozen=True)
class Selection:
    """The layers chosen for low precision and how they meet the budgets.

    Attributes:
        chosen: names in S (dropped to low bits), in the order of ``scores``.
        objective: sum of their scores.
        achieved: per budget, the saving sum_{l in S} a_bl.
        required: per budget, the saving r_b that was asked for.
        solver: ``"dp"``, ``"ilp"``, ``"greedy"``, or ``"presolve"`` when the forced drops met every budget.
        wall_time_s: seconds spent in :func:`solve`.
    """

    chosen: tuple[str, ...]
    objective: float
    achieved: dict[str, float]
    required: dict[str, float]
    solver: str
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chosen": list(self.chosen)}


def _exact(value: object, what: str) -> Fraction:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise LowbitError(f"{what} must be a finite number, got {value!r}")
    return Fraction(value)


def _validate(scores: Mapping[str, float], savings: Mapping[str, Mapping[str, float]],
              required: Mapping[str, float]) -> tuple[dict[str, dict[str, Fraction]], dict[str, Fraction]]:
    for name, s in scores.items():
        _exact(s, f"score of {name!r}")
    if set(savings) != set(required):
        raise LowbitError(f"savings and required must name the same budgets, got {sorted(savings)} "
                          f"and {sorted(required)}")
    a: dict[str, dict[str, Fraction]] = {}
    for b, per_layer in savings.items():
        missing = [n for n in scores if n not in per_layer]
        extra = [n for n in per_layer if n not in scores]
        if missing or extra:
            raise LowbitError(f"budget {b!r}: savings must cover exactly the scored candidates "
                              f"(missing {missing[:3]}, unknown {extra[:3]})")
        a[b] = {n: _exact(per_layer[n], f"budget {b!r}: saving of {n!r}") for n in scores}
        negative = [n for n, v in a[b].items() if v < 0]
        if negative:
            raise LowbitError(f"budget {b!r}: savings must be >= 0 (dropping a layer never costs), "
                              f"{negative[0]!r} has {float(a[b][negative[0]])}")
    return a, {b: _exact(r, f"required saving of budget {b!r}") for b, r in required.items()}


def _common_unit(values: list[Fraction]) -> Fraction:
    """Largest rational g with every value an integer multiple of g (values not all zero)."""
    denom = math.lcm(*(v.denominator for v in values))
    return Fraction(math.gcd(*(v.numerator * (denom // v.denominator) for v in values)), denom)


def _dp_capacity(a: dict[str, Fraction], need: Fraction) -> tuple[Fraction, int]:
    unit = _common_unit([v for v in a.values() if v])
    return unit, math.floor((sum(a.values()) - need) / unit)


def _dp_fits(free: list[str], a: dict[str, dict[str, Fraction]], active: dict[str, Fraction]) -> bool:
    (b, r), = active.items()
    weights = {n: a[b][n] for n in free}
    if not any(weights.values()):
        return False
    _, cap = _dp_capacity(weights, r)
    return cap + 1 <= DP_MAX_CAPACITY and len(free) * (cap + 1) <= DP_MAX_TABLE_BITS


def _solve_dp(names: list[str], scores: Mapping[str, float], a: dict[str, Fraction],
              need: Fraction) -> list[str]:
    """Exact 0/1 knapsack on the kept set; returns the dropped names. Scores here are all >= 0."""
    unit, cap = _dp_capacity(a, need)
    weights = [int(a[n] / unit) for n in names]
    best = np.zeros(cap + 1)  # best[c] = max kept score with kept weight <= c
    took: list[np.ndarray] = []  # packed bits: item i kept at capacity c
    for w, n in zip(weights, names):
        s = float(scores[n])
        take = np.zeros(cap + 1, dtype=bool)
        if w == 0:
            take[:] = True  # keeping costs no capacity and a score >= 0 never hurts
            best += s
        elif w <= cap:
            cand = best[:-w] + s
            take[w:] = cand > best[w:]
            best[w:] = np.where(take[w:], cand, best[w:])
        took.append(np.packbits(take))
    c, dropped = cap, []
    for i in reversed(range(len(names))):
        if (took[i][c >> 3] >> (7 - (c & 7))) & 1:
            c -= weights[i]
        else:
            dropped.append(names[i])
    return dropped


def _pow2_scale(values: np.ndarray, target: float) -> float:
    """Power of two bringing ``max|values|`` near ``target``; exact, so scaled data keeps its value."""
    top = float(np.max(np.abs(values))) if values.size else 0.0
    return 1.0 if top == 0 else 2.0 ** (math.floor(math.log2(target)) - math.floor(math.log2(top)))


def _solve_ilp(names: list[str], scores: Mapping[str, float], a: dict[str, dict[str, Fraction]],
               need: dict[str, Fraction]) -> list[str]:
    """Binary ILP with HiGHS. Rows and objective are scaled by powers of two (exact) so that HiGHS'
    absolute tolerances (1e-7 feasibility, 1e-6 objective gap) are negligible; a row that rounding
    lets through short of its budget is tightened by the shortfall and the ILP solved again."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    budgets = list(need)
    c = np.array([float(scores[n]) for n in names])
    c *= _pow2_scale(c, 2.0**20)
    rows = np.array([[float(a[b][n]) for n in names] for b in budgets])
    row_scale = np.array([_pow2_scale(row[row != 0], 1.0) if np.any(row) else 1.0 for row in rows])
    lb = np.array([float(need[b]) for b in budgets])
    for _ in range(5):
        res = milp(c, constraints=LinearConstraint(rows * row_scale[:, None], lb * row_scale, np.inf),
                   integrality=np.ones(len(names)), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise LowbitError(f"the ILP solver found no selection ({res.message}); try method='greedy'")
        chosen = [n for n, x in zip(names, res.x) if x > 0.5]
        short = {i: need[b] - sum(a[b][n] for n in chosen) for i, b in enumerate(budgets)}
        short = {i: s for i, s in short.items() if s > 0}
        if not short:
            return chosen
        for i, s in short.items():
            lb[i] += max(float(s), abs(lb[i]) * 1e-12, 1e-300)
    raise RuntimeError("ILP answers kept missing a budget by rounding; this is a bug, please report it")


def _solve_greedy(names: list[str], scores: Mapping[str, float], a: dict[str, dict[str, Fraction]],
                  need: dict[str, Fraction]) -> list[str]:
    """Add the layer with the least score per share of unmet need, then drop layers no longer needed."""
    chosen: list[str] = []
    left = list(names)
    while True:
        got = {b: sum((a[b][n] for n in chosen), Fraction(0)) for b in need}
        gap = {b: r - got[b] for b, r in need.items() if got[b] < r}
        if not gap:
            break
        share = {n: sum((min(a[b][n], g) / g for b, g in gap.items()), Fraction(0)) for n in left}
        useful = [n for n in left if share[n] > 0]
        pick = min(useful, key=lambda n: (Fraction(scores[n]) / share[n], -share[n]))
        chosen.append(pick)
        left.remove(pick)
    for n in sorted(chosen, key=lambda n: -scores[n]):
        rest = [m for m in chosen if m != n]
        if all(sum(a[b][m] for m in rest) >= r for b, r in need.items()):
            chosen = rest
    return chosen


def solve(scores: Mapping[str, float], savings: Mapping[str, Mapping[str, float]],
          required: Mapping[str, float], method: str = "auto") -> Selection:
    """Choose the set S of candidates to drop, minimising sum_S score with every budget met.

    Args:
        scores: candidate name -> score (any finite real; lower = safer to drop).
        savings: budget name -> {candidate name -> saving >= 0 when that candidate is dropped}.
        required: budget name -> the total saving S must reach (<= 0 means the budget is already met).
        method: ``"auto"``, ``"dp"``, ``"ilp"`` or ``"greedy"`` (see the module docstring).

    Raises:
        LowbitError: bad input, or a budget that even dropping every candidate cannot meet.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise LowbitError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    a, need = _validate(scores, savings, required)
    names = list(scores)
    for b, r in need.items():
        best = sum(a[b].values(), Fraction(0))
        if best < r:
            raise LowbitError(f"budget {b!r} cannot be met: it needs a saving of {float(r):.6g}, "
                              f"dropping all {len(names)} candidates gives {float(best):.6g}")

    forced = [n for n in names if scores[n] < 0]
    free = [n for n in names if scores[n] >= 0]
    residual = {b: need[b] - sum((a[b][n] for n in forced), Fraction(0)) for b in need}
    active = {b: r for b, r in residual.items() if r > 0}
    if method == "dp" and len(active) > 1:
        raise LowbitError(f"method 'dp' handles one budget, got {len(active)} ({', '.join(active)}); "
                          "use 'ilp'")

    if not active:
        picked, solver = [], "presolve"
    elif method == "greedy":
        picked, solver = _solve_greedy(free, scores, {b: a[b] for b in active}, active), "greedy"
    elif method in ("dp", "auto") and len(active) == 1 and _dp_fits(free, a, active):
        (b, r), = active.items()
        picked, solver = _solve_dp(free, scores, {n: a[b][n] for n in free}, r), "dp"
    elif method == "dp":
        raise LowbitError(f"method 'dp': the knapsack needs more than {DP_MAX_CAPACITY} cells for these "
                          "savings; use 'ilp' or 'auto'")
    else:
        picked, solver = _solve_ilp(free, scores, {b: a[b] for b in active}, active), "ilp"

    chosen = set(forced) | set(picked)
    order = tuple(n for n in names if n in chosen)
    achieved = {b: sum((a[b][n] for n in order), Fraction(0)) for b in need}
    if any(achieved[b] < need[b] for b in need):
        raise RuntimeError(f"solver {solver!r} returned a set that misses a budget; this is a bug")
    return Selection(
        chosen=order, objective=math.fsum(scores[n] for n in order),
        achieved={b: float(v) for b, v in achieved.items()},
        required={b: float(v) for b, v in need.items()},
        solver=solver, wall_time_s=time.perf_counter() - start,
    )

