"""Hardware profiles: how long one layer takes at given weight/activation bits.

Only ratios of these times are ever reported (relative throughput), so each profile keeps its own unit.
Every per-layer time is for one example and sums over the layer's calls; a never-called layer takes 0.

=================== ============================================ ==========================================
profile             layer time                                   source / regime
=================== ============================================ ==========================================
bits-proportional   MACs * c(max(b_w, b_a)), c(b) = b / 4        EAGL/ALPS (arXiv 2301.13330) and IBM's
                    unit: time of one 4-bit MAC                  8/4/2-bit inference hardware: throughput
                                                                 doubles each time precision halves
bops                MACs * b_w * b_a                             UNIQ (Baskin et al.), HAWQ-V3: MAC cost
                    unit: bit-operations                         scales with b_w * b_a
size                calls * ceil(params * b_w / 8)               memory-bound decode/GEMV: time is bytes
                    unit: weight bytes streamed                  streamed / bandwidth
measured            calls * seconds from a latency table         HAWQ-V3-style per-layer latency LUT,
                    unit: seconds                                measured on the target backend
=================== ============================================ ==========================================

A float tensor (bits ``None``) counts as 32 bits everywhere.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from lowbit.cost.layers import LayerInfo
from lowbit.errors import LowbitError
from lowbit.io import load_json
from lowbit.quant.bits import FLOAT_BITS, SUPPORTED_BITS

VALID_BITS = SUPPORTED_BITS  # the name cost code has always used; the widths are defined in lowbit.quant.bits


def effective_bits(bits: int | None) -> int:
    """Bits one value occupies: an int from ``SUPPORTED_BITS``, or :data:`FLOAT_BITS` for float (``None``)."""
    return FLOAT_BITS if bits is None else bits


def layer_bops(layer: LayerInfo, w_bits: int | None, a_bits: int | None) -> int:
    """Bit-operations per example, ``MACs * b_w * b_a`` (UNIQ, Baskin et al. 2018; HAWQ-V3)."""
    return layer.macs * effective_bits(w_bits) * effective_bits(a_bits)


def layer_weight_bytes(layer: LayerInfo, w_bits: int | None) -> int:
    """Bytes of the packed weight tensor, ``ceil(params * b_w / 8)``; bias and step sizes excluded."""
    return math.ceil(layer.params * effective_bits(w_bits) / 8)


class HardwareProfile(ABC):
    """A per-layer time model. Concrete profiles are final frozen dataclasses."""

    name: ClassVar[str]
    unit: ClassVar[str]

    @abstractmethod
    def layer_time(self, layer: LayerInfo, w_bits: int | None, a_bits: int | None) -> float:
        """Time of ``layer`` per example (all calls) at the given bits, in :attr:`unit`."""


@dataclass(frozen=True)
class BitsProportionalProfile(HardwareProfile):
    """time = MACs * c(max(b_w, b_a)), c(b) = b/4: a 2-bit layer runs 2x a 4-bit one, 8-bit at half speed.

    Source: the throughput model assumed for EAGL/ALPS (arXiv 2301.13330, IBM 8/4/2-bit hardware).
    The slower operand sets the pace, hence the max.
    """

    name: ClassVar[str] = "bits-proportional"
    unit: ClassVar[str] = "4-bit MAC times"

    def layer_time(self, layer: LayerInfo, w_bits: int | None, a_bits: int | None) -> float:
        return layer.macs * max(effective_bits(w_bits), effective_bits(a_bits)) / 4


@dataclass(frozen=True)
class BopsProfile(HardwareProfile):
    """time = MACs * b_w * b_a (UNIQ, Baskin et al. 2018; HAWQ-V3): a 2-bit layer costs 1/4 of a 4-bit one."""

    name: ClassVar[str] = "bops"
    unit: ClassVar[str] = "bit-operations"

    def layer_time(self, layer: LayerInfo, w_bits: int | None, a_bits: int | None) -> float:
        return layer_bops(layer, w_bits, a_bits)


@dataclass(frozen=True)
class SizeProfile(HardwareProfile):
    """time = calls * packed weight bytes: the memory-bound (decode/GEMV) model, time ~ bytes / bandwidth.

    Source: the weight-traffic proxy of performance notes §5; activation bits do not enter.
    """

    name: ClassVar[str] = "size"
    unit: ClassVar[str] = "weight bytes streamed"

    def layer_time(self, layer: LayerInfo, w_bits: int | None, a_bits: int | None) -> float:
        return layer.calls * layer_weight_bytes(layer, w_bits)


def latency_key(w_bits: int | None, a_bits: int | None) -> str:
    """Key of a latency-table entry: ``"4"`` when both operands share bits (``"32"`` = float), else
    ``"w4a8"``."""
    w, a = effective_bits(w_bits), effective_bits(a_bits)
    return str(w) if w == a else f"w{w}a{a}"


@dataclass(frozen=True)
class MeasuredProfile(HardwareProfile):
    """time = calls * seconds per call, read from a per-layer latency table (HAWQ-V3's latency LUT).

    Table format (JSON): ``{"layers": {name: {"4": seconds, "2": seconds, "w4a8": seconds, ...}}, ...}``;
    keys are given by :func:`latency_key`, other top-level fields (device, batch, ...) are ignored.
    """

    name: ClassVar[str] = "measured"
    unit: ClassVar[str] = "seconds"
    table: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    source: str = "latency table"

    @classmethod
    def from_dict(cls, data: object, source: str = "latency table") -> MeasuredProfile:
        layers = data.get("layers") if isinstance(data, dict) else None
        if not isinstance(layers, dict):
            raise LowbitError(f"{source}: expected an object with a 'layers' mapping of name -> "
                              "{bits: seconds}")
        for name, entry in layers.items():
            if not isinstance(entry, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in entry.values()
            ):
                raise LowbitError(f"{source}: layer {name!r} must map bits to non-negative seconds, "
                                  f"got {entry!r}")
        return cls(table={n: {str(k): float(v) for k, v in e.items()} for n, e in layers.items()},
                   source=source)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MeasuredProfile:
        return cls.from_dict(load_json(path), source=str(path))

    def layer_time(self, layer: LayerInfo, w_bits: int | None, a_bits: int | None) -> float:
        if layer.calls == 0:
            return 0.0
        entry = self.table.get(layer.name)
        if entry is None:
            raise LowbitError(f"{self.source}: no latency entry for layer {layer.name!r}; "
                              "re-run the benchmark on this model")
        key = latency_key(w_bits, a_bits)
        if key not in entry:
            raise LowbitError(f"{self.source}: layer {layer.name!r} has no latency for bits {key!r} "
                              f"(has: {', '.join(sorted(entry)) or 'none'})")
        return layer.calls * entry[key]


_PROFILES: dict[str, type[HardwareProfile]] = {
    p.name: p for p in (BitsProportionalProfile, BopsProfile, SizeProfile, MeasuredProfile)
}


def list_profiles() -> list[str]:
    return list(_PROFILES)


def get_profile(profile: str | HardwareProfile,
                latency_table: str | os.PathLike | Mapping | None = None) -> HardwareProfile:
    """Look up a profile by name; ``"measured"`` needs ``latency_table`` (a JSON path or a loaded dict)."""
    if isinstance(profile, HardwareProfile):
        return profile
    if profile not in _PROFILES:
        raise LowbitError(f"unknown hardware profile {profile!r}; valid: {', '.join(_PROFILES)}")
    if profile == MeasuredProfile.name:
        if latency_table is None:
            raise LowbitError("profile 'measured' needs a per-layer latency table (JSON from the benchmark)")
        if isinstance(latency_table, Mapping):
            return MeasuredProfile.from_dict(dict(latency_table))
        return MeasuredProfile.from_json(latency_table)
    if latency_table is not None:
        raise LowbitError(f"a latency table is read by the 'measured' cost model only, not {profile!r}; "
                          f"add --cost measured or drop the table")
    return _PROFILES[profile]()
