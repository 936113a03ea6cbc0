"""SensitivityTable: what every sensitivity method returns, one row per candidate layer.

A row holds the layer's score (higher = more sensitive = keep it at 4 bits), its MACs and weight count, and
method-specific fields (entropies, traces, fine-tuned accuracies). The table also records what the method
cost: wall time and the number of forward / backward / Hessian-vector passes (each one mini-batch through the
whole network) and of training epochs. Files are JSON, written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.io import load_json, save_json

TABLE_VERSION = 1
PASS_KEYS = ("forward", "backward", "hvp", "epochs")
_ROW_KEYS = ("layer", "score", "macs", "params")


def no_passes() -> dict[str, float]:
    """A zero cost: ``{"forward": 0, "backward": 0, "hvp": 0, "epochs": 0.0}``."""
    return {"forward": 0, "backward": 0, "hvp": 0, "epochs": 0.0}


def add_passes(*counts: Mapping[str, float]) -> dict[str, float]:
    """Sum pass counts key by key."""
    total = no_passes()
    for c in counts:
        for k in PASS_KEYS:
            total[k] += c.get(k, 0)
    return total


@dataclass(frozen=True)
class SensitivityRow:
    """One candidate layer: ``score`` (higher = more sensitive), ``macs`` per example (None if not profiled),
    ``params`` (weight elements) and method-specific ``extra`` fields."""

    layer: str
    score: float
    macs: int | None
    params: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "score": self.score, "macs": self.macs, "params": self.params, **self.extra}


@dataclass(frozen=True)
class SensitivityTable:
    """Scores of the candidate layers by one method, and what computing them cost.

    Attributes:
        method: ``"eagl"``, ``"alps"``, ``"hessian"`` or ``"random"``.
        rows: one :class:`SensitivityRow` per candidate, in the model's module order.
        wall_seconds: wall-clock time of the scoring call (MAC profiling, which every method shares, excluded).
        passes: ``{"forward", "backward", "hvp"}`` mini-batch passes and ``"epochs"`` of training spent.
        config: the method's settings (variant, tolerance, fine-tune recipe, seed ...), for reproduction.
    """

    method: str
    rows: tuple[SensitivityRow, ...]
    wall_seconds: float
    passes: dict[str, float] = field(default_factory=no_passes)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(self.rows))
        names = [r.layer for r in self.rows]
        if len(set(names)) != len(names):
            raise LowbitError(f"sensitivity table ({self.method}) lists a layer twice")
        bad = [r.layer for r in self.rows if not math.isfinite(r.score)]
        if bad:
            raise LowbitError(f"sensitivity table ({self.method}): non-finite score for {', '.join(bad[:3])}")
        object.__setattr__(self, "passes", {**no_passes(), **self.passes})

    @property
    def scores(self) -> dict[str, float]:
        """``{layer: score}`` in module order: the input of :func:`lowbit.search.select_plan`."""
        return {r.layer: r.score for r in self.rows}

    @property
    def layers(self) -> list[str]:
        return [r.layer for r in self.rows]

    def sorted_rows(self, descending: bool = True) -> list[SensitivityRow]:
        """Rows by score, most sensitive first (ties keep module order)."""
        return sorted(self.rows, key=lambda r: -r.score if descending else r.score)

    # --- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "method": self.method, "wall_seconds": self.wall_seconds,
                "passes": dict(self.passes), "config": dict(self.config),
                "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Any, source: str = "sensitivity table") -> SensitivityTable:
        if not isinstance(d, Mapping) or not isinstance(d.get("rows"), list) or "method" not in d:
            raise LowbitError(f"{source}: not a sensitivity table (needs 'method' and a list of 'rows')")
        if d.get("version") != TABLE_VERSION:
            raise LowbitError(f"{source}: table version {d.get('version')!r} is not supported "
                              f"(this lowbit reads version {TABLE_VERSION})")
        rows = []
        for r in d["rows"]:
            if not isinstance(r, Mapping) or not set(_ROW_KEYS) <= set(r):
                raise LowbitError(f"{source}: every row needs {', '.join(_ROW_KEYS)}; got {r!r}"[:300])
            if isinstance(r["score"], bool) or not isinstance(r["score"], (int, float)):
                raise LowbitError(f"{source}: layer {r['layer']!r} has a non-numeric score {r['score']!r}")
            rows.append(SensitivityRow(str(r["layer"]), float(r["score"]), r["macs"], int(r["params"]),
                                       {k: v for k, v in r.items() if k not in _ROW_KEYS}))
        return cls(str(d["method"]), tuple(rows), float(d.get("wall_seconds", 0.0)),
                   dict(d.get("passes") or {}), dict(d.get("config") or {}))

    def save(self, path: str | Path) -> Path:
        return save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        path = Path(path)
        if path.is_dir():
            path = path / "sensitivity.json"
        return cls.from_dict(load_json(path), source=str(path))

    # --- display ---------------------------------------------------------------------------------
    def render(self) -> str:
        """The table sorted by score, most sensitive first, with each layer's share of the candidates' MACs."""
        total = sum(r.macs or 0 for r in self.rows)
        extras = list(dict.fromkeys(k for r in self.rows for k, v in r.extra.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)))
        head = ["rank", "layer", "score", "MACs", "MAC share", "params", *extras]
        body = []
        for i, r in enumerate(self.sorted_rows(), 1):
            share = f"{100 * r.macs / total:.1f}%" if total and r.macs is not None else "-"
            body.append([str(i), r.layer, f"{r.score:.6g}", "-" if r.macs is None else f"{r.macs:,}", share,
                         f"{r.params:,}", *(_fmt(r.extra.get(k)) for k in extras)])
        widths = [max(len(h), *(len(row[j]) for row in body)) if body else len(h) for j, h in enumerate(head)]
        lines = [self.summary(), "  ".join(h.ljust(w) if j == 1 else h.rjust(w)
                                          for j, (h, w) in enumerate(zip(head, widths)))]
        lines += ["  ".join(c.ljust(w) if j == 1 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
                  for row in body]
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: method, variant, number of layers, time and passes."""
        variant = self.config.get("variant")
        p = self.passes
        return (f"{self.method}{f' ({variant})' if variant else ''}: {len(self.rows)} candidate layers, "
                f"{self.wall_seconds:.3g} s; passes: forward {p['forward']}, backward {p['backward']}, "
                f"hvp {p['hvp']}, epochs {p['epochs']:.3g}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


__all__ = ["PASS_KEYS", "SensitivityRow", "SensitivityTable", "add_passes", "no_passes"]
