"""Precision plans: which bits each Conv2d/Linear layer gets, keyed by its ``named_modules()`` name."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lowbit import io
from lowbit.errors import LowbitError
from lowbit.quant.quantizers import SUPPORTED_BITS, check_bits

Bits = int | None
_PRESET = re.compile(r"w(\d+)a(\d+)")
_FLOAT_PRESETS = ("fp32", "float")


def is_quantizable(module: nn.Module) -> bool:
    """Conv2d and Linear layers, except MultiheadAttention's ``out_proj``: MHA reads its weight directly
    instead of calling it, so swapping that module would silently change nothing."""
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return False
    return isinstance(module, (nn.Conv2d, nn.Linear))


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of all quantizable layers (``nn.Conv2d``, ``nn.Linear``) in ``named_modules()`` order."""
    return [name for name, m in model.named_modules() if is_quantizable(m)]


def _check_bits_or_float(bits: Any, what: str) -> Bits:
    if bits is None:
        return None
    try:
        return check_bits(bits)
    except LowbitError:
        raise LowbitError(f"{what}: unsupported bits {bits!r}: choose one of "
                          f"{', '.join(map(str, SUPPORTED_BITS))} or null (float)") from None


def parse_bits(name: str) -> tuple[Bits, Bits]:
    """``"w4a4" -> (4, 4)``, ``"w4a8" -> (4, 8)``; ``32`` means float (``"w4a32" -> (4, None)``)."""
    m = _PRESET.fullmatch(str(name).strip().lower())
    if m is None:
        raise LowbitError(f"cannot read precision {name!r}: write it as w<bits>a<bits>, e.g. 'w4a4'")
    w, a = (None if int(b) == 32 else int(b) for b in m.groups())
    for bits in (w, a):
        if bits is not None and bits not in SUPPORTED_BITS:
            raise LowbitError(f"precision {name!r}: {bits}-bit is not supported; bits must be one of "
                              f"{', '.join(map(str, SUPPORTED_BITS))} (or 32 for float)")
    return w, a


@dataclass(frozen=True)
class Plan:
    """Per-layer precision: ``layers[name] = (w_bits, a_bits)``, each in {2, 3, 4, 8} or None (float).

    Layers not listed stay float. ``a_bits`` is the precision of the layer's *input* activation.
    Files look like ``{"layers": {"conv1": [8, 8], "layer1.0.conv1": [4, 4], "fc": [8, null]}}``.
    """

    layers: dict[str, tuple[Bits, Bits]] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.layers, Mapping):
            raise LowbitError(f"a plan's layers must be a mapping name -> [w_bits, a_bits], "
                              f"got {type(self.layers).__name__}")
        layers = {}
        for name, bits in self.layers.items():
            if isinstance(bits, Mapping) and set(bits) <= {"w_bits", "a_bits"}:
                bits = (bits.get("w_bits"), bits.get("a_bits"))
            if not isinstance(name, str) or not isinstance(bits, (tuple, list)) or len(bits) != 2:
                raise LowbitError(f"plan entry {name!r}: expected name -> [w_bits, a_bits], got {bits!r}")
            layers[name] = (_check_bits_or_float(bits[0], f"layer {name!r} w_bits"),
                            _check_bits_or_float(bits[1], f"layer {name!r} a_bits"))
        object.__setattr__(self, "layers", layers)

    def __hash__(self) -> int:  # plans can key dicts/sets (search caches); equality ignores order
        return hash(frozenset(self.layers.items()))

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, model: nn.Module, first_last_bits: int | None = 8) -> Plan:
        """Uniform plan ``"w{b}a{b}"`` / ``"w{bw}a{ba}"``, or ``"fp32"``/``"float"`` (everything float).

        The first and last quantizable layers get ``first_last_bits`` for weights and inputs (LSQ keeps
        them at 8-bit; None keeps them float). "First" and "last" are taken in ``named_modules()`` order,
        i.e. registration order: right for sequential CNNs, torchvision ResNets (conv1 ... fc) and
        transformers whose stem and head are registered first and last; check ``describe()`` otherwise.
        """
        names = quantizable_layers(model)
        if not names:
            raise LowbitError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
        if str(name).strip().lower() in _FLOAT_PRESETS:
            return cls({n: (None, None) for n in names})
        w, a = parse_bits(name)
        edge = _check_bits_or_float(first_last_bits, "first_last_bits")
        ends = {names[0], names[-1]}
        return cls({n: (edge, edge) if n in ends else (w, a) for n in names})

    def with_bits(self, name: str, w_bits: Bits, a_bits: Bits) -> Plan:
        """A copy with one layer's precision changed (plans are immutable)."""
        return Plan({**self.layers, name: (w_bits, a_bits)})

    # --- checks ----------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise one :class:`LowbitError` naming each listed layer that ``model`` lacks or cannot quantize."""
        modules = dict(model.named_modules())
        problems = []
        for name in self.layers:
            if name not in modules:
                close = difflib.get_close_matches(name, quantizable_layers(model), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                problems.append(f"unknown layer {name!r}{hint}")
            elif not is_quantizable(modules[name]):
                problems.append(f"layer {name!r} is a {type(modules[name]).__name__}, not a Conv2d or Linear")
        if problems:
            raise LowbitError(f"precision plan does not fit {type(model).__name__}: " + "; ".join(problems))

    # --- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"layers": {name: list(bits) for name, bits in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        if not isinstance(d, Mapping) or set(d) != {"layers"}:
            raise LowbitError("a precision plan must be a mapping with exactly one key 'layers' "
                              "(layer name -> [w_bits, a_bits])")
        return cls(d["layers"] or {})

    def save(self, path: str | Path) -> Path:
        """Write the plan atomically as YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
        path = Path(path)
        writer = {".json": io.save_json, ".yaml": io.save_yaml, ".yml": io.save_yaml}.get(path.suffix.lower())
        if writer is None:
            raise LowbitError(f"{path}: plan files must end in .yaml, .yml or .json")
        return writer(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        reader = {".json": io.load_json, ".yaml": io.load_yaml, ".yml": io.load_yaml}.get(path.suffix.lower())
        if reader is None:
            raise LowbitError(f"{path}: plan files must end in .yaml, .yml or .json")
        try:
            return cls.from_dict(reader(path))
        except LowbitError as e:
            if str(e).startswith(str(path)):
                raise
            raise LowbitError(f"{path}: {e}") from None

    # --- display ---------------------------------------------------------------------------------
    def describe(self) -> str:
        """A compact table: one row per layer, ``float`` for unquantized tensors."""
        width = max([len("layer"), *map(len, self.layers)])
        rows = [f"{'layer':<{width}}  w_bits  a_bits"]
        for name, (w, a) in self.layers.items():
            rows.append(f"{name:<{width}}  {_fmt(w):>6}  {_fmt(a):>6}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.describe()


def _fmt(bits: Bits) -> str:
    return "float" if bits is None else str(bits)


__all__ = ["Plan", "is_quantizable", "parse_bits", "quantizable_layers"]
