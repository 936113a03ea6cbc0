"""The typed integer graph every backend reads: :class:`Graph` of :class:`Node` with decoded tensors.

The file stores the graph as JSON (:mod:`lowbit.ir.format`); :meth:`Graph.from_manifest` turns a validated
manifest into typed nodes, unpacks each node's tensors and checks every node against the op table
(:mod:`lowbit.ir.ops`): attribute values and tensor dtypes/shapes, then shapes through the graph on the meta
device, so a mismatched file fails at load with a :class:`LowbitError`, not in a backend mid-run.

Two kinds of graph exist. An *image* graph (format version 1: every CNN export) has one input, starts with
``quantize_input`` and is integer throughout. A *token* graph (version 2: encoders) takes several int64 inputs of
one shape (``input_ids``, ``attention_mask``, ``token_type_ids``), mixes integer nodes with float glue and marks
each node's domain; both end with ``dequantize_output`` (integer logits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.ir.dyadic import INT32_MAX, INT32_MIN
from lowbit.ir.format import load_codes, read_model
from lowbit.ir.ops import op_spec


@dataclass
class Node:
    """One op application: ``outputs = op(inputs; attrs, params)``; ``params`` maps tensor roles to the names
    of tensors in the file (decoded ones are in :attr:`Graph.params`)."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    domain: str | None = None  # "int" or "float": marked in version-2 files, derived from the op otherwise

    @property
    def output(self) -> str:
        return self.outputs[0]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Node:
        return cls(d["op"], d["name"], list(d["inputs"]), list(d["outputs"]), dict(d.get("attrs", {})),
                   dict(d.get("params", {})), d.get("domain"))

    def to_json(self) -> dict[str, Any]:
        d = {"op": self.op, "name": self.name, "inputs": self.inputs, "outputs": self.outputs, "attrs": self.attrs}
        if self.params:
            d["params"] = self.params
        return {**d, "domain": self.domain} if self.domain is not None else d


@dataclass
class Graph:
    """A validated integer model: nodes in execution order, their decoded tensors and every value's shape.

    ``manifest`` keeps the file's other keys (input normalisation, layer table, plan, provenance);
    ``shapes`` maps each value to its shape without the batch dimension, ``ranges`` each value to its declared
    ``[lo, hi]`` (as :meth:`value_ranges`, filled at load: the add and concat checks bound their inputs by it).
    """

    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    input_spec: dict[str, Any]
    entries: dict[str, dict[str, Any]]
    params: dict[str, dict[str, torch.Tensor]]
    manifest: dict[str, Any]
    source: str = "model"
    shapes: dict[str, list[int]] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Graph:
        """Read, validate and decode a ``.lowbit`` file (:class:`LowbitError` naming the file if anything is
        wrong)."""
        manifest, tensors = read_model(path)
        return cls.from_manifest(manifest, tensors, source=str(path))

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], source: str = "model"
                      ) -> Graph:
        """The graph of a manifest already validated by :func:`~lowbit.ir.format.validate_manifest` (as
        :func:`~lowbit.ir.format.read_model` does), checked node by node against the op table."""
        nodes = [Node.from_json(n) for n in manifest["graph"]]
        graph = cls(nodes, list(manifest["inputs"]), list(manifest["outputs"]), manifest.get("input") or {},
                    manifest["tensors"], {}, manifest, source)
        try:
            for node in nodes:
                graph.params[node.name] = {role: load_codes(manifest, tensors, key)
                                           for role, key in node.params.items()}
            graph._check()
        except LowbitError as e:
            raise LowbitError(f"{source}: {e}") from None
        return graph

    # ------------------------------------------------------------------------------------------- lookups
    def node(self, name: str) -> Node:
        """The node called ``name``."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise LowbitError(f"{self.source}: no node named {name!r}")

    def producer(self, value: str) -> Node | None:
        """The node that computes ``value`` (None for a graph input)."""
        return self._producers().get(value)

    def readers(self, value: str) -> list[Node]:
        """The nodes that read ``value``, in execution order."""
        return [n for n in self.nodes if value in n.inputs]

    def _producers(self) -> dict[str, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def value_ranges(self) -> dict[str, tuple[int, int]]:
        """``[lo, hi]`` of every integer value, from the producing node (ReLU raises ``lo`` to 0)."""
        ranges: dict[str, tuple[int, int]] = {}
        for node in self.nodes:
            ranges[node.output] = _declared_range(node, ranges)
        return ranges

    @property
    def output_scale(self) -> float:
        """Real value of one unit of the integer logits."""
        return float(self.nodes[-1].attrs["scale"])

    @property
    def pixel_input(self) -> bool:
        """Whether the model takes uint8 pixels (else the float input of the PyTorch model, or tokens)."""
        return self.input_spec.get("dtype") == "uint8"

    @property
    def token_input(self) -> bool:
        """Whether the model takes int64 token tensors by name (an encoder: ``model({"input_ids": ...})``)."""
        return self.input_spec.get("dtype") == "int64"

    def to_manifest(self) -> dict[str, Any]:
        """The manifest again, with the graph from the typed nodes."""
        return {**self.manifest, "graph": [n.to_json() for n in self.nodes]}

    # ---------------------------------------------------------------------------------------- validation
    def _check(self) -> None:
        """Graph structure, every node against its op spec, and shapes through the graph (meta tensors)."""
        nodes = self.nodes
        version = self.manifest.get("version", 1)
        if self.token_input:
            if version < 2:
                raise LowbitError("int64 token inputs need format version 2")
            if not nodes or nodes[-1].op != "dequantize_output" or sum(n.op == "dequantize_output" for n in nodes) != 1:
                raise LowbitError("the graph must end with its only dequantize_output")
            if any(n.op == "quantize_input" for n in nodes):
                raise LowbitError("a graph of token inputs has no quantize_input (it quantizes float values inside)")
        else:
            if not nodes or nodes[0].op != "quantize_input" or nodes[-1].op != "dequantize_output":
                raise LowbitError("the graph must start with quantize_input and end with dequantize_output")
            if sum(n.op in ("quantize_input", "dequantize_output") for n in nodes) != 2:
                raise LowbitError("the graph needs exactly one quantize_input and one dequantize_output")
            if len(self.inputs) != 1:
                raise LowbitError(f"an image graph takes one input, found {len(self.inputs)}")
        if self.outputs != ["logits"] or nodes[-1].outputs != ["logits"]:
            raise LowbitError(f"the graph's output must be 'logits', written by its dequantize_output (found outputs "
                              f"{self.outputs}, dequantize_output writing {nodes[-1].outputs})")
        shape = self.input_spec.get("shape")
        if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
            raise LowbitError(f"manifest 'input' needs a positive integer 'shape', got {shape!r}")
        dtype = torch.int64 if self.token_input else torch.float32
        meta = {i: torch.empty((1, *shape), dtype=dtype, device="meta") for i in self.inputs}
        self.domains = {i: "int" for i in self.inputs}
        self.shapes.update({i: list(shape) for i in self.inputs})
        self.ranges.update({i: (INT32_MIN, INT32_MAX) for i in self.inputs})  # as value_ranges assumes
        for node in nodes:
            spec = op_spec(node.op)
            where = f"node {node.name!r} ({node.op})"
            try:
                if version >= 2 and node.domain not in ("int", "float"):
                    raise LowbitError(f"format version {version} marks every node's domain ('int' or 'float'), "
                                      f"found {node.domain!r}")
                if spec.takes is not None:
                    wrong = [i for i in node.inputs if self.domains[i] != spec.takes]
                    if wrong:
                        raise LowbitError(f"takes {spec.takes} values, but {wrong[0]!r} is {self.domains[wrong[0]]}")
                domain = self.domains[node.inputs[0]] if spec.domain == "same" else spec.domain
                if node.domain is not None and node.domain != domain:
                    raise LowbitError(f"is marked {node.domain!r}, but its output is {domain}")
                node.domain = node.domain or (domain if version >= 2 else None)
                self.domains[node.output] = domain
                if spec.check is not None:
                    spec.check(node, self.params[node.name], self)
                if spec.shape is None:
                    raise LowbitError(f"op {node.op!r} has no shape rule")
                out = spec.shape(node, self.params[node.name], [meta[i] for i in node.inputs])
                meta[node.output] = out
                self.shapes[node.output] = list(out.shape[1:])
                self.ranges[node.output] = _declared_range(node, self.ranges)
            except LowbitError as e:
                raise LowbitError(f"{where}: {e}") from None
            except (RuntimeError, ValueError, TypeError, KeyError, IndexError, ArithmeticError) as e:
                raise LowbitError(f"{where}: does not fit its input: {str(e).splitlines()[0][:200]}") from None


def _declared_range(node: Node, ranges: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """``[lo, hi]`` of ``node``'s output: its own (validated) range if its op has one, else its first input's
    (graph inputs: int32); ReLU raises ``lo`` to 0."""
    if "lo" in op_spec(node.op).attrs:
        return node.attrs["lo"], node.attrs["hi"]
    r = ranges.get(node.inputs[0], (INT32_MIN, INT32_MAX)) if node.inputs else (INT32_MIN, INT32_MAX)
    return (max(0, r[0]), max(0, r[1])) if node.op == "relu" else r


def load_graph(path: str | os.PathLike) -> Graph:
    """Shorthand for :meth:`Graph.load`."""
    return Graph.load(path)


__all__ = ["Graph", "Node", "load_graph"]
