"""From sensitivity scores and a budget to a precision plan: budgets, the selector, and ``lowbit select``.

Budgets (``budget_kind``):

* ``mac-fraction`` f in [0, 1]: at least a fraction f of the candidates' MACs runs at 2 bits (EAGL/ALPS'
  frontier axis; 0 = the W4A4 network, 1 = every candidate at 2 bits).
* ``throughput`` t > 0: relative throughput ``time(W4A4) / time(plan)`` of at least t under the cost profile
  (``bits-proportional``, ``bops``, ``size`` or ``measured`` with a latency table; see :mod:`lowbit.cost`).

The exact knapsack of :func:`lowbit.search.select_plan` then drops the set with the least total score.
Selection scores are ``max(s, 0) + ε·MAC share`` with ``ε = 1e-6·max|s|`` (``clip_negative=True``, the
default): the solver would drop every layer with a score <= 0 (it costs nothing in the objective), so noise-level
negative ALPS drops or Hessian traces would push a plan far past its budget and break the equal-budget
comparison. The tie-break meets the budget with the least excess MACs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.cost import HardwareProfile, LayerInfo, PlanCost, get_profile
from lowbit.errors import LowbitError
from lowbit.quant import Plan, plan_of
from lowbit.search import Selection, select_plan
from lowbit.sensitivity.table import SensitivityTable

BUDGET_KINDS = ("mac-fraction", "throughput")
COSTS = ("bits-proportional", "bops", "size", "measured")


def check_budget(budget: Any, kind: str) -> float:
    """One budget as a float, checked against its kind's range."""
    if kind not in BUDGET_KINDS:
        raise LowbitError(f"unknown budget kind {kind!r}; choose one of {', '.join(BUDGET_KINDS)}")
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise LowbitError(f"budget {budget!r} is not a number") from None
    if kind == "mac-fraction" and not 0 <= b <= 1:
        raise LowbitError(f"a mac-fraction budget must be in [0, 1] (share of candidate MACs at 2 bits), got {b}")
    if kind == "throughput" and not (b > 0 and math.isfinite(b)):
        raise LowbitError(f"a throughput budget must be a finite number > 0 (relative to W4A4 = 1.0), got {b}")
    return b


def parse_budgets(text: str | Any, kind: str = "mac-fraction") -> tuple[float, ...]:
    """``"0.25,0.5"`` (or a list of numbers) -> ``(0.25, 0.5)``, each checked; duplicates removed, order kept."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    items = [s for s in items if s != ""]
    if not items:
        raise LowbitError("no budgets given; e.g. --budgets 0.25,0.5,0.75,1.0")
    return tuple(dict.fromkeys(check_budget(s, kind) for s in items))


def resolve_profile(cost: str | HardwareProfile, latency_table: str | Path | Mapping | None = None
                    ) -> HardwareProfile:
    if isinstance(cost, str) and cost not in COSTS:
        raise LowbitError(f"unknown cost model {cost!r}; choose one of {', '.join(COSTS)}")
    return get_profile(cost, latency_table)


def selection_scores(scores: Mapping[str, float], layers: list[LayerInfo], clip_negative: bool = True
                     ) -> dict[str, float]:
    """The scores the solver sees (module docstring); unchanged when ``clip_negative`` is False."""
    if not clip_negative:
        return dict(scores)
    macs = {li.name: li.macs for li in layers}
    total = sum(macs[n] for n in scores) or 1
    eps = 1e-6 * max([abs(s) for s in scores.values()] + [1e-12])
    return {n: max(s, 0.0) + eps * macs[n] / total for n, s in scores.items()}


def select_layers(layers: list[LayerInfo], base_plan: Mapping | Plan, scores: Mapping[str, float], budget: float,
                  budget_kind: str = "mac-fraction", profile: str | HardwareProfile = "bits-proportional", *,
                  low_bits: int = 2, clip_negative: bool = True, solver: str = "auto",
                  ) -> tuple[Plan, PlanCost, Selection]:
    """Drop the candidates (keys of ``scores``) with the least total score to ``low_bits`` under one budget.

    Returns ``(plan, cost, selection)``; the plan has the base plan's layers and the throughput is relative to
    the base plan (the W4A4 network: 1.0). An unreachable budget is a LowbitError.
    """
    budget = check_budget(budget, budget_kind)
    kw = {"mac_fraction": budget} if budget_kind == "mac-fraction" else {"min_throughput": budget}
    return select_plan(layers, base_plan, selection_scores(scores, layers, clip_negative),
                       profile=profile, low_bits=low_bits, method=solver, **kw)


class PrecisionSelector:
    """Choose a mixed 4/2-bit plan for a quantized model from a sensitivity table (scikit-learn conventions).

    Parameters are stored as given; :meth:`fit` does the work and sets ``plan_`` (a :class:`lowbit.quant.Plan`),
    ``cost_`` (:class:`lowbit.cost.PlanCost`), ``selection_`` (the solver's answer), ``layers_`` (the
    profile) and ``solve_seconds_``.

    >>> sel = PrecisionSelector(budget=0.5).fit(model, eagl_scores(model), example_input=x)
    >>> quantize_(fresh_model, sel.plan_)
    """

    def __init__(self, budget: float = 0.5, *, budget_kind: str = "mac-fraction", cost: str = "bits-proportional",
                 latency_table: str | Path | Mapping | None = None, low_bits: int = 2, clip_negative: bool = True,
                 solver: str = "auto"):
        self.budget = budget
        self.budget_kind = budget_kind
        self.cost = cost
        self.latency_table = latency_table
        self.low_bits = low_bits
        self.clip_negative = clip_negative
        self.solver = solver

    def fit(self, model: nn.Module, table: SensitivityTable | Mapping[str, float], example_input=None,
            layers: list[LayerInfo] | None = None) -> PrecisionSelector:
        """Profile ``model`` (one batch-1 ``example_input``, or pass ``layers``) and solve for the plan."""
        from lowbit.cost import profile_layers

        if layers is None:
            if example_input is None:
                raise LowbitError("PrecisionSelector.fit needs example_input (a batch-1 input) or layers")
            layers = profile_layers(model, example_input)
        scores = table.scores if isinstance(table, SensitivityTable) else dict(table)
        profile = resolve_profile(self.cost, self.latency_table)
        t0 = time.perf_counter()
        self.plan_, self.cost_, self.selection_ = select_layers(
            layers, plan_of(model), scores, self.budget, self.budget_kind, profile, low_bits=self.low_bits,
            clip_negative=self.clip_negative, solver=self.solver)
        self.solve_seconds_ = time.perf_counter() - t0
        self.layers_ = layers
        return self


@dataclass(frozen=True)
class SelectResult:
    """What ``lowbit select`` reports: the plan, its costs, the layers dropped and the time taken."""

    plan: Plan
    cost: PlanCost
    selection: Selection
    table: SensitivityTable
    solve_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "cost": self.cost.to_dict(), "low_layers": list(self.selection.chosen),
                "method": self.table.method, "sensitivity_seconds": self.table.wall_seconds,
                "solve_seconds": self.solve_seconds,
                "time_to_plan_seconds": self.table.wall_seconds + self.solve_seconds}


def select(run: str | Path, sensitivity: str | Path | SensitivityTable, budget: float, out: str | Path | None = None,
           *, budget_kind: str = "mac-fraction", cost: str = "bits-proportional",
           latency_table: str | Path | None = None, clip_negative: bool = True) -> SelectResult:
    """``lowbit select``: the plan for the W4A4 run ``run`` under one budget from a sensitivity table.

    ``out`` (``.yaml``/``.yml``/``.json``) receives the plan in the format ``lowbit quantize --plan`` reads;
    a ``<out stem>.cost.json`` beside it records the costs and the chosen layers.
    """
    from lowbit.sensitivity.api import load_w4a4_run
    from lowbit.sensitivity.candidates import example_input

    model, ckpt = load_w4a4_run(run)
    table = sensitivity if isinstance(sensitivity, SensitivityTable) else SensitivityTable.load(sensitivity)
    shape = ckpt.get("spec", {}).get("input_shape")
    if not shape:
        raise LowbitError(f"{run}: the checkpoint does not record its input shape")
    budget = check_budget(budget, budget_kind)
    sel = PrecisionSelector(budget, budget_kind=budget_kind, cost=cost, latency_table=latency_table,
                            clip_negative=clip_negative).fit(model, table, example_input(shape))
    result = SelectResult(sel.plan_, sel.cost_, sel.selection_, table, sel.solve_seconds_)
    if out is not None:
        from lowbit.io import save_json

        path = Path(out)
        result.plan.save(path)
        save_json(path.with_name(path.stem + ".cost.json"),
                  {**result.to_dict(), "budget": budget, "budget_kind": budget_kind, "source": str(run)})
    return result


__all__ = ["BUDGET_KINDS", "COSTS", "PrecisionSelector", "SelectResult", "check_budget", "parse_budgets",
           "resolve_profile", "select", "select_layers", "selection_scores"]
