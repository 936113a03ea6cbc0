"""Precision plans: which bits each Conv2d/Linear layer gets, keyed by its ``named_modules()`` name.

:class:`Plan` is the one plan type from the CLI through the cost model and the solver to the exporter; other
packages accept a mapping and convert it with :meth:`Plan.coerce`, so every plan passes one validator.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lowbit import io
from lowbit.errors import LowbitError
from lowbit.quant.bits import FLOAT_BITS, SUPPORTED_BITS, Bits, check_bits
from lowbit.quant.modules import QuantAct, QuantMatmul

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


class _LayerTracer(fx.Tracer):
    """Keeps quantizable layers (QuantConv2d/QuantLinear included) as single calls, so their order shows, and
    the other quantized modules too (their quantizers' forward cannot be traced)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        quantized = isinstance(m, (QuantAct, QuantMatmul))
        return is_quantizable(m) or quantized or super().is_leaf_module(m, module_qualified_name)


def execution_order(model: nn.Module, example_input: Any = None) -> list[str] | None:
    """Quantizable layers in the order a forward pass first calls them (never-called ones left out).

    With ``example_input`` the forward pass runs (:func:`lowbit.cost.profile_layers`); without, the order is
    read from ``torch.fx`` symbolic tracing, which needs no input. Returns None when the model cannot be
    traced (data-dependent control flow), so the caller decides what to fall back to.
    """
    if example_input is not None:
        from lowbit.cost.layers import profile_layers  # lazy: lowbit.cost imports this module

        names = set(quantizable_layers(model))
        return [li.name for li in profile_layers(model, example_input) if li.calls and li.name in names]
    if is_quantizable(model):  # fx traces into the root's forward, so a lone layer shows no call
        return [""]
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # fx fails with many types (TraceError, TypeError, ...) on forwards it cannot follow
        return None
    modules = dict(model.named_modules())
    called = (node.target for node in graph.nodes if node.op == "call_module")
    return list(dict.fromkeys(t for t in called if t in modules and is_quantizable(modules[t])))


# Child names of the query/key/value projections of an attention block (BERT, RoBERTa; LLaMA-style; DistilBERT).
_QKV_NAMES = frozenset({"query", "key", "value", "q_proj", "k_proj", "v_proj", "q_lin", "k_lin", "v_lin"})
ROLE_MODES = ("auto", "transformer", "order")
ROLES = ("embedding", "body", "head", "edge")


def is_attention(module: nn.Module) -> bool:
    """A self-attention block: at least two of its direct children are Linear query/key/value projections."""
    children = dict(module.named_children())
    hits = [n for n in _QKV_NAMES if isinstance(children.get(n), nn.Linear)]
    return len(hits) >= 2


def block_stacks(model: nn.Module) -> list[str]:
    """Names of the ModuleLists that hold the transformer blocks (those with an attention block inside)."""
    stacks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and any(is_attention(sub) for sub in m.modules()):
            if not any(name.startswith(s + ".") for s in stacks):  # the outermost list only
                stacks.append(name)
    return stacks


def is_transformer(model: nn.Module) -> bool:
    """Whether presets go by role: the model has a stack of blocks with attention (Hugging Face encoders)."""
    return bool(block_stacks(model))


def layer_roles(model: nn.Module, mode: str = "auto", example_input: Any = None) -> dict[str, str]:
    """The role of every quantizable layer, which is what presets give bits by.

    ``transformer``: ``embedding`` (under a module whose name holds "embed"), ``body`` (inside the block stack:
    Q, K, V, attention output, FFN) and ``head`` (everything else: pooler, classifier, LM head). ``order``:
    ``edge`` for the first and last executed layers (:func:`edge_layers`), ``body`` for the rest. ``auto`` picks
    ``transformer`` when :func:`is_transformer`, else ``order``.
    """
    if mode not in ROLE_MODES:
        raise LowbitError(f"unknown roles {mode!r}: choose one of {', '.join(ROLE_MODES)}")
    names = quantizable_layers(model)
    if mode == "auto":
        mode = "transformer" if is_transformer(model) else "order"
    if mode == "order":
        ends = set(edge_layers(model, example_input)) if names else set()
        return {n: "edge" if n in ends else "body" for n in names}
    stacks = block_stacks(model)
    if not stacks:
        raise LowbitError(f"{type(model).__name__} has no stack of attention blocks: use roles='order'")
    roles = {}
    for n in names:
        if any("embed" in part for part in n.split(".")):
            roles[n] = "embedding"
        elif any(n.startswith(s + ".") for s in stacks):
            roles[n] = "body"
        else:
            roles[n] = "head"
    return roles


def first_and_last(order: Sequence[str]) -> tuple[str, ...]:
    """The first and last of an execution order (one name for a one-layer model, none for an empty order)."""
    return tuple(dict.fromkeys([*order[:1], *order[-1:]]))


def edge_layers(model: nn.Module, example_input: Any = None) -> tuple[str, ...]:
    """The first and last *executed* quantizable layers: the stem and head that presets keep at 8 bits.

    Execution order, not registration order: a model that registers its head before its stem still gets
    the stem and the head. When the forward pass cannot be traced without an input, registration order is
    the fallback, with a warning that says to pass ``example_input``.
    """
    order = execution_order(model, example_input)
    if not order:
        order = quantizable_layers(model)
        if order:
            warnings.warn(f"{type(model).__name__}: cannot trace the forward pass to find the first and last "
                          f"executed layers; using registration order ({order[0]}, {order[-1]}). Pass "
                          "example_input to be sure.", stacklevel=2)
    return first_and_last(order)


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
    w, a = (None if int(b) == FLOAT_BITS else int(b) for b in m.groups())
    for bits in (w, a):
        if bits is not None and bits not in SUPPORTED_BITS:
            raise LowbitError(f"precision {name!r}: {bits}-bit is not supported; bits must be one of "
                              f"{', '.join(map(str, SUPPORTED_BITS))} (or {FLOAT_BITS} for float)")
    return w, a


@dataclass(frozen=True)
class Plan:
    """Per-layer precision: ``layers[name] = (w_bits, a_bits)``, each from ``SUPPORTED_BITS`` or None (float).

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
    def coerce(cls, plan: Plan | Mapping | Any) -> Plan:
        """The one conversion into a Plan: a Plan as is, a mapping ``name -> (w_bits, a_bits)``, the file form
        ``{"layers": {...}}``, or any object with a ``.layers`` mapping; every entry goes through the validator.
        """
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, Mapping):
            if set(plan) == {"layers"} and isinstance(plan["layers"], Mapping):
                return cls.from_dict(plan)
            return cls(plan)
        layers = getattr(plan, "layers", None)
        if isinstance(layers, Mapping):
            return cls(layers)
        raise LowbitError(f"a plan must map layer names to (w_bits, a_bits), got {type(plan).__name__}")

    @classmethod
    def preset(cls, name: str, model: nn.Module, first_last_bits: int | None = 8, *,
               example_input: Any = None, roles: str = "auto") -> Plan:
        """Uniform plan ``"w{b}a{b}"`` / ``"w{bw}a{ba}"``, or ``"fp32"``/``"float"`` (everything float).

        Bits go by role (:func:`layer_roles`). CNNs and MLPs (``order``): the first and last *executed*
        quantizable layers (:func:`edge_layers`) get ``first_last_bits`` for weights and inputs, as LSQ and
        EAGL/ALPS keep the stem and the classifier at 8 bits; None keeps them float. Transformers: embeddings
        stay float, the head (pooler, classifier) gets ``first_last_bits``, every layer of the blocks the preset's
        bits; module order means nothing there (BERT registers its pooler after the blocks, unused or not).
        ``example_input`` runs the model: edge layers come from that run instead of ``torch.fx``, and a
        transformer's layers that never ran (an unused pooler) stay float, since they could not be calibrated.
        """
        names = quantizable_layers(model)
        if not names:
            raise LowbitError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
        if str(name).strip().lower() in _FLOAT_PRESETS:
            return cls({n: (None, None) for n in names})
        by_role = layer_roles(model, roles, example_input)
        if "edge" in by_role.values() or all(r == "body" for r in by_role.values()):
            return cls.uniform(name, names, [n for n, r in by_role.items() if r == "edge"], first_last_bits)
        w, a = parse_bits(name)
        edge = _check_bits_or_float(first_last_bits, "first_last_bits")
        bits = {"embedding": (None, None), "head": (edge, edge), "body": (w, a)}
        plan = {n: bits[r] for n, r in by_role.items()}
        if example_input is not None:
            ran = set(execution_order(model, example_input) or names)
            plan = {n: b if n in ran else (None, None) for n, b in plan.items()}
        return cls(plan)

    @classmethod
    def uniform(cls, name: str, layers: Iterable[str], edges: Iterable[str] = (),
                edge_bits: int | None = 8) -> Plan:
        """The preset rule on named layers: each at ``name``'s bits (``"w4a4"``), ``edges`` at ``edge_bits``.

        :meth:`preset` and :func:`lowbit.cost.w4a4_reference_plan` both build their plans here.
        """
        w, a = parse_bits(name)
        edge = _check_bits_or_float(edge_bits, "first_last_bits")
        ends = set(edges)
        return cls({n: (edge, edge) if n in ends else (w, a) for n in layers})

    def with_bits(self, name: str, w_bits: Bits, a_bits: Bits) -> Plan:
        """A copy with one layer's precision changed (plans are immutable)."""
        return Plan({**self.layers, name: (w_bits, a_bits)})

    # --- checks ----------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise one :class:`LowbitError` naming each listed layer that ``model`` lacks or cannot quantize."""
        modules = dict(model.named_modules())
        quantizable = quantizable_layers(model)
        problems = []
        for name in self.layers:
            if name not in modules:
                problems.append(_unknown(name, quantizable))
            elif not is_quantizable(modules[name]):
                problems.append(f"layer {name!r} is a {type(modules[name]).__name__}, not a Conv2d or Linear")
        if problems:
            raise LowbitError(f"precision plan does not fit {type(model).__name__}: " + "; ".join(problems))

    def check_names(self, known: Iterable[str], what: str) -> None:
        """Like :meth:`validate` against a list of layer names (e.g. profiled layers) instead of a model."""
        known = list(known)
        names = set(known)
        problems = [_unknown(name, known) for name in self.layers if name not in names]
        if problems:
            more = [f"and {len(problems) - 3} more"] if len(problems) > 3 else []
            raise LowbitError(f"precision plan does not fit {what}: " + "; ".join(problems[:3] + more))

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


def _unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f"unknown layer {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")


__all__ = ["ROLES", "ROLE_MODES", "Bits", "Plan", "block_stacks", "edge_layers", "execution_order", "first_and_last",
           "is_attention", "is_quantizable", "is_transformer", "layer_roles", "parse_bits", "quantizable_layers"]
