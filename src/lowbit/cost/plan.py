"""Costs of a precision plan: MACs, BOPs, packed weight bytes and relative throughput.

A plan maps module names to ``(w_bits, a_bits)``; ``None`` is float and counts as 32 bits. A profiled
layer missing from the plan is float. Every cost is a sum of per-layer terms, which is what lets the
search turn budgets into knapsack constraints.

Relative throughput of a plan P against a reference plan R under a hardware profile (see
:mod:`lowbit.cost.hardware`)::

    T(P) = time(R) / time(P),   time(X) = sum over layers of profile.layer_time(layer, *X[layer])

The default reference is the W4A4 preset of the same layers (:func:`w4a4_reference_plan`: 4/4 everywhere,
the first and last executed layer at 8/8), so that preset has T = 1.0, dropping layers to 2 bits gives
T > 1, and a W8A8 or float plan gives T < 1. Pass the plan you actually started from as ``reference_plan``
when it differs from the preset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lowbit.cost.hardware import (
    VALID_BITS,
    HardwareProfile,
    effective_bits,
    get_profile,
    layer_bops,
    layer_weight_bytes,
)
from lowbit.cost.layers import LayerInfo
from lowbit.errors import LowbitError

Bits = int | None
Plan = dict[str, tuple[Bits, Bits]]


def _check_bits(name: str, bits: object) -> Bits:
    if bits is None or (isinstance(bits, int) and not isinstance(bits, bool) and bits in VALID_BITS):
        return bits
    raise LowbitError(f"plan entry {name!r}: bits must be one of {VALID_BITS} or None (float), got {bits!r}")


def as_plan(plan: Mapping | Any, layers: Iterable[LayerInfo] | None = None) -> Plan:
    """Validate a plan (a mapping, or any object with a ``.layers`` mapping) into ``{name: (w, a)}``.

    With ``layers`` given, a plan name that is not a profiled layer is an error (a typo or another model).
    """
    raw = plan.layers if hasattr(plan, "layers") and not isinstance(plan, Mapping) else plan
    if not isinstance(raw, Mapping):
        raise LowbitError(f"a plan must map layer names to (w_bits, a_bits), got {type(plan).__name__}")
    out: Plan = {}
    for name, bits in raw.items():
        if not isinstance(bits, (tuple, list)) or len(bits) != 2:
            raise LowbitError(f"plan entry {name!r}: expected (w_bits, a_bits), got {bits!r}")
        out[name] = (_check_bits(name, bits[0]), _check_bits(name, bits[1]))
    if layers is not None:
        known = {layer.name for layer in layers}
        unknown = [n for n in out if n not in known]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise LowbitError(f"plan names layers the model does not have: "
                              f"{', '.join(map(repr, unknown[:3]))}{more}")
    return out


def _bits_of(plan: Plan, layer: LayerInfo) -> tuple[Bits, Bits]:
    return plan.get(layer.name, (None, None))


def w4a4_reference_plan(layers: Iterable[LayerInfo], edge_bits: int = 8) -> Plan:
    """The W4A4 preset: every layer at 4/4 except the first and last *executed* layer at ``edge_bits``.

    This is LSQ's convention (first conv and last FC at 8 bits). First/last follow call order, as
    recorded by :func:`~lowbit.cost.profile_layers`; never-called layers stay at 4/4.
    """
    layers = list(layers)
    plan: Plan = {layer.name: (4, 4) for layer in layers}
    called = [layer.name for layer in layers if layer.calls > 0]
    for name in called[:1] + called[-1:]:
        plan[name] = (edge_bits, edge_bits)
    return plan


def total_macs(layers: Iterable[LayerInfo]) -> int:
    """Multiply-accumulates per example of all conv/linear layers (independent of the plan)."""
    return sum(layer.macs for layer in layers)


def bops(layers: Iterable[LayerInfo], plan: Mapping | Any) -> int:
    """Bit-operations per example, ``sum_l MACs_l * b_w,l * b_a,l`` (UNIQ, Baskin et al.; HAWQ-V3)."""
    layers = list(layers)
    plan = as_plan(plan, layers)
    return sum(layer_bops(layer, *_bits_of(plan, layer)) for layer in layers)


def weight_bytes(layers: Iterable[LayerInfo], plan: Mapping | Any) -> int:
    """Packed weight storage in bytes, ``sum_l ceil(params_l * b_w,l / 8)``.

    Biases and step sizes are excluded: they stay 32-bit whatever the plan, so they never change a choice.
    """
    layers = list(layers)
    plan = as_plan(plan, layers)
    return sum(layer_weight_bytes(layer, _bits_of(plan, layer)[0]) for layer in layers)


def plan_time(layers: Iterable[LayerInfo], plan: Mapping | Any,
              profile: str | HardwareProfile = "bits-proportional") -> float:
    """Modelled time per example of ``plan``, in the profile's unit (``get_profile(profile).unit``)."""
    layers = list(layers)
    plan = as_plan(plan, layers)
    prof = get_profile(profile)
    return math.fsum(prof.layer_time(layer, *_bits_of(plan, layer)) for layer in layers)


def relative_throughput(layers: Iterable[LayerInfo], plan: Mapping | Any,
                        profile: str | HardwareProfile = "bits-proportional",
                        reference_plan: Mapping | Any | None = None) -> float:
    """``time(reference) / time(plan)``: 1.0 for the reference, 2.0 means twice the examples per second.

    The reference defaults to :func:`w4a4_reference_plan` of the same layers.
    """
    layers = list(layers)
    reference = w4a4_reference_plan(layers) if reference_plan is None else reference_plan
    t_plan = plan_time(layers, plan, profile)
    if t_plan <= 0:
        raise LowbitError("the plan has zero modelled time (no layer ran any MACs); cannot form a throughput")
    return plan_time(layers, reference, profile) / t_plan


def low_bit_mac_fraction(layers: Iterable[LayerInfo], plan: Mapping | Any, candidates: Iterable[str],
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
    low = sum(m for n, m in macs.items() if max(map(effective_bits, plan.get(n, (None, None)))) <= low_bits)
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


def plan_cost(layers: Iterable[LayerInfo], plan: Mapping | Any,
              profile: str | HardwareProfile = "bits-proportional",
              reference_plan: Mapping | Any | None = None, *,
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
