"""Costs of a precision plan: MACs, BOPs, packed weight bytes and relative throughput.

A plan is a :class:`lowbit.quant.Plan`; a mapping ``name -> (w_bits, a_bits)`` is accepted and converted by
:func:`as_plan`. ``None`` is float and counts as 32 bits; a profiled layer missing from the plan is float.
Every cost is a sum of per-layer terms, which is what lets the search turn budgets into knapsack constraints.

Relative throughput of a plan P against a reference plan R under a hardware profile (see
:mod:`lowbit.cost.hardware`)::

    T(P) = time(R) / time(P),   time(X) = sum over layers of profile.layer_time(layer, *X[layer])

The default reference is the W4A4 preset of the same layers (:func:`w4a4_reference_plan`, the rule of
``Plan.preset``: 4/4 everywhere, the first and last executed layer at 8/8), so that preset has T = 1.0,
dropping layers to 2 bits gives T > 1, and a W8A8 or float plan gives T < 1. Pass the plan you actually
started from as ``reference_plan`` when it differs from the preset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lowbit.cost.hardware import (
    HardwareProfile,
    effective_bits,
    get_profile,
    layer_bops,
    layer_weight_bytes,
)
from lowbit.cost.layers import LayerInfo
from lowbit.errors import LowbitError
from lowbit.quant.bits import Bits
from lowbit.quant.plan import Plan, first_and_last


def as_plan(plan: Plan | Mapping | Any, layers: Iterable[LayerInfo] | None = None) -> Plan:
    """The cost/search boundary: :meth:`Plan.coerce` (the one plan validator), then, with ``layers`` given,
    every plan name must be a profiled layer (a typo or another model's plan is an error)."""
    plan = Plan.coerce(plan)
    if layers is not None:
        plan.check_names([layer.name for layer in layers], "the profiled layers")
    return plan


def _bits_of(plan: Plan, layer: LayerInfo) -> tuple[Bits, Bits]:
    return plan.layers.get(layer.name, (None, None))


def w4a4_reference_plan(layers: Iterable[LayerInfo], edge_bits: int | None = 8) -> Plan:
    """``Plan.preset("w4a4", model)`` on profiled layers: 4/4, the first and last *executed* at ``edge_bits``.

    This is LSQ's convention (first conv and last FC at 8 bits). First/last follow call order, as
    recorded by :func:`~lowbit.cost.profile_layers`; never-called layers stay at 4/4.
    """
    layers = list(layers)
    called = [layer.name for layer in layers if layer.calls > 0]
    return Plan.uniform("w4a4", [layer.name for layer in layers], first_and_last(called), edge_bits)


def total_macs(layers: Iterable[LayerInfo]) -> int:
    """Multiply-accumulates per example of all conv/linear layers (independent of the plan)."""
    return sum(layer.macs for layer in layers)


def bops(layers: Iterable[LayerInfo], plan: Plan | Mapping) -> int:
    """Bit-operations per example, ``sum_l MACs_l * b_w,l * b_a,l`` (UNIQ, Baskin et al.; HAWQ-V3)."""
    layers = list(layers)
    plan = as_plan(plan, layers)
    return sum(layer_bops(layer, *_bits_of(plan, layer)) for layer in layers)


def weight_bytes(layers: Iterable[LayerInfo], plan: Plan | Mapping) -> int:
    """Packed weight storage in bytes, ``sum_l ceil(params_l * b_w,l / 8)``.

    Biases and step sizes are excluded: they stay 32-bit whatever the plan, so they never change a choice.
    """
    layers = list(layers)
    plan = as_plan(plan, layers)
    return sum(layer_weight_bytes(layer, _bits_of(plan, layer)[0]) for layer in layers)


def plan_time(layers: Iterable[LayerInfo], plan: Plan | Mapping,
              profile: str | HardwareProfile = "bits-proportional") -> float:
    """Modelled time per example of ``plan``, in the profile's unit (``get_profile(profile).unit``)."""
    layers = list(layers)
    plan = as_plan(plan, layers)
    prof = get_profile(profile)
    return math.fsum(prof.layer_time(layer, *_bits_of(plan, layer)) for layer in layers)


def relative_throughput(layers: Iterable[LayerInfo], plan: Plan | Mapping,
                        profile: str | HardwareProfile = "bits-proportional",
                        reference_plan: Plan | Mapping | None = None) -> float:
    """``time(reference) / time(plan)``: 1.0 for the reference, 2.0 means twice the examples per second.

    The reference defaults to :func:`w4a4_reference_plan` of the same layers.
    """
    layers = list(layers)
    reference = w4a4_reference_plan(layers) if reference_plan is None else reference_plan
    t_plan = plan_time(layers, plan, profile)
    if t_plan <= 0:
        raise LowbitError("the plan has zero modelled time (no layer ran any MACs); cannot form a throughput")
    return plan_time(layers, reference, profile) / t_plan


def low_bit_mac_fraction(layers: Iterable[LayerInfo], plan: Plan | Mapping, candidates: Iterable[str],
                         low_bits: int = 2) -> float:
    """Fraction of the candidates' MACs in layers whose weights and activations are both ``<= low_bits``.

    This is the frontier's budget axis (0 = all candidates at 4 bits, 1 = all at 2 bits).
    """
    layers = list(layers)
    plan = as_plan(plan, layers)
    cand = set(candidates)
    macs = {layer.name: layer.macs for layer in layers if layer.name in cand}
    if len(macs) != len(cand):
        raise LowbitError(f"candidates not among the profiled layers: {sorted(cand - set(macs))[:3]}")
    total = sum(macs.values())
    low = sum(m for n, m in macs.items() if max(map(effective_bits, plan.layers.get(n, (None, None)))) <= low_bits)
    return low / total if total else 0.0


@dataclass(frozen=True)
class PlanCost:
    """Every cost of one plan, per example.

    Attributes:
        macs: multiply-accumulates (plan-independent).
        bops: bit-operations, ``sum MACs * b_w * b_a``.
        weight_bytes: packed weight bytes, ``sum ceil(params * b_w / 8)``.
        relative_throughput: ``time(reference) / time(plan)`` under ``profile``.
        profile: name of the hardware profile used for the throughput.
        low_bit_mac_fraction: share of candidate MACs at ``<= low_bits``; None when no candidates were given.
    """

    macs: int
    bops: int
    weight_bytes: int
    relative_throughput: float
    profile: str
    low_bit_mac_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_cost(layers: Iterable[LayerInfo], plan: Plan | Mapping,
              profile: str | HardwareProfile = "bits-proportional",
              reference_plan: Plan | Mapping | None = None, *,
              candidates: Iterable[str] | None = None, low_bits: int = 2) -> PlanCost:
    """All costs of ``plan`` in one :class:`PlanCost` (see the module docstring for the throughput)."""
    layers = list(layers)
    prof = get_profile(profile)
    return PlanCost(
        macs=total_macs(layers),
        bops=bops(layers, plan),
        weight_bytes=weight_bytes(layers, plan),
        relative_throughput=relative_throughput(layers, plan, prof, reference_plan),
        profile=prof.name,
        low_bit_mac_fraction=None if candidates is None else low_bit_mac_fraction(
            layers, plan, candidates, low_bits),
    )
