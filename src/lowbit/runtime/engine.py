"""The integer reference runtime: runs a ``.lowbit`` model with integer arithmetic only.

This is the definition of what an exported model computes (the op table, :mod:`lowbit.ir.ops`, lists each
op's formula). Between the input lookup (or the input quantizer, for float inputs) and the single
dequantization of the logits every value is an integer tensor, every conv/linear is an exact integer product
(:mod:`lowbit.runtime.reference`) and every change of scale is one dyadic requantization rounded half to even
(:mod:`lowbit.ir.dyadic`). Each op's kernel is registered once, ``@kernel(op, backend="reference")``; a graph
with an op that has no reference kernel is refused at load.

Loading validates the file (:class:`lowbit.ir.Graph`: parameter shapes and dtypes, constant ranges, and
shapes through the graph on the meta device), so a mismatched file fails at load with a
:class:`LowbitError`, not mid-run.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.ir.dyadic import requantize
from lowbit.ir.graph import Graph, Node
from lowbit.ir.kernels import kernel, require_kernels
from lowbit.runtime.reference import (
    adaptive_avgpool_int,
    add_requant,
    avgpool_int,
    clamp_int,
    conv2d_int,
    linear_int,
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

    def run_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer logits (int32) for input ``x`` of shape (N, *input shape)."""
        return self.run_trace(x)["logits"]

    def run_trace(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every integer value of the graph (by value name; the logits under ``"logits"``) for input ``x``."""
        self._check_input(x)
        env = {self.graph.inputs[0]: x}
        with torch.inference_mode():
            for node in self.nodes:
                env[node.output] = self._step(node, [env[i] for i in node.inputs])
        return env

    def value_ranges(self) -> dict[str, tuple[int, int]]:
        """``[lo, hi]`` of every integer value, from the producing node (ReLU raises ``lo`` to 0)."""
        return self.graph.value_ranges()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits: the integer logits times the output scale."""
        return (self.run_int(x).to(torch.float64) * self.output_scale).to(torch.float32)

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


def load(path: str | os.PathLike) -> IntegerModel:
    """Shorthand for :meth:`IntegerModel.load`."""
    return IntegerModel.load(path)
