"""Encoder export: a quantized transformer encoder (Hugging Face BERT-style) as integer GEMMs with float glue.

    lowered = lower_encoder(model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    write_model("bert.lowbit", lowered.manifest(), lowered.program.tensors)

**Capture.** ``torch.export`` (non-strict, the batch dimension dynamic) traces the eval-mode model called with
its token tensors; ``transformers.utils.fx`` no longer exists in transformers 5. Before tracing, every
:class:`~lowbit.quant.modules.QuantLinear` and :class:`~lowbit.quant.modules.QuantMatmul` is made opaque: its
forward calls a capture op (``lowbit_capture::qlinear(x, name)`` / ``qmatmul(a, b, name)``), so the ATen graph
holds one node per quantized layer, named, with everything else (embeddings, LayerNorm, the attention-mask
arithmetic, softmax, GELU, reshapes) as ATen operators. The traced program is run on the example to record
every value.

**Mapping.** Graph values fall in three groups:

* *constants*: values that depend on no input (position embeddings of the position-id buffer): folded into a
  stored float32 ``constant`` node;
* *the attention mask*: values computed from ``attention_mask`` alone (transformers 5 builds the additive mask
  from ``arange``, ``index`` and ``where``): each one the rest of the graph reads must equal ``where(mask != 0,
  0, fill)`` broadcast to ``(N, 1, 1, T)`` or ``(N, 1, T, T)``, checked on the example and on random masks, and
  becomes one ``attention_mask`` node; any other use of the mask is refused;
* *the main path*: one IR node per ATen operator (op table, :mod:`lowbit.ir.ops`), marked float or integer.

**Integer nodes.** A quantized Linear is ``quantize`` (float to its input quantizer's codes, the quantizer's
own float32 formula) -> ``linear`` on codes (exact integer products) with a per-channel dyadic
requantization -> ``dequantize`` to float32. A quantized matmul is two ``quantize`` and one ``matmul``. As in
the CNN lowering, a producer whose every reader (after reshapes and transposes) is a quantized layer with the
same input quantizer requantizes straight into those codes with one rounding: Q, K and V go straight to the
codes of the attention matmuls, the attention output straight to the codes of its projection. Other outputs
are wide int32 values at a power-of-two scale ``2^e >= bound * 2^-30`` (``bound``: the largest |output| the
layer's code ranges allow), which ``dequantize`` turns into float32 with one rounding. The multiplier has
``min(31, 52 - log2(max |acc|))`` bits (28 or more for every accumulator below 2^24), so that a backend can
requantize exactly in float64; its relative error stays below 2^-28, far inside float32's 2^-24.

Float glue (LayerNorm, softmax, GELU, tanh, embeddings, adds, the mask) is computed by the reference backend
with the same ATen operators in float32, so the values reaching each ``quantize`` node are bit-identical to a
replay of the traced program with the same integer arithmetic (:class:`~lowbit.export.simulate.EncoderSimulation`);
against the fake-quant model, which computes each layer in float32 arithmetic, codes differ only where
float rounding crosses a rounding tie (measured by :func:`lowbit.deploy.verify.encoder_code_agreement`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lowbit.errors import LowbitError, first_line
from lowbit.export.capture import where
from lowbit.export.lower import Rep, Requant
from lowbit.ir.dyadic import INT32_MAX, INT32_MIN, to_dyadic, to_fixed
from lowbit.ir.format import FORMAT_NAME, TOKEN_FORMAT_VERSION, pack_tensor
from lowbit.ir.graph import Node
from lowbit.ir.ops import op_spec
from lowbit.quant.modules import QuantConv2d, QuantLinear, QuantMatmul

MASK_INPUT = "attention_mask"
WIDE_BITS = 30  # a wide output keeps |value| <= 2^30 for the largest output its code ranges allow
aten = torch.ops.aten

# --------------------------------------------------------------------------------------------- capture ops
_ACTIVE: dict[str, nn.Module] = {}  # name -> quantized module, while a capture runs


@torch.library.custom_op("lowbit_capture::qlinear", mutates_args=())
def _qlinear(x: torch.Tensor, name: str) -> torch.Tensor:
    m = _ACTIVE[name]
    return type(m).forward(m, x)  # the class's forward: the instance's one calls this op


@_qlinear.register_fake
def _(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _ACTIVE[name].out_features))


@torch.library.custom_op("lowbit_capture::qmatmul", mutates_args=())
def _qmatmul(a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
    m = _ACTIVE[name]
    return type(m).forward(m, a, b)


@_qmatmul.register_fake
def _(a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
    return torch.matmul(a, b)


QLINEAR, QMATMUL = torch.ops.lowbit_capture.qlinear.default, torch.ops.lowbit_capture.qmatmul.default


@contextlib.contextmanager
def opaque_quantized(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Within the block, every QuantLinear / QuantMatmul of ``model`` calls its capture op (one graph node)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            raise LowbitError(f"layer {name!r} is a quantized Conv2d; the encoder export takes Linear layers and "
                              f"attention matmuls")
        if isinstance(m, QuantLinear):
            m.forward = (lambda n: lambda x: _qlinear(x, n))(name)
        elif isinstance(m, QuantMatmul):
            m.forward = (lambda n: lambda a, b: _qmatmul(a, b, n))(name)
        else:
            continue
        found[name] = m
    try:
        with active(found):
            yield found
    finally:
        for m in found.values():
            del m.forward  # back to the class's forward


@contextlib.contextmanager
def active(modules: dict[str, nn.Module]) -> Iterator[None]:
    """Within the block, the capture ops run ``modules`` (by name): to run a captured program."""
    saved = dict(_ACTIVE)
    _ACTIVE.clear()
    _ACTIVE.update(modules)
    try:
        yield
    finally:
        _ACTIVE.clear()
        _ACTIVE.update(saved)


# ----------------------------------------------------------------------------------------------- capture
@dataclass
class EncoderCapture:
    """The traced program (``gm``), its values on the example, and the quantized modules by name."""

    gm: fx.GraphModule
    values: dict[str, Any]
    modules: dict[str, nn.Module]
    example: dict[str, torch.Tensor]
    inputs: list[str]


class _Record(fx.Interpreter):
    """Runs the traced program, keeping every node's value (``skip`` guard modules)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and n.target.startswith("_guards"):
            return None
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def capture_encoder(model: nn.Module, example: Mapping[str, torch.Tensor]) -> EncoderCapture:
    """Trace ``model(**example)`` with ``torch.export`` (non-strict, dynamic batch) and record its values."""
    model.eval()
    example = {k: v for k, v in example.items() if isinstance(v, torch.Tensor) and k not in ("labels", "label")}
    if not example:
        raise LowbitError("the encoder export needs an example batch of token tensors (input_ids, ...)")
    if any(v.shape[0] < 2 for v in example.values()):  # a batch of one would be specialised by torch.export
        example = {k: torch.cat([v, v]) for k, v in example.items()}
    batch = torch.export.Dim("batch", min=1)
    with opaque_quantized(model) as modules, torch.no_grad():
        try:
            ep = torch.export.export(model, (), kwargs=dict(example), strict=False,
                                     dynamic_shapes={k: {0: batch} for k in example})
        except Exception as e:  # torch.export raises many types; one line for the user
            raise LowbitError(f"cannot capture {type(model).__name__} with torch.export (non-strict): "
                              f"{first_line(e)}") from None
        gm = ep.module()
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        rec = _Record(gm)
        rec.run(*[example[k] for k in names])
    return EncoderCapture(gm, rec.values, modules, dict(example), names)


# ---------------------------------------------------------------------------------------------- lowering
@dataclass
class Val:
    """An IR value: its name, ``"int"`` or ``"float"``, and for codes their representation."""

    name: str
    domain: str
    rep: Rep | None = None


@dataclass
class QStep:
    """What one quantized module became, for the simulation and the checks: the IR values feeding it (one per
    operand), its requantization and where its output went (``"codes"``, ``"wide"`` or ``"logits"``)."""

    module: nn.Module
    kind: str  # "linear" | "matmul"
    inputs: list[str]
    input_reps: list[Rep]
    quantized: list[bool]  # operand quantized here (True) or arriving as codes from its producer (False)
    requant: Requant
    out: str
    out_scale: float
    node: str


@dataclass
class EncoderProgram:
    """The lowered encoder: IR nodes and tensors, plus per quantized module its :class:`QStep`."""

    graph: list[Node] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[str, QStep] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LoweredEncoder:
    """A captured and lowered encoder, before writing."""

    model: nn.Module
    capture: EncoderCapture
    program: EncoderProgram
    input: dict[str, Any]

    def manifest(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": TOKEN_FORMAT_VERSION, "inputs": list(self.capture.inputs),
                "outputs": ["logits"], "graph": [n.to_json() for n in self.program.graph],
                "tensors": self.program.entries, "input": self.input, "rounding": "half_to_even",
                "tracer": "torch.export (non-strict)", "layers": self.program.layers, **(extra or {})}


def lower_encoder(model: nn.Module, example: Mapping[str, torch.Tensor]) -> LoweredEncoder:
    """Capture and lower ``model`` (quantized, calibrated, eval mode) for token inputs shaped like ``example``."""
    cap = capture_encoder(model, example)
    shapes = {tuple(v.shape[1:]) for v in cap.example.values()}
    if len(shapes) != 1 or any(v.dtype.is_floating_point for v in cap.example.values()):
        raise LowbitError("the encoder export takes integer token tensors of one shape (N, T), got "
                          + ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in cap.example.items()))
    program = _Lowering(cap).run()
    spec = {"dtype": "int64", "shape": list(next(iter(shapes)))}
    return LoweredEncoder(model, cap, program, spec)


def _rep(q: nn.Module) -> Rep:
    return Rep(float(q.scale), -q.q_n, q.q_p, q.bits)


def _describe(n: fx.Node) -> str:
    return f"operation {getattr(n.target, '__name__', str(n.target))} ({n.name!r})"


# Ops that move or select values (codes keep their representation through them).
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints}
_IDENTITY = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
             aten.dropout.default, aten.lift_fresh_copy.default}
_MOVES = _RESHAPES | _IDENTITY | {aten.transpose.int, aten.select.int, aten.slice.Tensor, aten.permute.default}
_IGNORED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default}
_BINARY = {aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul", aten.div.Tensor: "div"}
_FLOAT_SAME = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device}
_SUPPORTED = ("quantized Linear layers and attention matmuls, embeddings, LayerNorm, softmax, GELU, tanh, float "
              "Linear, add/sub/mul/div, the attention mask, view/reshape/transpose/select/slice, dropout in eval mode")


class _Lowering:
    def __init__(self, cap: EncoderCapture):
        self.cap = cap
        self.p = EncoderProgram()
        self.env: dict[str, Val] = {}
        self.nodes = list(cap.gm.graph.nodes)
        self.users = {n.name: list(n.users) for n in self.nodes}
        self.deps = self._deps()
        self.consts: dict[str, str] = {}
        self.codes: dict[tuple[str, Rep], Val] = {}
        self.masks: dict[tuple[float, bool], str] = {}
        self.replays: dict[bytes, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------ classification
    def _deps(self) -> dict[str, frozenset[str]]:
        """The inputs each node's *data* depends on (sizes read with ``x.size()`` are shapes, not data)."""
        deps: dict[str, frozenset[str]] = {}
        for n in self.nodes:
            if n.op == "placeholder":
                deps[n.name] = frozenset([n.name])
            elif not _holds_tensor(self.cap.values.get(n.name)):
                deps[n.name] = frozenset()  # sizes (x.size(0)) and guards: shapes, not data
            else:
                found: set[str] = set()
                for a in _flat_nodes((n.args, n.kwargs)):
                    found |= deps.get(a.name, frozenset())
                deps[n.name] = frozenset(found)
        return deps

    def kind(self, a: fx.Node) -> str:
        d = self.deps[a.name]
        if not d:
            return "const"
        if d == {MASK_INPUT} and a.op != "placeholder":
            return "mask"
        return "main"

    # -------------------------------------------------------------------------------------------- walk
    def run(self) -> EncoderProgram:
        for n in self.nodes:
            if n.op == "placeholder":
                self.env[n.name] = Val(n.name, "int")
            elif n.op == "output":
                self._output(n)
            elif n.op == "call_function" and n.target not in _IGNORED and self.kind(n) == "main" \
                    and self.users[n.name]:  # constants and the mask are emitted where they are read
                try:
                    if not isinstance(self.cap.values.get(n.name), torch.Tensor):
                        raise LowbitError(f"{_describe(n)} gives several values; not supported by the encoder "
                                          f"export (it supports {_SUPPORTED})")
                    self.env[n.name] = self._map(n)
                except LowbitError as e:
                    raise LowbitError(f"{e}{where(n)}") from None
        return self.p

    def _map(self, n: fx.Node) -> Val:
        t = n.target
        shape = self._shape(n)
        if t is QLINEAR:
            return self._qlinear(n)
        if t is QMATMUL:
            return self._qmatmul(n)
        if t in _IDENTITY or (t in _FLOAT_SAME and self._same_dtype(n)):
            if t is aten.dropout.default and len(n.args) > 2 and n.args[2]:
                raise LowbitError(f"{_describe(n)}: dropout in training mode; export the model in eval mode")
            return self.value(n.args[0], n)
        if t in _RESHAPES:
            x = self.value(n.args[0], n)
            if self._shape(n.args[0]) == shape:
                return x
            return self.emit("reshape", n.name, [x], {"shape": shape}, same=x)
        if t is aten.transpose.int:
            x = self.value(n.args[0], n)
            dims = {"dim0": self._dim(n, n.args[1]), "dim1": self._dim(n, n.args[2])}
            return self.emit("transpose", n.name, [x], dims, same=x)
        if t is aten.permute.default:
            return self._permute(n)
        if t is aten.select.int:
            x = self.value(n.args[0], n)
            return self.emit("select", n.name, [x], {"dim": self._dim(n, n.args[1]), "index": int(n.args[2])}, same=x)
        if t is aten.slice.Tensor:
            return self._slice(n)
        if t in _BINARY:
            return self._binary(n, _BINARY[t])
        if t is aten.embedding.default:
            w = self._const_tensor(n.args[0], n, "embedding weight")
            ids = self.value(n.args[1], n)
            return self.emit("embedding", n.name, [ids], {}, params={"weight": _float_entry(w)})
        if t is aten.layer_norm.default:
            x = self.value(n.args[0], n)
            w, b = (self._const_tensor(a, n, what) if a is not None else None
                    for a, what in ((_arg(n, 2, "weight"), "weight"), (_arg(n, 3, "bias"), "bias")))
            size = list(_arg(n, 1, "normalized_shape"))
            w = torch.ones(size) if w is None else w
            b = torch.zeros(size) if b is None else b
            eps = float(_arg(n, 4, "eps", 1e-5))
            return self.emit("layer_norm", n.name, [x], {"eps": eps},
                             params={"weight": _float_entry(w), "bias": _float_entry(b)})
        if t in (aten.softmax.int, aten._softmax.default):
            if t is aten.softmax.int and _arg(n, 2, "dtype") is not None:
                raise LowbitError(f"{_describe(n)}: softmax with a dtype is not supported")
            x = self.value(n.args[0], n)
            return self.emit("softmax", n.name, [x], {"dim": int(n.args[1])})
        if t is aten.gelu.default:
            x = self.value(n.args[0], n)
            return self.emit("gelu", n.name, [x], {"approximate": str(n.kwargs.get("approximate", "none"))})
        if t is aten.tanh.default:
            return self.emit("tanh", n.name, [self.value(n.args[0], n)], {})
        if t is aten.linear.default:
            x = self.value(n.args[0], n)
            params = {"weight": _float_entry(self._const_tensor(n.args[1], n, "weight"))}
            if _arg(n, 2, "bias") is not None:
                params["bias"] = _float_entry(self._const_tensor(n.args[2], n, "bias"))
            return self.emit("float_linear", n.name, [x], {}, params=params)
        if t in (aten.matmul.default, aten.bmm.default):
            a, b = self.value(n.args[0], n), self.value(n.args[1], n)
            return self.emit("float_matmul", n.name, [a, b], {})
        raise LowbitError(f"{_describe(n)} is not supported by the encoder export (it supports {_SUPPORTED})")

    # --------------------------------------------------------------------------------------- operands
    def value(self, a: Any, n: fx.Node) -> Val:
        """The IR value of fx argument ``a`` of node ``n``: a main-path value, a folded constant or the mask."""
        if not isinstance(a, fx.Node) or not isinstance(self.cap.values.get(a.name), torch.Tensor):
            raise LowbitError(f"{_describe(n)}: expected a tensor argument, got {a!r}")
        k = self.kind(a)
        if k == "main":
            if a.name not in self.env:
                raise LowbitError(f"{_describe(n)} reads {a.name!r}, which the export could not map")
            return self.env[a.name]
        if k == "mask":
            return self._mask(a, n)
        return self._constant(a, n)

    def _constant(self, a: fx.Node, n: fx.Node) -> Val:
        if a.name not in self.consts:
            v = self.cap.values[a.name]
            if any(not isinstance(d, int) for d in a.meta["val"].shape):
                raise LowbitError(f"{_describe(n)} reads {a.name!r}, a tensor sized by the batch but computed from no "
                                  f"input")
            if not v.dtype.is_floating_point:
                raise LowbitError(f"{_describe(n)} reads an integer tensor computed from constants ({a.name!r}); only "
                                  f"float constants are supported")
            rank = len(self._shape(n)) + 1
            v = v.detach().to(torch.float32)
            while v.dim() < rank:
                v = v.unsqueeze(0)
            if v.shape[0] != 1:
                raise LowbitError(f"{_describe(n)} reads a constant {list(v.shape)} whose first dimension is not the "
                                  f"batch")
            self.consts[a.name] = self.emit("constant", f"const.{a.name}", [], {},
                                            params={"value": _float_entry(v)}).name
        return Val(self.consts[a.name], "float")

    def _const_tensor(self, a: Any, n: fx.Node, what: str) -> torch.Tensor:
        if not isinstance(a, fx.Node) or self.kind(a) != "const":
            raise LowbitError(f"{_describe(n)}: its {what} must be a fixed tensor (a parameter)")
        return self.cap.values[a.name].detach().to(torch.float32)

    def _mask(self, a: fx.Node, n: fx.Node) -> Val:
        """The additive attention mask ``a`` (computed from ``attention_mask`` alone), recognised by its values on
        the example and on probe masks (random keep/drop patterns, right padding)."""
        masks = [self.cap.example[MASK_INPUT], *_probe_masks(self.cap.example[MASK_INPUT])]
        got = [self.cap.values[a.name], *(self._replay(m).get(a.name) for m in masks[1:])]
        v = got[0]
        ok = v.dtype == torch.float32 and v.dim() == 4 and v.shape[1] == 1 and v.shape[2] in (1, v.shape[3])
        if ok:
            square = v.shape[2] != 1
            fill = float(torch.cat([g.reshape(-1) for g in got]).min())
            ok = fill < 0 and all(g is not None and torch.equal(g, additive_mask(m, fill, square))
                                  for g, m in zip(got, masks))
        if not ok:
            raise LowbitError(f"{_describe(n)} reads {a.name!r}, a value computed from {MASK_INPUT} that is not the "
                              f"additive attention mask where(mask != 0, 0, fill) broadcast over heads and queries; "
                              f"other uses of the mask are not supported")
        key = (fill, square)
        if key not in self.masks:
            name = f"{MASK_INPUT}.additive" + (f"#{len(self.masks)}" if self.masks else "")
            self.masks[key] = self.emit("attention_mask", name, [self.env[MASK_INPUT]],
                                        {"fill": fill, "square": square}).name
        return Val(self.masks[key], "float")

    def _replay(self, mask: torch.Tensor) -> dict[str, Any]:
        """Every value of the traced program run on the example with ``mask`` as its attention mask."""
        key = mask.numpy().tobytes()
        if key not in self.replays:
            ex = {**self.cap.example, MASK_INPUT: mask}
            rec = _Record(self.cap.gm)
            with active(self.cap.modules), torch.no_grad():
                rec.run(*[ex[k] for k in self.cap.inputs])
            self.replays[key] = rec.values
        return self.replays[key]

    # ------------------------------------------------------------------------------------- float nodes
    def _binary(self, n: fx.Node, fn: str) -> Val:
        if n.kwargs.get("alpha", 1) != 1:
            raise LowbitError(f"{_describe(n)}: add/sub with alpha is not supported")
        a, b = n.args[0], n.args[1]
        tensors = [isinstance(x, fx.Node) and isinstance(self.cap.values.get(x.name), torch.Tensor) for x in (a, b)]
        if all(tensors):
            va, vb = self.value(a, n), self.value(b, n)
            self._float(n, va, vb)
            return self.emit("binary", n.name, [va, vb], {"fn": fn})
        if tensors[0] and isinstance(b, (int, float)) and not isinstance(b, bool):
            va = self.value(a, n)
            self._float(n, va)
            return self.emit("binary", n.name, [va], {"fn": fn, "scalar": float(b)})
        raise LowbitError(f"{_describe(n)}: only tensor-tensor and tensor-number arithmetic is supported")

    def _float(self, n: fx.Node, *vals: Val) -> None:
        for v in vals:
            if v.domain != "float":
                raise LowbitError(f"{_describe(n)}: float arithmetic on integer values ({v.name!r}) is not supported")

    def _permute(self, n: fx.Node) -> Val:
        x = self.value(n.args[0], n)
        rank = len(self._shape(n.args[0])) + 1
        dims = [int(d) % rank for d in n.args[1]]
        if dims[0] != 0:
            raise LowbitError(f"{_describe(n)} moves the batch dimension")
        order, out = list(range(rank)), x
        for i in range(1, rank):  # the permutation as transposes (selection sort)
            j = order.index(dims[i])
            if j != i:
                order[i], order[j] = order[j], order[i]
                out = self.emit("transpose", f"{n.name}.{i}", [out], {"dim0": i, "dim1": j}, same=x)
        return out

    def _slice(self, n: fx.Node) -> Val:
        x = self.value(n.args[0], n)
        src = self._shape(n.args[0])
        d = int(_arg(n, 1, "dim", 0)) % (len(src) + 1)
        start, end, step = _arg(n, 2, "start"), _arg(n, 3, "end"), _arg(n, 4, "step", 1)
        size = 2**62 if d == 0 else src[d - 1]
        if start in (None, 0) and step == 1 and (end is None or end >= size):
            return x  # the whole dimension
        if d == 0:
            raise LowbitError(f"{_describe(n)} slices the batch dimension")
        start, end, step = slice(start, end, step).indices(size)
        return self.emit("slice", n.name, [x], {"dim": d, "start": start, "end": end, "step": step}, same=x)

    # ----------------------------------------------------------------------------------- integer nodes
    def _sinks(self, n: fx.Node) -> list[tuple[fx.Node, int]]:
        """Non-move readers of ``n`` (looking through reshapes, transposes, selects, dropout), with the operand
        position they read."""
        out = []
        for u in self.users[n.name]:
            if u.op == "call_function" and u.target in _MOVES and u.args and u.args[0] is n:
                out.extend(self._sinks(u))
            elif u.op == "call_function" and u.target in _IGNORED:
                continue
            else:
                pos = [i for i, a in enumerate(u.args) if a is n]
                out.append((u, pos[0] if len(pos) == 1 else -1))
        return out

    def _target(self, n: fx.Node) -> Rep | str:
        """Where a quantized module's output goes: the codes of the one quantizer every reader applies, else
        ``"logits"`` (the model's output) or ``"wide"``."""
        sinks = self._sinks(n)
        reps = set()
        for u, pos in sinks:
            if u.op == "output":
                return "logits" if len(sinks) == 1 else "wide"
            if u.target is QLINEAR and pos == 0:
                q = self.cap.modules[u.args[1]].input_quantizer
            elif u.target is QMATMUL and pos in (0, 1):
                m = self.cap.modules[u.args[2]]
                q = m.a_quantizer if pos == 0 else m.b_quantizer
            else:
                return "wide"
            if q is None:
                return "wide"
            reps.add(_rep(q))
        return next(iter(reps)) if len(reps) == 1 else "wide"

    def _codes(self, x: Val, rep: Rep, name: str) -> tuple[Val, bool]:
        """``x`` as the codes of ``rep``: a ``quantize`` node for a float value (shared by identical
        quantizers); codes made for this quantizer by their producer pass as they are."""
        if x.domain == "int":
            if x.rep is None or (x.rep.scale, x.rep.bits) != (rep.scale, rep.bits):
                raise LowbitError(f"internal: {name!r} reads integer values {x.name!r} that are not its codes")
            return x, False
        key = (x.name, rep)
        if key not in self.codes:
            attrs = {"bits": rep.bits, "signed": rep.lo < 0, "scale": rep.scale, "lo": rep.lo, "hi": rep.hi}
            self.codes[key] = self.emit("quantize", name, [x], attrs, rep=rep)
        return self.codes[key], True

    def _qlinear(self, n: fx.Node) -> Val:
        name = n.args[1]
        m = self.cap.modules[name]
        if m.weight_quantizer is None or m.input_quantizer is None:
            which = "weight" if m.weight_quantizer is None else "input"
            raise LowbitError(f"layer {name!r} has a float {which}; quantize both or neither (plan bits)")
        x_rep = _rep(m.input_quantizer)
        x, made = self._codes(self.value(n.args[0], n), x_rep, f"{name}.quantize")
        w = m.weight_quantizer.codes(m.weight.detach()).to(torch.int32)
        c = w.shape[0]
        s_w = m.weight_quantizer.scale.double().reshape(-1).expand(c) if m.weight_quantizer.scale.numel() == 1 else \
            m.weight_quantizer.scale.double().reshape(c)
        gain = x_rep.scale * s_w
        offset = m.bias.detach().double() if m.bias is not None else torch.zeros(c, dtype=torch.float64)
        x_max = max(abs(x_rep.lo), abs(x_rep.hi))
        acc = w.abs().to(torch.float64).sum(1) * x_max  # per channel, the largest |accumulator|
        target = self._target(n)
        rq, out_scale = _requant(gain, offset, acc, target, name)
        params = {"weight": pack_tensor(w, m.weight_quantizer.bits, signed=True),
                  "multiplier": _int_entry(rq.m, "int32"), "shift": _int_entry(rq.k, "int8"),
                  "bias": _int_entry(rq.b, "int64")}
        attrs = {"w_bits": m.weight_quantizer.bits, "a_bits": x_rep.bits, "lo": rq.lo, "hi": rq.hi,
                 "out_scale": out_scale, "out_bits": target.bits if isinstance(target, Rep) else None}
        out = self.emit("linear", name, [x], attrs, params=params, rep=target if isinstance(target, Rep) else None)
        shape = self._shape(n.args[0])
        self.p.layers.append({"name": name, "op": "linear", "w_bits": attrs["w_bits"], "a_bits": x_rep.bits,
                              "params": w.numel(), "macs": int(w[0].numel() * math.prod(self._shape(n))),
                              "in_shape": shape, "out_shape": self._shape(n), "x_scale": x_rep.scale,
                              "w_scale": float(s_w.max()), "out": target if isinstance(target, str) else "codes"})
        self.p.steps[name] = QStep(m, "linear", [x.name], [x_rep], [made], rq, _out_kind(target), out_scale, name)
        return self._finish(out, target, name, out_scale)

    def _qmatmul(self, n: fx.Node) -> Val:
        name = n.args[2]
        m = self.cap.modules[name]
        if m.a_quantizer is None or m.b_quantizer is None:
            raise LowbitError(f"matmul {name!r} quantizes one operand only; quantize both or neither")
        reps = [_rep(m.a_quantizer), _rep(m.b_quantizer)]
        ab = [self._codes(self.value(n.args[i], n), reps[i], f"{name}.quantize_{'ab'[i]}") for i in (0, 1)]
        k = self._shape(n.args[0])[-1]
        acc = torch.tensor([float(k * max(abs(reps[0].lo), reps[0].hi) * max(abs(reps[1].lo), reps[1].hi))],
                           dtype=torch.float64)
        target = self._target(n)
        gain = torch.tensor([reps[0].scale * reps[1].scale], dtype=torch.float64)
        rq, out_scale = _requant(gain, torch.zeros(1, dtype=torch.float64), acc, target, name)
        rq = Requant(int(rq.m[0]), int(rq.k[0]), int(rq.b[0]), rq.lo, rq.hi)
        attrs = {"multiplier": rq.m, "shift": rq.k, "bias": rq.b, "lo": rq.lo, "hi": rq.hi, "out_scale": out_scale,
                 "a_bits": reps[0].bits, "b_bits": reps[1].bits}
        out = self.emit("matmul", name, [ab[0][0], ab[1][0]], attrs, rep=target if isinstance(target, Rep) else None)
        self.p.steps[name] = QStep(m, "matmul", [v.name for v, _ in ab], reps, [made for _, made in ab], rq,
                                   _out_kind(target), out_scale, name)
        return self._finish(out, target, name, out_scale)

    def _finish(self, out: Val, target: Rep | str, name: str, out_scale: float) -> Val:
        if isinstance(target, Rep) or target == "logits":
            return out
        return self.emit("dequantize", f"{name}.dequantize", [out], {"scale": out_scale})

    def _output(self, n: fx.Node) -> None:
        outs = [a for a in _flat_nodes(n.args) if isinstance(self.cap.values.get(a.name), torch.Tensor)]
        if len(outs) != 1:
            raise LowbitError(f"the model must return one tensor (its logits), found {len(outs)} outputs")
        src = outs[0]
        x = self.value(src, n)
        step = next((s for s in self.p.steps.values() if s.node == x.name), None)
        if step is None or step.out != "logits":
            raise LowbitError(f"the model output must come straight from a quantized Linear layer (the classifier), "
                              f"found {x.name!r}")
        self.emit("dequantize_output", "dequantize_output", [x], {"scale": step.out_scale}, output="logits",
                  domain="int")

    # ----------------------------------------------------------------------------------------- emission
    def emit(self, op: str, name: str, inputs: list[Val], attrs: dict[str, Any],
             params: dict[str, tuple[torch.Tensor, dict[str, Any]]] | None = None, rep: Rep | None = None,
             same: Val | None = None, output: str | None = None, domain: str | None = None) -> Val:
        spec = op_spec(op)
        node = Node(op, name, [v.name for v in inputs], [output or name], attrs)
        for role, (tensor, entry) in (params or {}).items():
            key = f"{name}.{role}"
            self.p.tensors[key], self.p.entries[key] = tensor, entry
            node.params[role] = key
        if same is not None:
            node.domain, rep = same.domain, same.rep
        else:
            node.domain = domain or spec.domain
        self.p.graph.append(node)
        return Val(node.output, node.domain, rep)

    # -------------------------------------------------------------------------------------------- sizes
    def _shape(self, a: fx.Node) -> list[int]:
        """``a``'s shape without the batch dimension (static sizes; the batch must be the traced symbol)."""
        val = a.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise LowbitError(f"{_describe(a)} has no traced shape")
        shape = list(val.shape)
        if not shape or (not isinstance(shape[0], torch.SymInt) and self.kind(a) == "main"):
            raise LowbitError(f"{_describe(a)} does not keep the batch as its first dimension (shape {shape})")
        rest = shape[1:]
        if any(not isinstance(d, int) for d in rest):
            raise LowbitError(f"{_describe(a)}: sizes other than the batch must be fixed, got {shape}")
        return [int(d) for d in rest]

    def _dim(self, n: fx.Node, d: Any) -> int:
        rank = len(self._shape(n.args[0])) + 1
        d = int(d) % rank
        if d == 0:
            raise LowbitError(f"{_describe(n)} moves the batch dimension")
        return d

    def _same_dtype(self, n: fx.Node) -> bool:
        a, v = n.args[0], self.cap.values[n.name]
        return isinstance(a, fx.Node) and self.cap.values[a.name].dtype == v.dtype


def additive_mask(mask: torch.Tensor, fill: float, square: bool) -> torch.Tensor:
    """The op table's ``attention_mask``: ``where(mask != 0, 0, fill)`` as (N, 1, 1, T), or (N, 1, T, T)."""
    out = torch.where(mask[:, None, None, :] != 0, torch.zeros((), dtype=torch.float32),
                      torch.tensor(fill, dtype=torch.float32))
    t = mask.shape[-1]
    return out.expand(mask.shape[0], 1, t, t) if square else out


def _holds_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (list, tuple)) and any(_holds_tensor(x) for x in v)


def _out_kind(target: Rep | str) -> str:
    return "codes" if isinstance(target, Rep) else target


def _requant(gain: torch.Tensor, offset: torch.Tensor, acc: torch.Tensor, target: Rep | str, name: str
             ) -> tuple[Requant, float]:
    """Per-channel dyadic constants for ``gain * acc + offset`` into ``target`` (codes), or into a wide value at
    a power-of-two scale; multipliers of ``min(31, 52 - log2(max |acc|))`` bits (module docstring)."""
    bound = float((gain.abs() * acc + offset.abs()).max())
    if isinstance(target, Rep):
        out_scale, lo, hi = target.scale, target.lo, target.hi
    else:
        out_scale = 2.0 ** math.ceil(math.log2(bound * 2.0**-WIDE_BITS)) if bound > 0 else 1.0
        lo, hi = INT32_MIN, INT32_MAX
    bits = max(8, min(31, 52 - math.ceil(math.log2(float(acc.max()) + 1))))
    try:
        m, k = to_dyadic(gain / out_scale, bits=bits)
        b = torch.as_tensor(to_fixed(offset / out_scale, k), dtype=torch.int64).reshape(-1)
    except ValueError as e:
        raise LowbitError(f"layer {name!r}: its requantization cannot be represented in fixed point ({e})") from None
    return Requant(m.to(torch.int64), k.to(torch.int64), b, lo, hi), out_scale


def _probe_masks(mask: torch.Tensor) -> list[torch.Tensor]:
    """Masks to check a mask computation on: random keep/drop patterns and right padding (seeded)."""
    g = torch.Generator().manual_seed(0)
    n, t = mask.shape
    random = (torch.rand((n, t), generator=g) > 0.3).to(mask.dtype)
    random[:, 0] = 1
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    padded = (torch.arange(t)[None, :] < lengths[:, None]).to(mask.dtype)
    return [random, padded]


def _flat_nodes(obj: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    if isinstance(obj, fx.Node):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out.extend(_flat_nodes(v))
    elif isinstance(obj, dict):
        for v in obj.values():
            out.extend(_flat_nodes(v))
    return out


def _arg(n: fx.Node, i: int, key: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(key, default)


def _float_entry(t: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    t = t.detach().to(torch.float32).contiguous()
    return t, {"dtype": "float32", "shape": list(t.shape)}


def _int_entry(t: torch.Tensor, dtype: str) -> tuple[torch.Tensor, dict[str, Any]]:
    t = torch.as_tensor(t).to(getattr(torch, dtype)).contiguous()
    return t, {"dtype": dtype, "shape": list(t.shape)}


__all__ = ["EncoderCapture", "EncoderProgram", "LoweredEncoder", "QStep", "active", "additive_mask", "capture_encoder",
           "lower_encoder", "opaque_quantized"]
