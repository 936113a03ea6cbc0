"""The integer IR: the one contract between the exporter (which writes it) and every backend (which reads it).

    from lowbit.ir import Graph
    graph = Graph.load("model.lowbit")             # validated against the op table, tensors decoded
    graph.producer("v3"), graph.readers("v3")      # typed Node lookups

* :mod:`~lowbit.ir.ops`: the op table (schema, validation, shape rule per op, registered once);
* :mod:`~lowbit.ir.graph`: :class:`Graph` and :class:`Node`;
* :mod:`~lowbit.ir.format`: the ``.lowbit`` file (safetensors + JSON manifest) and its validating reader;
* :mod:`~lowbit.ir.dyadic`: dyadic requantization arithmetic (round half to even), shared by lowering and
  backends; :mod:`~lowbit.ir.packing`: bit packing of weight codes;
* :mod:`~lowbit.ir.kernels`: per-backend kernel registries checked against the op table.
"""

from lowbit.ir.dyadic import requantize, round_shift, to_dyadic, to_dyadic_common, to_fixed
from lowbit.ir.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_KEY,
    load_codes,
    pack_tensor,
    read_model,
    validate_manifest,
    write_model,
)
from lowbit.ir.graph import Graph, Node, load_graph
from lowbit.ir.kernels import BACKENDS, kernel, kernel_or_fallback, kernels, missing_kernels, require_kernels
from lowbit.ir.ops import OPS, OpSpec, op_spec, register_op, unregister_op
from lowbit.ir.packing import code_range, pack, packed_nbytes, unpack

__all__ = [
    "BACKENDS", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_KEY", "OPS", "Graph", "Node", "OpSpec", "code_range",
    "kernel", "kernel_or_fallback", "kernels", "load_codes", "load_graph", "missing_kernels", "op_spec", "pack",
    "pack_tensor", "packed_nbytes", "read_model", "register_op", "require_kernels", "requantize", "round_shift",
    "to_dyadic", "to_dyadic_common", "to_fixed", "unpack", "unregister_op", "validate_manifest", "write_model",
]
