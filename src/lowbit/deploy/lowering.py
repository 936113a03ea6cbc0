"""The independent check of the lowering: the integer runtime against the fake-quant model, layer by layer.

The simulation (:class:`lowbit.export.Simulation`) shares the lowering's constants, so its bit-exactness shows
the file is written and read faithfully, not that the constants are right. This check shares nothing with the
export but the file under test and the PyTorch model:

* **codes**: for every quantized layer, the codes the runtime feeds it (the file's graph, run by the reference
  backend) against the codes the fake-quant model's own input quantizer makes from its float input, with the
  model in eval mode (batch norms use their running statistics). Rounding is decided by float arithmetic in
  one and by exact integers in the other, so codes may differ by one near a rounding tie, and such a difference
  moves the float input of every later layer (a 2-bit layer turns it into a whole step), so a rare code further
  down may differ by two. The export's narrowed multipliers (layers that requantize inside the int8 kernel,
  :data:`lowbit.ir.dyadic.EPILOGUE_MAX_ERROR`) move a value by at most 2^-10 steps on purpose, which flips the
  code of a value within 2^-10 of a tie: about 2^-9 of a layer's codes at most. So each layer must agree exactly
  on all but ``max_frac_differing`` (0.2%) of its codes and within 1 on all but a tenth of that; a file exported
  with a larger ``epilogue_error`` (its manifest says) gets :func:`code_tolerance` of it instead. Each
  :class:`~lowbit.quant.QuantAct` (the manifest's ``"activations"`` say which value holds its codes) is held to the
  same bounds on the codes it makes;
* **folds**: for every conv/linear node, the per-channel affine map its requantization computes,
  ``m_c * 2^-k_c`` and ``b_c * 2^-k_c`` in real units (``out_scale``), against the one recomputed from the
  model: ``g_c * s_x * s_w,c`` and ``g_c * bias_c + h_c``, where ``s_x, s_w`` are the quantizers' steps and
  ``g = gamma / sqrt(var + eps)``, ``h = beta - g * mean`` come from the batch norm that follows the layer in
  the float model (found by its own torch.fx trace). The dyadic multiplier is exact to ``2^-31`` and the bias
  to ``2^-k_c`` output steps, so the tolerances below leave room only for float64 rounding;
* **logits**: the runtime's float logits against the fake-quant model's, relative to the largest logit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lowbit.errors import LowbitError
from lowbit.export.simulate import normalize_pixels
from lowbit.ir.dyadic import EPILOGUE_MAX_ERROR
from lowbit.ir.graph import Graph
from lowbit.quant.modules import QUANT_LAYERS, QuantAct
from lowbit.runtime.engine import IntegerModel

MAX_FRAC_DIFFERING = 2e-3  # codes of a layer that may differ from the fake-quant model's (default export)
GAIN_TOLERANCE = 2.0**-24  # gain error beyond the multiplier's grid (2^-k), relative to the layer's largest gain
OFFSET_TOLERANCE = 2.0**-12  # offset error beyond its fixed-point grid (2^-k), in units of the integer output
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class LayerCodes:
    """How the codes the runtime feeds one layer compare with the fake-quant model's."""

    elements: int = 0
    differing: int = 0
    over_one: int = 0  # codes that differ by more than 1
    max_diff: int = 0

    @property
    def frac_differing(self) -> float:
        return self.differing / max(1, self.elements)

    @property
    def frac_over_one(self) -> float:
        return self.over_one / max(1, self.elements)


@dataclass
class FoldError:
    """The largest deviation of one layer's requantization from the affine map recomputed from the model."""

    batch_norm: str | None
    gain_error: float  # relative to the largest |gain| of the layer
    offset_error: float  # in units of the integer output (codes, or a wide value's fine units)


@dataclass
class LoweringCheck:
    """Result of :func:`check_lowering`; :attr:`ok` says whether the lowering passed."""

    images: int
    layers: dict[str, LayerCodes]
    folds: dict[str, FoldError]
    logits_max_diff_relative: float
    max_frac_differing: float
    notes: list[str] = field(default_factory=list)
    activations: dict[str, LayerCodes] = field(default_factory=dict)  # QuantAct name -> its codes

    @property
    def failures(self) -> list[str]:
        """One line per layer (or QuantAct) whose codes or fold are out of bounds."""
        bad = [f"{n}: codes differ on {100 * c.frac_differing:.3f}%, by more than 1 on {100 * c.frac_over_one:.4f}% "
               f"(up to {c.max_diff})" for n, c in {**self.layers, **self.activations}.items()
               if c.frac_differing > self.max_frac_differing or c.frac_over_one > self.max_frac_differing / 10]
        bad += [f"{n}: folded {'batch norm ' + f.batch_norm if f.batch_norm else 'bias'} off by "
                f"{f.gain_error:.1e} (gain, relative) / {f.offset_error:.1e} (offset, output units)"
                for n, f in self.folds.items() if f.gain_error > GAIN_TOLERANCE or f.offset_error > OFFSET_TOLERANCE]
        return bad

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        """The report line (:func:`format_lowering`)."""
        return format_lowering(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        def codes(d: dict[str, LayerCodes]) -> dict[str, dict[str, float]]:
            return {n: {"frac_differing": c.frac_differing, "frac_over_one": c.frac_over_one, "max_diff": c.max_diff}
                    for n, c in d.items()}

        return {"ok": self.ok, "images": self.images, "failures": self.failures,
                "logits_max_diff_relative": self.logits_max_diff_relative, "notes": self.notes,
                "layers": codes(self.layers), **({"activations": codes(self.activations)} if self.activations else {}),
                "folds": {n: {"batch_norm": f.batch_norm, "gain_error": f.gain_error, "offset_error": f.offset_error}
                          for n, f in self.folds.items()}}


def format_lowering(d: dict[str, Any]) -> str:
    """The report line of a :meth:`LoweringCheck.to_dict`, with its failures indented below."""
    layers = d["layers"].values()
    worst = max((v["max_diff"] for v in layers), default=0)
    frac = max((v["frac_differing"] for v in layers), default=0.0)
    over = max((v.get("frac_over_one", 0.0) for v in layers), default=0.0)
    folded = sum(f["batch_norm"] is not None for f in d["folds"].values())
    acts = d.get("activations") or {}
    act = (f"{len(acts)} QuantActs' codes differing <= "
           f"{100 * max(v['frac_differing'] for v in acts.values()):.3f}% (at most "
           f"{max(v['max_diff'] for v in acts.values())}), ") if acts else ""
    text = (f"lowering vs fake-quant model (independent, {d['images']} images): {'OK' if d['ok'] else 'WRONG'}, "
            f"{len(d['layers'])} layers' input codes differing <= {100 * frac:.3f}% (by more than 1 <= "
            f"{100 * over:.2g}%, at most {worst}), {act}"
            f"{len(d['folds'])} folds ({folded} batch norms) recomputed from the model, logits within "
            f"{d['logits_max_diff_relative']:.1e} of the largest")
    return text + "".join(f"\n  {line}" for line in d["failures"][:5])


def check_lowering(runtime: IntegerModel | Graph, fake_quant: nn.Module, images: torch.Tensor, *,
                   batch_size: int = 256, max_frac_differing: float | None = None) -> LoweringCheck:
    """Check the integer model ``runtime`` against ``fake_quant`` (the quantized PyTorch model it was exported
    from) on ``images`` (what the runtime takes: uint8 pixels or float input), layer by layer: each quantized
    layer and QuantAct of the fake-quant model gets the runtime's codes for its input, and the codes it would
    feed the next ones are compared with the runtime's.

    ``max_frac_differing`` (default: :func:`code_tolerance` of the file's ``epilogue_error``) bounds the share
    of each layer's codes that may differ."""
    runtime = runtime if isinstance(runtime, IntegerModel) else IntegerModel(runtime)
    if max_frac_differing is None:
        max_frac_differing = code_tolerance(runtime.manifest.get("epilogue_error"))
    layers = {name: m for name, m in fake_quant.named_modules() if isinstance(m, QUANT_LAYERS)}
    names = {n.name for n in runtime.nodes}
    notes = [f"layer {n!r} is not a node of the exported graph" for n in layers if n not in names]
    layers = {n: m for n, m in layers.items() if n in names}
    if not layers:
        raise LowbitError("the lowering check found no quantized layer of the model in the exported graph")
    codes = {n: LayerCodes() for n in layers}
    acts = _activations(runtime, fake_quant, notes)
    act_codes = {n: LayerCodes() for n in acts}
    logit_diff, logit_max = 0.0, 0.0
    modules = {**layers, **{n: m for n, (m, _) in acts.items()}}
    values = {**{n: runtime.graph.node(n).inputs[0] for n in layers}, **{n: v for n, (_, v) in acts.items()}}
    with _eval(fake_quant), _forced_inputs(modules) as (seen, forced), torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            env = runtime.run_trace(x)
            seen.clear()
            forced.clear()
            forced.update({n: env[v] for n, v in values.items()})
            spec = runtime.input_spec
            xf = normalize_pixels(x, spec["mean"], spec["std"]) if runtime.pixel_input else x.float()
            ref_logits = fake_quant(xf).double()
            for name, m in layers.items():
                want = m.input_quantizer.codes(seen[name]).to(torch.int64)
                _count(codes[name], env[runtime.graph.node(name).inputs[0]], want)
            for name, (m, value) in acts.items():
                _count(act_codes[name], env[value], m.input_quantizer.codes(seen[name]).to(torch.int64))
            logits = env["logits"].double() * runtime.output_scale
            logit_diff = max(logit_diff, float((logits - ref_logits).abs().max()))
            logit_max = max(logit_max, float(ref_logits.abs().max()))
    folds = _check_folds(runtime.graph, fake_quant, layers, notes)
    return LoweringCheck(len(images), codes, folds, logit_diff / max(logit_max, 1e-30), max_frac_differing, notes,
                         act_codes)


def code_tolerance(epilogue_error: Any) -> float:
    """The share of a layer's codes that may differ from the fake-quant model's: 0.2% for a file exported with
    the default budget (or none recorded), else ``16 * epilogue_error``, at most half. A requantization whose
    multiplier moved values by at most ``e`` steps flips a code only where the exact value lies within ``e`` of a
    tie (a share of about ``2e``); each layer is checked given the runtime's own inputs, so flips do not compound
    through the network (before they did: a post-training W4A4 resnet8 showed 13.7% of the classifier's 8-bit
    input codes one off, a global average of 49 codes that sit on ties of the finer grid; now 0.02%). A value that
    is not a number in ``(default, 0.5]`` counts as the default."""
    try:
        e = float(epilogue_error)
    except (TypeError, ValueError):
        return MAX_FRAC_DIFFERING
    if not EPILOGUE_MAX_ERROR < e <= 0.5:  # also NaN
        return MAX_FRAC_DIFFERING
    return min(0.5, max(MAX_FRAC_DIFFERING, 16 * e))


def _count(c: LayerCodes, got: torch.Tensor, want: torch.Tensor) -> None:
    d = (got.to(torch.int64).reshape(want.shape) - want).abs()
    c.elements += d.numel()
    c.differing += int((d > 0).sum())
    c.over_one += int((d > 1).sum())
    c.max_diff = max(c.max_diff, int(d.max()) if d.numel() else 0)


def _activations(runtime: IntegerModel, model: nn.Module, notes: list[str]) -> dict[str, tuple[nn.Module, str]]:
    """QuantAct name -> (module, the value holding its codes), from the manifest's ``"activations"``."""
    where = {a["name"]: a["value"] for a in runtime.manifest.get("activations") or []}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantAct):
            if name in where:
                out[name] = (m, where[name])
            else:
                notes.append(f"QuantAct {name!r} is not in the exported graph's activations")
    return out


def _check_folds(graph: Graph, model: nn.Module, layers: dict[str, nn.Module], notes: list[str]
                 ) -> dict[str, FoldError]:
    """Each conv/linear node's per-channel affine map against ``g * s_x * s_w`` and ``g * bias + h``."""
    bns = _batch_norms_after(model, layers, notes)
    out = {}
    for name, m in layers.items():
        node = graph.node(name)
        if "out_scale" not in node.attrs:
            notes.append(f"node {name!r} does not record its output scale: fold not checked")
            continue
        p = graph.params[name]
        c = p["multiplier"].numel()
        s_w = m.weight_quantizer.scale.detach().double().reshape(-1).expand(c)
        s_x = float(m.input_quantizer.scale)
        bias = m.bias.detach().double() if m.bias is not None else torch.zeros(c, dtype=torch.float64)
        g, h = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        for bn_name in bns.get(name, []):  # y -> g_i * y + h_i, in order
            g_i, h_i = _bn_affine(model.get_submodule(bn_name))
            g, h = g * g_i, h * g_i + h_i
        want_gain, want_offset = g * s_x * s_w, g * bias + h
        out_scale = float(node.attrs["out_scale"])
        pow2 = torch.pow(2.0, -p["shift"].double())
        gain = p["multiplier"].double() * pow2 * out_scale
        offset = p["bias"].double() * pow2 * out_scale
        grid = pow2 * out_scale  # one unit of the multiplier and of the fixed-point bias, in real units
        gain_err = float(((gain - want_gain).abs() - grid).clamp_min(0).max() / want_gain.abs().max().clamp_min(1e-300))
        offset_err = float(((offset - want_offset).abs() - grid).clamp_min(0).max() / out_scale)
        out[name] = FoldError(", ".join(bns[name]) if name in bns else None, gain_err, offset_err)
    return out


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``g * y + h`` per channel: ``g = gamma / sqrt(var + eps)``, ``h = beta - g * mean``."""
    sigma = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sigma)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(sigma)
    g = gamma / sigma
    return g, beta - g * bn.running_mean.double()


def _batch_norms_after(model: nn.Module, layers: dict[str, nn.Module], notes: list[str]) -> dict[str, list[str]]:
    """Quantized layer name -> the batch norms that follow it in a chain, each the only reader of what it reads,
    from a torch.fx trace of the model with quantized layers and batch norms as leaves."""

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, (*QUANT_LAYERS, QuantAct, *_BN)) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as e:  # fx raises many types on data-dependent control flow
        notes.append(f"cannot trace the model to find its batch norms ({str(e).splitlines()[0][:100]}): folds "
                     f"checked without them")
        return {}
    def is_bn(n: Any) -> bool:
        return isinstance(n, fx.Node) and n.op == "call_module" and isinstance(model.get_submodule(n.target), _BN)

    found = {}
    for layer in graph.nodes:
        if layer.op != "call_module" or layer.target not in layers:
            continue
        chain, n = [], layer
        while len(n.users) == 1 and is_bn(bn := next(iter(n.users))) and bn.args[0] is n:
            chain.append(bn.target)
            n = bn
        if chain:
            found[layer.target] = chain
    return found


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """The model in eval mode within the block (batch norms on running statistics), its mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def _forced_inputs(modules: dict[str, nn.Module]) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Record each module's float input (``seen``, cleared before each forward pass: the first call's), then hand
    it the runtime's codes for that input instead (``forced``, times the quantizer's step, which the quantizer
    maps back to the same codes): every layer is compared given the same inputs as in the runtime, so a code one
    off near a tie upstream does not move every later layer, and only a layer's own rounding can differ."""
    seen: dict[str, torch.Tensor] = {}
    forced: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, name: str):
        if name in seen:  # a module called twice: its graph node (``name``) is the first call
            return None
        x = args[0].detach()
        seen[name] = x
        codes, step = forced.get(name), module.input_quantizer.scale.detach()
        if codes is None or codes.numel() != x.numel() or step.numel() != 1:
            return None
        return (codes.reshape(x.shape).to(x.dtype) * step.to(x.dtype), *args[1:])

    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
             for name, m in modules.items()]
    try:
        yield seen, forced
    finally:
        for h in hooks:
            h.remove()


__all__ = ["FoldError", "LayerCodes", "LoweringCheck", "check_lowering", "format_lowering"]
