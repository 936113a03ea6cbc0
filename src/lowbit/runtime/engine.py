"""The integer reference runtime: runs a ``.lowbit`` model with integer arithmetic only.

This is the definition of what an exported model computes. Between the input lookup (or the input
quantizer, for float inputs) and the single dequantization of the logits every value is an integer tensor,
every conv/linear is an exact integer product (:mod:`lowbit.runtime.reference`) and every change of scale is
one dyadic requantization rounded half to even (:mod:`lowbit.runtime.dyadic`):

=================== =======================================================================================
op                  computes (``rq`` = ``clamp(round_half_even((v*m + b) * 2^-k), lo, hi)``)
=================== =======================================================================================
quantize_input      uint8 pixels: ``lut[c, p]``; float input: ``clamp(round_half_even(x / scale), lo, hi)``
                    in float32, exactly as the model's input quantizer
conv2d / linear     ``rq(sum(x * w))`` with per-output-channel ``m, k, b`` (BN, bias and ReLU folded in)
requantize          ``rq(x)`` with per-tensor ``m, k, b``
add                 ``clamp(round_half_even((a*m_a + b*m_b + bias) * 2^-shift), lo, hi)``
relu / maxpool2d    ``max(x, 0)`` / window maxima (zero point 0: order and sign are those of the reals)
avgpool2d           ``rq(window sum)`` (zero padding counted); adaptive_avgpool: even windows only
flatten             reshape
dequantize_output   ``float32(x * scale)``: the only float operation after the input
=================== =======================================================================================

Loading validates the file structurally (parameter shapes and dtypes, constant ranges, and shapes through
the graph on the meta device), so a mismatched file fails at load with a :class:`LowbitError`, not mid-run.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.export.format import load_codes, read_model
from lowbit.runtime.dyadic import MAX_SHIFT, requantize
from lowbit.runtime.reference import (
    INT32_MAX,
    INT32_MIN,
    adaptive_avgpool_int,
    add_requant,
    avgpool_int,
    conv2d_int,
    linear_int,
    maxpool_int,
    relu_int,
)

_REQUANT_OPS = ("requantize", "avgpool2d", "adaptive_avgpool")


class IntegerModel:
    """A loaded ``.lowbit`` model: ``model(x)`` gives float logits, :meth:`run_int` the integer ones."""

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], source: str = "model"):
        self.manifest = manifest
        self.source = source
        self.input_spec = manifest.get("input") or {}
        self.nodes = manifest["graph"]
        self.params: dict[str, dict[str, torch.Tensor]] = {}
        self.shapes: dict[str, list[int]] = {}  # value -> shape without the batch dimension
        try:
            for node in self.nodes:
                self.params[node["name"]] = {role: load_codes(manifest, tensors, key)
                                             for role, key in node.get("params", {}).items()}
            self._check()
        except LowbitError as e:
            raise LowbitError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> IntegerModel:
        """Read, validate and prepare a ``.lowbit`` file (:class:`LowbitError` if anything is wrong)."""
        manifest, tensors = read_model(path)
        return cls(manifest, tensors, source=str(path))

    # ------------------------------------------------------------------------------------------ running
    @property
    def output_scale(self) -> float:
        return float(self.nodes[-1]["attrs"]["scale"])

    @property
    def pixel_input(self) -> bool:
        return self.input_spec.get("dtype") == "uint8"

    def run_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer logits (int32) for input ``x`` of shape (N, *input shape)."""
        return self.run_trace(x)["logits"]

    def run_trace(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every integer value of the graph (by value name; the logits under ``"logits"``) for input ``x``."""
        self._check_input(x)
        env = {self.manifest["inputs"][0]: x}
        with torch.inference_mode():
            for node in self.nodes:
                xs = [env[i] for i in node["inputs"]]
                env[node["outputs"][0]] = xs[0] if node["op"] == "dequantize_output" else self._step(node, xs)
        return env

    def value_ranges(self) -> dict[str, tuple[int, int]]:
        """``[lo, hi]`` of every integer value, from the producing node (ReLU raises ``lo`` to 0)."""
        ranges: dict[str, tuple[int, int]] = {}
        for node in self.nodes:
            a = node.get("attrs", {})
            if "lo" in a:
                r = (a["lo"], a["hi"])
            else:
                r = ranges.get(node["inputs"][0], (INT32_MIN, INT32_MAX))
                if node["op"] == "relu":
                    r = (max(0, r[0]), max(0, r[1]))
            ranges[node["outputs"][0]] = r
        return ranges

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits: the integer logits times the output scale."""
        return (self.run_int(x).to(torch.float64) * self.output_scale).to(torch.float32)

    def _step(self, node: dict[str, Any], xs: list[torch.Tensor]) -> torch.Tensor:
        op, a, p = node["op"], node.get("attrs", {}), self.params[node["name"]]
        x = xs[0]
        if op == "quantize_input":
            if "lut" in p:
                c = torch.arange(x.shape[1]).reshape(1, -1, *([1] * (x.dim() - 2))) * 256
                return p["lut"].reshape(-1)[c + x.to(torch.int64)].to(torch.int32)
            scale = torch.tensor(a["scale"], dtype=torch.float32)
            return (x.to(torch.float32) / scale).clamp(a["lo"], a["hi"]).round().to(torch.int32)
        if op == "conv2d":
            acc = conv2d_int(x, p["weight"], a["stride"], a["padding"], a["groups"], a["dilation"])
            return requantize(acc, p["multiplier"], p["shift"], p["bias"], lo=a["lo"], hi=a["hi"], axis=1)
        if op == "linear":
            acc = linear_int(x, p["weight"])
            return requantize(acc, p["multiplier"], p["shift"], p["bias"], lo=a["lo"], hi=a["hi"], axis=-1)
        if op == "requantize":
            return requantize(x, a["multiplier"], a["shift"], a["bias"], lo=a["lo"], hi=a["hi"])
        if op == "add":
            return add_requant(x, xs[1], a["multiplier_a"], a["multiplier_b"], a["shift"], bias=a["bias"],
                               lo=a["lo"], hi=a["hi"])
        if op == "relu":
            return relu_int(x)
        if op == "maxpool2d":
            return maxpool_int(x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
        if op == "avgpool2d":
            return avgpool_int(x, a["kernel_size"], a["stride"], a["padding"], multiplier=a["multiplier"],
                               shift=a["shift"], bias=a["bias"], lo=a["lo"], hi=a["hi"])
        if op == "adaptive_avgpool":
            return adaptive_avgpool_int(x, a["output_size"], multiplier=a["multiplier"], shift=a["shift"],
                                        bias=a["bias"], lo=a["lo"], hi=a["hi"])
        if op == "flatten":
            return torch.flatten(x, a["start_dim"])
        raise LowbitError(f"{self.source}: node {node['name']!r}: op {op!r} has no integer kernel")

    def _check_input(self, x: torch.Tensor) -> None:
        shape = self.input_spec.get("shape")
        if shape is not None and list(x.shape[1:]) != list(shape):
            raise LowbitError(f"{self.source}: input shape {tuple(x.shape)} does not match the model's "
                              f"(N, {', '.join(map(str, shape))})")
        if self.pixel_input and x.dtype != torch.uint8:
            raise LowbitError(f"{self.source}: the model takes uint8 pixels, got {x.dtype}")
        if not self.pixel_input and not x.dtype.is_floating_point:
            raise LowbitError(f"{self.source}: the model takes float input, got {x.dtype}")

    # ------------------------------------------------------------------------------------- validation
    def _check(self) -> None:
        """Parameter dtypes/shapes, constant ranges and shapes through the graph (meta tensors)."""
        nodes = self.nodes
        if not nodes or nodes[0]["op"] != "quantize_input" or nodes[-1]["op"] != "dequantize_output":
            raise LowbitError("the graph must start with quantize_input and end with dequantize_output")
        if sum(n["op"] in ("quantize_input", "dequantize_output") for n in nodes) != 2:
            raise LowbitError("the graph needs exactly one quantize_input and one dequantize_output")
        shape = self.input_spec.get("shape")
        if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
            raise LowbitError(f"manifest 'input' needs a positive integer 'shape', got {shape!r}")
        meta = {self.manifest["inputs"][0]: torch.empty((1, *shape), device="meta")}
        for node in nodes:
            where = f"node {node['name']!r} ({node['op']})"
            try:
                _check_node(node, self.params[node["name"]], self.input_spec, self.manifest["tensors"])
                if node["op"] != "dequantize_output":
                    meta[node["outputs"][0]] = _meta_step(node, self.params[node["name"]],
                                                          [meta[i] for i in node["inputs"]])
                    self.shapes[node["outputs"][0]] = list(meta[node["outputs"][0]].shape[1:])
            except LowbitError as e:
                raise LowbitError(f"{where}: {e}") from None
            except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
                raise LowbitError(f"{where}: does not fit its input: {str(e).splitlines()[0][:200]}") from None


def _int_attr(a: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = a.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise LowbitError(f"attribute {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _check_range(a: dict[str, Any]) -> None:
    lo, hi = _int_attr(a, "lo", INT32_MIN, INT32_MAX), _int_attr(a, "hi", INT32_MIN, INT32_MAX)
    if lo > hi:
        raise LowbitError(f"empty output range lo={lo} > hi={hi}")


def _check_requant_tensors(p: dict[str, torch.Tensor], channels: int) -> None:
    for role, dtype in (("multiplier", torch.int32), ("shift", torch.int8), ("bias", torch.int64)):
        t = p[role]
        if t.dtype != dtype or list(t.shape) != [channels]:
            raise LowbitError(f"{role} must be {str(dtype).removeprefix('torch.')} of shape [{channels}], "
                              f"got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
    if int(p["shift"].min()) < 0 or int(p["shift"].max()) > MAX_SHIFT:
        raise LowbitError(f"shift must be in [0, {MAX_SHIFT}]")
    if int(p["multiplier"].min()) == INT32_MIN:
        raise LowbitError("multiplier -2^31 is out of range")


def _check_node(node: dict[str, Any], p: dict[str, torch.Tensor], spec: dict[str, Any],
                entries: dict[str, Any]) -> None:
    op, a = node["op"], node.get("attrs", {})
    if op in ("quantize_input", "conv2d", "linear", "add", *_REQUANT_OPS):
        _check_range(a)
    if op == "quantize_input":
        if spec.get("dtype") == "uint8":
            lut = p.get("lut")
            if lut is None or lut.dtype != torch.int16 or list(lut.shape) != [spec["shape"][0], 256]:
                raise LowbitError(f"uint8 input needs an int16 'lut' of shape [{spec['shape'][0]}, 256]")
            if int(lut.min()) < a["lo"] or int(lut.max()) > a["hi"]:
                raise LowbitError("lookup table codes fall outside [lo, hi]")
        elif not (isinstance(a["scale"], float) and math.isfinite(a["scale"]) and a["scale"] > 0):
            raise LowbitError(f"input scale must be a positive number, got {a['scale']!r}")
    elif op in ("conv2d", "linear"):
        w, bits = p["weight"], a["w_bits"]
        entry = entries[node["params"]["weight"]]
        if entry.get("bits") != bits or entry.get("signed") is not True:
            raise LowbitError(f"weight must be packed as signed {bits}-bit codes (w_bits), found "
                              f"{entry.get('bits')}-bit {'signed' if entry.get('signed') else 'unsigned'}")
        if w.dim() != (4 if op == "conv2d" else 2):
            raise LowbitError(f"weight must be {4 if op == 'conv2d' else 2}-D, got shape {list(w.shape)}")
        lo_w, hi_w = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if w.numel() and (int(w.min()) < lo_w or int(w.max()) > hi_w):
            raise LowbitError(f"weight codes exceed the {bits}-bit range")
        _check_requant_tensors(p, w.shape[0])
    elif op in _REQUANT_OPS:
        _int_attr(a, "multiplier", INT32_MIN + 1, INT32_MAX)
        _int_attr(a, "shift", 0, MAX_SHIFT)
        _int_attr(a, "bias", -(2**61), 2**61)
    elif op == "add":
        for key in ("multiplier_a", "multiplier_b"):
            _int_attr(a, key, INT32_MIN + 1, INT32_MAX)
        _int_attr(a, "shift", 0, MAX_SHIFT)
        _int_attr(a, "bias", -(2**61), 2**61)
    elif op == "dequantize_output":
        if not (isinstance(a["scale"], float) and math.isfinite(a["scale"]) and a["scale"] > 0):
            raise LowbitError(f"output scale must be a positive number, got {a['scale']!r}")


def _meta_step(node: dict[str, Any], p: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> torch.Tensor:
    """The node's output on the meta device: shapes only, so a mismatched file fails at load."""
    op, a, x = node["op"], node.get("attrs", {}), xs[0]
    if op in ("quantize_input", "requantize", "relu"):
        return torch.empty_like(x)
    if op == "conv2d":
        w = torch.empty(p["weight"].shape, device="meta")
        return F.conv2d(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"])
    if op == "linear":
        if x.dim() != 2:
            raise LowbitError(f"linear needs a 2-D input, got {x.dim()}-D (flatten first)")
        return F.linear(x, torch.empty(p["weight"].shape, device="meta"))
    if op == "add":
        if xs[0].shape != xs[1].shape:
            raise LowbitError(f"adds shapes {list(xs[0].shape)} and {list(xs[1].shape)}")
        return torch.empty_like(x)
    if op == "maxpool2d":
        return F.max_pool2d(x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    if op == "avgpool2d":
        return F.avg_pool2d(x, a["kernel_size"], a["stride"], a["padding"])
    if op == "adaptive_avgpool":
        oh, ow = a["output_size"]
        if x.dim() != 4 or x.shape[-2] % oh or x.shape[-1] % ow:
            raise LowbitError(f"output size {a['output_size']} does not divide the input {list(x.shape)}")
        return F.adaptive_avg_pool2d(x, (oh, ow))
    if op == "flatten":
        return torch.flatten(x, a["start_dim"])
    raise LowbitError(f"op {op!r} has no integer kernel")


def load(path: str | os.PathLike) -> IntegerModel:
    """Shorthand for :meth:`IntegerModel.load`."""
    return IntegerModel.load(path)
