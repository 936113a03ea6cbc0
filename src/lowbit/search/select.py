"""Turn user budgets on a plan into knapsack constraints and pick the layers to drop to low bits.

Each budget becomes "the candidates dropped save at least r" (EAGL/ALPS step 2), with exact per-layer
savings taken from the same cost functions that :func:`lowbit.cost.plan_cost` reports:

================= ======================================= ============================================
budget            per-layer saving a_l (base -> low)       required saving r
================= ======================================= ============================================
mac_fraction f    MACs_l                                  f * sum_C MACs_l
min_throughput t  time_l(base) - time_l(low), profile     time(base) - time(reference) / t
max_bops B        bops_l(base) - bops_l(low)              bops(base) - B
max_weight_bytes  bytes_l(base) - bytes_l(low)            weight_bytes(base) - W
================= ======================================= ============================================

Throughput is relative to ``reference_plan`` (default: the base plan itself, so the base has T = 1.0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from numbers import Real
from typing import NamedTuple

from lowbit.cost import (
    HardwareProfile,
    LayerInfo,
    PlanCost,
    as_plan,
    effective_bits,
    get_profile,
    layer_bops,
    layer_weight_bytes,
    plan_cost,
)
from lowbit.errors import LowbitError
from lowbit.quant.bits import SUPPORTED_BITS
from lowbit.quant.plan import Plan
from lowbit.search.solver import Selection, solve

Cost = Callable[[LayerInfo, int | None, int | None], float]
Budget = tuple[dict[str, Fraction], Fraction, Callable[[Fraction], str]]  # savings, required saving, infeasible message


def _finite(value: float, name: str, low: float, high: float = math.inf) -> Fraction:
    if (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
            or not low <= value <= high):
        bound = f"in [{low}, {high}]" if high < math.inf else f">= {low}"
        raise LowbitError(f"{name} must be a finite number {bound}, got {value!r}")
    return Fraction(value)


def select_plan(layers: list[LayerInfo], base_plan: Plan | Mapping, scores: Mapping[str, float], *,
                mac_fraction: float | None = None, min_throughput: float | None = None,
                max_bops: int | None = None, max_weight_bytes: int | None = None,
                profile: str | HardwareProfile = "bits-proportional", low_bits: int = 2,
                method: str = "auto", reference_plan: Plan | Mapping | None = None,
                ) -> tuple[Plan, PlanCost, Selection]:
    """Drop the candidates (the keys of ``scores``) to ``(low_bits, low_bits)`` at least total score.

    Args:
        layers: from :func:`lowbit.cost.profile_layers`.
        base_plan: the starting plan (the W4A4 preset: 4/4, first and last layer at 8/8); a mapping is
            converted by :func:`lowbit.cost.as_plan`, like every plan argument.
        scores: candidate name -> sensitivity (lower = safer to drop; negative = always dropped).
        mac_fraction: at least this fraction of the candidates' MACs runs at low bits.
        min_throughput: relative throughput (``time(reference) / time(plan)``) at least this.
        max_bops, max_weight_bytes: upper limits on the plan's BOPs and packed weight bytes.
        profile: hardware profile for the throughput (name or instance, e.g. a MeasuredProfile).
        low_bits: bits of a dropped layer's weights and input activations.
        method: solver, see :func:`lowbit.search.solve`.
        reference_plan: throughput reference; defaults to ``base_plan``.

    Returns:
        ``(plan, cost, selection)``: the new :class:`~lowbit.quant.Plan`, its :class:`PlanCost` (throughput against the
        reference, ``low_bit_mac_fraction`` over the candidates) and the solver's :class:`Selection`
        (its ``achieved``/``required`` are in saving units, see the module docstring).
    """
    layers = list(layers)
    base = as_plan(base_plan, layers)
    reference = base if reference_plan is None else as_plan(reference_plan, layers)
    cand = _candidates(layers, base, scores, low_bits)
    prof = get_profile(profile)
    budgets = _budgets(_Drop(layers, cand, base, (low_bits, low_bits)), reference, prof, mac_fraction=mac_fraction,
                       min_throughput=min_throughput, max_bops=max_bops, max_weight_bytes=max_weight_bytes)
    low = (low_bits, low_bits)
    selection = solve(scores, {b: v[0] for b, v in budgets.items()}, {b: v[1] for b, v in budgets.items()},
                      method=method)
    plan = Plan({**base.layers, **dict.fromkeys(selection.chosen, low)})
    cost = plan_cost(layers, plan, prof, reference, candidates=list(scores), low_bits=low_bits)
    return plan, cost, selection


def _candidates(layers: list[LayerInfo], base: Plan, scores: Mapping[str, float], low_bits: int) -> list[LayerInfo]:
    """The scored layers, each one the model has and ``low_bits`` would lower."""
    by_name = {layer.name: layer for layer in layers}
    unknown = [n for n in scores if n not in by_name]
    if unknown:
        raise LowbitError(f"scored layers the model does not have: {', '.join(map(repr, unknown[:3]))}")
    if not scores:
        raise LowbitError("no candidate layers: scores is empty")
    if isinstance(low_bits, bool) or low_bits not in SUPPORTED_BITS:
        raise LowbitError(f"low_bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {low_bits!r}")
    for n in scores:
        w, a = base.layers.get(n, (None, None))
        if low_bits > min(effective_bits(w), effective_bits(a)) or (w, a) == (low_bits, low_bits):
            raise LowbitError(f"candidate {n!r} is at {w}/{a} bits in the base plan; low_bits={low_bits} "
                              "would not lower it")
    return [by_name[n] for n in scores]


class _Drop(NamedTuple):
    """The candidates dropping from the base plan to ``low``: exact per-layer savings and plan totals."""

    layers: list[LayerInfo]
    cand: list[LayerInfo]
    base: Plan
    low: tuple[int, int]

    def saved(self, cost: Cost) -> dict[str, Fraction]:
        return {c.name: Fraction(cost(c, *self.base.layers.get(c.name, (None, None)))) - Fraction(cost(c, *self.low))
                for c in self.cand}

    def total(self, cost: Cost, plan: Plan) -> Fraction:
        return sum((Fraction(cost(x, *plan.layers.get(x.name, (None, None)))) for x in self.layers), Fraction(0))


def _budgets(drop: _Drop, reference: Plan, prof: HardwareProfile, *, mac_fraction: float | None,
             min_throughput: float | None, max_bops: int | None, max_weight_bytes: int | None) -> dict[str, Budget]:
    """Budget name -> (savings, required saving, "best possible" for an infeasible message); table in the docstring."""
    cand, base, low_bits = drop.cand, drop.base, drop.low[0]
    budgets: dict[str, Budget] = {}
    if mac_fraction is not None:
        f = _finite(mac_fraction, "mac_fraction", 0.0, 1.0)
        budgets["low_bit_macs"] = ({c.name: Fraction(c.macs) for c in cand}, f * sum(c.macs for c in cand),
                                   lambda best: f"mac_fraction={mac_fraction} is out of reach")
    if min_throughput is not None:
        t = _finite(min_throughput, "min_throughput", 0.0)
        if t == 0:
            raise LowbitError("min_throughput must be > 0")
        time_base, time_ref = drop.total(prof.layer_time, base), drop.total(prof.layer_time, reference)
        d = drop.saved(prof.layer_time)
        slower = [n for n, v in d.items() if v < 0]
        if slower:
            raise LowbitError(f"profile {prof.name!r}: layer {slower[0]!r} is slower at {low_bits} bits than "
                              "in the base plan, so dropping it cannot raise throughput")
        budgets["time_saved"] = (d, time_base - time_ref / t, lambda best: (
            f"min_throughput={min_throughput} is out of reach: the best is "
            f"{float(time_ref / (time_base - best)) if time_base > best else math.inf:.6g}"))
    if max_bops is not None:
        limit = _finite(max_bops, "max_bops", 0.0)
        base_bops = drop.total(layer_bops, base)
        budgets["bops_saved"] = (drop.saved(layer_bops), base_bops - limit, lambda best: (
            f"max_bops={max_bops} is out of reach: the fewest BOPs are {float(base_bops - best):.6g}"))
    if max_weight_bytes is not None:
        limit = _finite(max_weight_bytes, "max_weight_bytes", 0.0)

        def wbytes(x: LayerInfo, w: int | None, a: int | None) -> int:
            return layer_weight_bytes(x, w)

        base_bytes = drop.total(wbytes, base)
        budgets["bytes_saved"] = (drop.saved(wbytes), base_bytes - limit, lambda best: (
            f"max_weight_bytes={max_weight_bytes} is out of reach: the smallest is "
            f"{float(base_bytes - best):.6g} bytes"))
    if not budgets:
        raise LowbitError("select_plan needs at least one budget: mac_fraction, min_throughput, max_bops "
                          "or max_weight_bytes")
    for key, (savings, need, explain) in list(budgets.items()):
        best = sum(savings.values(), Fraction(0))
        if best < need <= best + abs(best) * Fraction(1, 10**12):
            budgets[key] = (savings, best, explain)  # a float budget at the exact maximum, rounded up by float
        elif best < need:
            raise LowbitError(f"{explain(best)} (all {len(cand)} candidates at {low_bits} bits)")
    return budgets
