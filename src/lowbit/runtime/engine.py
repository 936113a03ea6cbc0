"""The integer reference runtime: runs a ``.lowbit`` model with integer arithmetic only.

This is the definition of what an exported model computes (the op table, :mod:`lowbit.ir.ops`, lists each
op's formula). Between the input lookup (or the input quantizer, for float inputs) and the single
dequantization of the logits every value is an integer tensor, every conv/linear is an exact integer product
(:mod:`lowbit.runtime.reference`) and every change of scale is one dyadic requantization rounded half to even
(:mod:`lowbit.ir.dyadic`). Each op's kernel is registered once, ``@kernel(op, backend="reference")``; a graph
with an op that has no reference kernel is refused at load.

Encoders (token graphs, format version 2) take a dict of int64 tensors by input name (``input_ids``,
``attention_mask``, ``token_type_ids``) and mix integer nodes with float glue: the glue kernels call the ATen
operator the traced model called (``F.layer_norm``, ``torch.softmax``, ``F.gelu``...) in float32, so the values
reaching each ``quantize`` node are those of the model's own forward wherever the integer nodes before them
produce the same floats.

Loading validates the file (:class:`lowbit.ir.Graph`: parameter shapes and dtypes, constant ranges, and
shapes through the graph on the meta device), so a mismatched file fails at load with a
:class:`LowbitError`, not mid-run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.ir.dyadic import requantize, requantize_sum
from lowbit.ir.graph import Graph, Node
from lowbit.ir.kernels import kernel, require_kernels
from lowbit.runtime.reference import (
    adaptive_avgpool_int,
    add_requant,
    avgpool_int,
    clamp_int,
    conv2d_int,
    linear_int,
    matmul_int,
    maxpool_int,
    relu_int,
    upsample_nearest_int,
)

Params = dict[str, torch.Tensor]


class IntegerModel:
    """A loaded ``.lowbit`` model: ``model(x)`` gives float logits, :meth:`run_int` the integer ones.

    Built from a validated :class:`~lowbit.ir.Graph`, or from a manifest and its tensors (validated here).
    """

    def __init__(self, manifest: dict[str, Any] | Graph, tensors: dict[str, torch.Tensor] | None = None,
                 source: str = "model"):
        graph = manifest if isinstance(manifest, Graph) else Graph.from_manifest(manifest, tensors, source)
        self.graph = graph
        self.manifest = graph.manifest
        self.source = graph.source
        self.input_spec = graph.input_spec
        self.nodes = graph.nodes
        self.params = graph.params
        self.shapes = graph.shapes  # value -> shape without the batch dimension
        self._kernels = require_kernels("reference", {n.op for n in self.nodes}, self.source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> IntegerModel:
        """Read, validate and prepare a ``.lowbit`` file (:class:`LowbitError` if anything is wrong)."""
        return cls(Graph.load(path))

    # ------------------------------------------------------------------------------------------ running
    @property
    def output_scale(self) -> float:
        return self.graph.output_scale

    @property
    def pixel_input(self) -> bool:
        return self.graph.pixel_input

    @property
    def token_input(self) -> bool:
        return self.graph.token_input

    def run_int(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Integer logits (int32) for input ``x`` of shape (N, *input shape), or a dict of token tensors."""
        return self.run_trace(x)["logits"]

    def run_trace(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every value of the graph (by value name; the integer logits under ``"logits"``) for input ``x``."""
        env = self.inputs(x)
        with torch.inference_mode():
            for node in self.nodes:
                env[node.output] = self._step(node, [env[i] for i in node.inputs])
        return env

    def value_ranges(self) -> dict[str, tuple[int, int]]:
        """``[lo, hi]`` of every integer value, from the producing node (ReLU raises ``lo`` to 0)."""
        return self.graph.value_ranges()

    def __call__(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Float logits: the integer logits times the output scale."""
        return (self.run_int(x).to(torch.float64) * self.output_scale).to(torch.float32)

    def inputs(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The graph's input values from ``x`` (checked): a tensor, or for token graphs a dict by input name
        (other keys, such as ``labels``, are ignored)."""
        if not self.token_input:
            self._check_input(x)
            return {self.graph.inputs[0]: x}
        if not isinstance(x, Mapping):
            raise LowbitError(f"{self.source}: the model takes a dict of token tensors "
                              f"({', '.join(self.graph.inputs)}), got {type(x).__name__}")
        missing = [k for k in self.graph.inputs if k not in x]
        if missing:
            raise LowbitError(f"{self.source}: input {missing[0]!r} is missing (the model takes "
                              f"{', '.join(self.graph.inputs)})")
        shape, n = list(self.input_spec["shape"]), None
        for k in self.graph.inputs:
            t = x[k]
            if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise LowbitError(f"{self.source}: input {k!r} must be an integer tensor, got "
                                  f"{getattr(t, 'dtype', type(t).__name__)}")
            if list(t.shape[1:]) != shape or (n is not None and t.shape[0] != n):
                raise LowbitError(f"{self.source}: input {k!r} has shape {tuple(t.shape)}; the model takes "
                                  f"(N, {', '.join(map(str, shape))}) for every input (pad to {shape[-1]} tokens)")
            n = t.shape[0]
        return {k: x[k].to(torch.int64) for k in self.graph.inputs}

    def _step(self, node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
        """One node's reference kernel (other backends call it for ops they have no kernel for)."""
        return self._kernels[node.op](node, self.params[node.name], xs)

    def _check_input(self, x: torch.Tensor) -> None:
        shape = self.input_spec.get("shape")
        if shape is not None and list(x.shape[1:]) != list(shape):
            raise LowbitError(f"{self.source}: input shape {tuple(x.shape)} does not match the model's "
                              f"(N, {', '.join(map(str, shape))})")
        if self.pixel_input and x.dtype != torch.uint8:
            raise LowbitError(f"{self.source}: the model takes uint8 pixels, got {x.dtype}")
        if not self.pixel_input and not x.dtype.is_floating_point:
            raise LowbitError(f"{self.source}: the model takes float input, got {x.dtype}")


# ------------------------------------------------------------------------------------------------ kernels
@kernel("quantize_input", backend="reference")
def _quantize_input(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    x, a = xs[0], node.attrs
    if "lut" in p:
        c = torch.arange(x.shape[1], device=x.device).reshape(1, -1, *([1] * (x.dim() - 2))) * 256
        return p["lut"].to(x.device).reshape(-1)[c + x.to(torch.int64)].to(torch.int32)
    scale = torch.tensor(a["scale"], dtype=torch.float32)
    return (x.to(torch.float32) / scale).clamp(a["lo"], a["hi"]).round().to(torch.int32)


@kernel("conv2d", backend="reference")
def _conv2d(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    acc = conv2d_int(xs[0], p["weight"], a["stride"], a["padding"], a["groups"], a["dilation"])
    return requantize(acc, p["multiplier"], p["shift"], p["bias"], lo=a["lo"], hi=a["hi"], axis=1)


@kernel("conv2d_add", backend="reference")
def _conv2d_add(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    acc = conv2d_int(xs[0], p["weight"], a["stride"], a["padding"], a["groups"], a["dilation"])
    return requantize_sum(acc, p["multiplier"], p["shift"], p["bias"], xs[1], p["residual_multiplier"], lo=a["lo"],
                          hi=a["hi"], axis=1)


@kernel("linear", backend="reference")
def _linear(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    acc = linear_int(xs[0], p["weight"])
    return requantize(acc, p["multiplier"], p["shift"], p["bias"], lo=a["lo"], hi=a["hi"], axis=-1)


@kernel("requantize", backend="reference")
def _requantize(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return requantize(xs[0], a["multiplier"], a["shift"], a["bias"], lo=a["lo"], hi=a["hi"])


@kernel("add", backend="reference")
def _add(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return add_requant(xs[0], xs[1], a["multiplier_a"], a["multiplier_b"], a["shift"], bias=a["bias"],
                       lo=a["lo"], hi=a["hi"])


@kernel("relu", backend="reference")
def _relu(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return relu_int(xs[0])


@kernel("maxpool2d", backend="reference")
def _maxpool2d(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return maxpool_int(xs[0], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])


@kernel("avgpool2d", backend="reference")
def _avgpool2d(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return avgpool_int(xs[0], a["kernel_size"], a["stride"], a["padding"], multiplier=a["multiplier"],
                       shift=a["shift"], bias=a["bias"], lo=a["lo"], hi=a["hi"])


@kernel("adaptive_avgpool", backend="reference")
def _adaptive_avgpool(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return adaptive_avgpool_int(xs[0], a["output_size"], multiplier=a["multiplier"], shift=a["shift"],
                                bias=a["bias"], lo=a["lo"], hi=a["hi"])


@kernel("flatten", backend="reference")
def _flatten(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.flatten(xs[0], node.attrs["start_dim"])


@kernel("clamp", backend="reference")
def _clamp(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return clamp_int(xs[0], node.attrs["lo"], node.attrs["hi"])


@kernel("concat", backend="reference")
def _concat(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs, dim=node.attrs["axis"])


@kernel("upsample_nearest", backend="reference")
def _upsample_nearest(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return upsample_nearest_int(xs[0], node.attrs["scale"])


@kernel("dequantize_output", backend="reference")
def _dequantize_output(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0]  # the integer logits; __call__ applies the scale


# ------------------------------------------------------------------------------ encoder ops (token graphs)
@kernel("quantize", backend="reference")
def _quantize(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    scale = torch.tensor(a["scale"], dtype=torch.float32)
    return (xs[0].to(torch.float32) / scale).clamp(a["lo"], a["hi"]).round().to(torch.int32)


@kernel("dequantize", backend="reference")
def _dequantize(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return (xs[0].to(torch.float64) * node.attrs["scale"]).to(torch.float32)


@kernel("matmul", backend="reference")
def _matmul(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    acc = matmul_int(xs[0], xs[1])
    return requantize(acc, a["multiplier"], a["shift"], a["bias"], lo=a["lo"], hi=a["hi"])


@kernel("embedding", backend="reference")
def _embedding(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    ids, w = xs[0], p["weight"]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]):
        raise LowbitError(f"{node.name}: token ids must lie in [0, {w.shape[0]}), got "
                          f"[{int(ids.min())}, {int(ids.max())}]")
    return F.embedding(ids.to(torch.int64), w)


@kernel("constant", backend="reference")
def _constant(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return p["value"]


def binary(fn: str, a: torch.Tensor, b: torch.Tensor | float, reverse: bool = False) -> torch.Tensor:
    """``a fn b`` (``b fn a`` when ``reverse``) with ATen's float32 arithmetic."""
    if reverse:
        a, b = b, a
    return {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[fn](a, b)


@kernel("binary", backend="reference")
def _binary(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    if len(xs) == 2:
        return binary(a["fn"], xs[0], xs[1])
    return binary(a["fn"], xs[0], a["scalar"], a.get("reverse", False))


@kernel("layer_norm", backend="reference")
def _layer_norm(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    w = p["weight"]
    return F.layer_norm(xs[0], list(w.shape), w, p["bias"], node.attrs["eps"])


@kernel("softmax", backend="reference")
def _softmax(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.softmax(xs[0], node.attrs["dim"])


@kernel("gelu", backend="reference")
def _gelu(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return F.gelu(xs[0], approximate=node.attrs["approximate"])


@kernel("tanh", backend="reference")
def _tanh(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.tanh(xs[0])


@kernel("float_linear", backend="reference")
def _float_linear(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return F.linear(xs[0], p["weight"], p.get("bias"))


@kernel("float_matmul", backend="reference")
def _float_matmul(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.matmul(xs[0], xs[1])


def additive_mask(mask: torch.Tensor, fill: float, square: bool) -> torch.Tensor:
    """``where(mask != 0, 0, fill)`` in float32 as (N, 1, 1, T), expanded to (N, 1, T, T) when ``square``."""
    zero = torch.zeros((), dtype=torch.float32)
    out = torch.where(mask[:, None, None, :] != 0, zero, torch.tensor(fill, dtype=torch.float32))
    t = mask.shape[-1]
    return out.expand(mask.shape[0], 1, t, t) if square else out


@kernel("attention_mask", backend="reference")
def _attention_mask(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return additive_mask(xs[0], node.attrs["fill"], node.attrs["square"])


@kernel("reshape", backend="reference")
def _reshape(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].reshape(xs[0].shape[0], *node.attrs["shape"])


@kernel("transpose", backend="reference")
def _transpose(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].transpose(node.attrs["dim0"], node.attrs["dim1"])


@kernel("select", backend="reference")
def _select(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].select(node.attrs["dim"], node.attrs["index"])


@kernel("slice", backend="reference")
def _slice(node: Node, p: Params, xs: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    index = [slice(None)] * xs[0].dim()
    index[a["dim"]] = slice(a["start"], a["end"], a["step"])
    return xs[0][tuple(index)]


def load(path: str | os.PathLike) -> IntegerModel:
    """Shorthand for :meth:`IntegerModel.load`."""
    return IntegerModel.load(path)
