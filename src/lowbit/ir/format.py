"""The ``.lowbit`` integer-model file: one safetensors blob plus a versioned JSON manifest.

The tensors (bit-packed weight codes, int32 multipliers, int8 shifts, int64 fixed-point biases) are stored as
safetensors, which is a plain header + raw bytes format, so reading a file never executes code. The
manifest is a JSON string in the safetensors metadata under ``"lowbit_manifest"``::

    {
      "format": "lowbit-integer-model",
      "version": 1,
      "inputs": ["x"],                       # graph input value names
      "outputs": ["logits"],                 # graph output value names
      "graph": [                             # nodes in execution (topological) order
        {"op": "conv2d", "name": "layer1.0.conv1",
         "inputs": ["v3"], "outputs": ["v4"],
         "attrs": {"stride": [1, 1], "padding": [1, 1], "groups": 1, "w_bits": 4, ...},
         "params": {"weight": "layer1.0.conv1.weight", "multiplier": "layer1.0.conv1.multiplier", ...}},
        ...
      ],
      "tensors": {                           # every tensor in the file, declared
        "layer1.0.conv1.weight": {"dtype": "uint8", "shape": [64, 64, 3, 3], "bits": 4, "signed": true},
        "layer1.0.conv1.multiplier": {"dtype": "int32", "shape": [64]}
      }
    }

A tensor entry with ``bits`` is bit-packed (:mod:`lowbit.ir.packing`): it is stored as a 1-D uint8
tensor of ``ceil(prod(shape) * bits / 8)`` bytes and ``shape`` is the shape of its codes. Other top-level
keys (provenance, scales for reports) are kept as they are. Ops and their required attributes and tensor
roles live in the op table (:mod:`lowbit.ir.ops`). The exporter writes this file; backends read it as a
validated :class:`~lowbit.ir.graph.Graph` (:meth:`Graph.load <lowbit.ir.graph.Graph.load>`).

Versions: 1 is the integer image model (every CNN export, and every file earlier lowbit wrote: they load
unchanged). 2 adds what an encoder needs: several named int64 inputs (``"input": {"dtype": "int64", "shape":
[T]}``, one shape for all), float glue ops and a ``"domain": "int" | "float"`` on every node; the exporter writes
version 2 only for such graphs, so an older lowbit refuses an encoder file by its version (one line saying to
upgrade) instead of failing on an unknown op. A file of another version is refused with the versions this lowbit
reads.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from lowbit.errors import LowbitError
from lowbit.io import atomic_write_bytes
from lowbit.ir.ops import OPS
from lowbit.ir.packing import pack, packed_nbytes, unpack
from lowbit.quant.bits import SUPPORTED_BITS

FORMAT_NAME = "lowbit-integer-model"
FORMAT_VERSION = 1  # what image (CNN) exports write
TOKEN_FORMAT_VERSION = 2  # encoders: several int64 inputs, float glue, per-node domains
READ_VERSIONS = (1, 2)
MANIFEST_KEY = "lowbit_manifest"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "float32": torch.float32, "float64": torch.float64,
}


def write_model(path: str | os.PathLike, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Validate ``manifest`` against ``tensors`` and write both as one ``.lowbit`` file, atomically.

    Raises:
        LowbitError: the manifest or tensors are invalid (nothing is written).
    """
    path = Path(path)
    try:
        validate_manifest(manifest)
        _check_tensors(manifest, tensors)
        text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    except (LowbitError, TypeError, ValueError) as e:
        raise LowbitError(f"cannot write {path}: {_one_line(e)}") from None
    flat = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    return atomic_write_bytes(path, safetensors.torch.save(flat, metadata={MANIFEST_KEY: text}))


def read_model(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and fully validate a ``.lowbit`` file; returns ``(manifest, tensors)``.

    Raises:
        LowbitError: one line naming ``path``: missing, not safetensors (truncated, garbage, a pickle),
            no manifest, an unknown format version, a schema error or a tensor that does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        metadata = _safetensors_metadata(data)
        tensors = safetensors.torch.load(data)
    except Exception as e:  # the safetensors parser raises several types on bad input
        raise LowbitError(f"{path}: not a .lowbit file (not valid safetensors: {_one_line(e)})") from None
    if MANIFEST_KEY not in metadata:
        raise LowbitError(f"{path}: not a .lowbit file (safetensors without a {MANIFEST_KEY!r} manifest)")
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except (ValueError, RecursionError) as e:  # also nesting too deep, an integer of too many digits
        raise LowbitError(f"{path}: manifest is not valid JSON ({_one_line(e)})") from None
    try:
        validate_manifest(manifest)
        _check_tensors(manifest, tensors)
    except LowbitError as e:
        raise LowbitError(f"{path}: {e}") from None
    return manifest, tensors


def validate_manifest(manifest: Any) -> None:
    """Check schema, version, ops and dataflow; raises :class:`LowbitError` on the first problem."""
    _require(isinstance(manifest, dict), "manifest must be a JSON object")
    _require(manifest.get("format") == FORMAT_NAME,
             f"manifest format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("version")
    _require(type(version) is int, f"manifest version must be an integer, got {version!r}")
    _require(version in READ_VERSIONS, f"format version {version} is not supported "
                                       f"(this lowbit reads versions {', '.join(map(str, READ_VERSIONS))}); "
                                       f"upgrade lowbit")
    for key, kind in (("inputs", list), ("outputs", list), ("graph", list), ("tensors", dict)):
        _require(isinstance(manifest.get(key), kind), f"manifest needs {key!r} as a JSON {kind.__name__}")
    _require(isinstance(manifest.get("input", {}), dict), "manifest 'input' must be a JSON object")
    for name, entry in manifest["tensors"].items():
        _check_tensor_entry(name, entry)
    defined = set(_str_list(manifest["inputs"], "manifest 'inputs'", nonempty=True))
    names = set()
    for i, node in enumerate(manifest["graph"]):
        where = f"graph node {i}"
        _require(isinstance(node, dict), f"{where} must be a JSON object")
        op, name = node.get("op"), node.get("name")
        _require(isinstance(name, str) and name, f"{where} needs a non-empty string 'name'")
        where = f"graph node {i} ({name!r})"
        _require(name not in names, f"{where}: duplicate node name")
        names.add(name)
        _require(isinstance(op, str) and op in OPS, f"{where}: unknown op {op!r} (known: {', '.join(OPS)})")
        spec = OPS[op]
        inputs = _str_list(node.get("inputs"), f"{where} 'inputs'")
        _require(len(inputs) >= spec.arity if spec.variadic else len(inputs) == spec.arity,
                 f"{where}: {op} takes {'at least ' if spec.variadic else ''}{spec.arity} input(s), got {len(inputs)}")
        for v in inputs:
            _require(v in defined, f"{where}: input {v!r} is not a graph input or an earlier node's output")
        attrs = node.get("attrs", {})
        params = node.get("params", {})
        _require(isinstance(attrs, dict), f"{where}: 'attrs' must be a JSON object")
        _require(isinstance(params, dict), f"{where}: 'params' must be a JSON object")
        if version >= 2:
            _require(node.get("domain") in ("int", "float"),
                     f"{where}: format version {version} marks every node's domain ('int' or 'float'), "
                     f"found {node.get('domain')!r}")
        missing = [a for a in spec.attrs if a not in attrs]
        _require(not missing, f"{where}: {op} needs attrs {missing}")
        missing = [p for p in spec.params if p not in params]
        _require(not missing, f"{where}: {op} needs params {missing}")
        for role, tensor in params.items():
            _require(isinstance(tensor, str) and tensor in manifest["tensors"],
                     f"{where}: param {role!r} names tensor {tensor!r}, which is not declared in 'tensors'")
        for v in _str_list(node.get("outputs"), f"{where} 'outputs'", nonempty=True):
            _require(v not in defined, f"{where}: value {v!r} is defined twice")
            defined.add(v)
    for v in _str_list(manifest["outputs"], "manifest 'outputs'", nonempty=True):
        _require(v in defined, f"graph output {v!r} is never computed")


def pack_tensor(codes: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Bit-pack integer ``codes`` and return ``(stored tensor, manifest tensor entry)``."""
    entry = {"dtype": "uint8", "shape": list(codes.shape), "bits": bits, "signed": signed}
    return pack(codes, bits, signed), entry


def load_codes(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The integer tensor ``name`` in its declared shape: unpacked to int32 if packed, else as stored."""
    entry, stored = manifest["tensors"][name], tensors[name]
    if "bits" not in entry:
        return stored
    n = math.prod(entry["shape"])
    try:
        return unpack(stored, entry["bits"], n, entry["signed"]).reshape(entry["shape"])
    except (ValueError, LowbitError) as e:
        raise LowbitError(f"tensor {name!r}: {e}") from None


def _check_tensor_entry(name: Any, entry: Any) -> None:
    where = f"tensor {name!r}"
    _require(isinstance(entry, dict), f"{where}: entry must be a JSON object")
    _require(isinstance(entry.get("dtype"), str) and entry["dtype"] in DTYPES,
             f"{where}: dtype {entry.get('dtype')!r} is not one of {list(DTYPES)}")
    shape = entry.get("shape")
    _require(isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape),
             f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if "bits" in entry:
        _require(entry["bits"] in SUPPORTED_BITS and type(entry["bits"]) is int,
                 f"{where}: bits must be one of {SUPPORTED_BITS}, got {entry['bits']!r}")
        _require(isinstance(entry.get("signed"), bool),
                 f"{where}: a packed tensor needs 'signed': true/false")
        _require(entry["dtype"] == "uint8", f"{where}: a packed tensor is stored as uint8")


def _check_tensors(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Every declared tensor is present with its dtype and (packed) shape, and nothing undeclared is."""
    declared = manifest["tensors"]
    for name in tensors:
        _require(name in declared, f"tensor {name!r} is in the file but not declared in the manifest")
    for name, entry in declared.items():
        _require(name in tensors, f"tensor {name!r} is declared but missing from the file")
        t = tensors[name]
        _require(isinstance(t, torch.Tensor), f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        _require(t.dtype == DTYPES[entry["dtype"]], f"tensor {name!r} is {_dtype_name(t.dtype)}, "
                                                    f"declared {entry['dtype']}")
        if "bits" in entry:
            nbytes = packed_nbytes(math.prod(entry["shape"]), entry["bits"])
            _require(list(t.shape) == [nbytes],
                     f"tensor {name!r}: {math.prod(entry['shape'])} codes of {entry['bits']} bits pack into "
                     f"{nbytes} bytes, found shape {list(t.shape)}")
        else:
            _require(list(t.shape) == entry["shape"],
                     f"tensor {name!r} has shape {list(t.shape)}, declared {entry['shape']}")


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob, read from its length-prefixed JSON header."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, too short for a header")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise ValueError(f"header length {n} exceeds the file")
    header = json.loads(data[8:8 + n])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not a JSON object")
    return metadata


def _str_list(value: Any, what: str, nonempty: bool = False) -> list[str]:
    _require(isinstance(value, list) and all(isinstance(v, str) for v in value),
             f"{what} must be a list of strings")
    _require(not nonempty or value, f"{what} must not be empty")
    return value


def _require(cond: Any, msg: str) -> None:
    if not cond:
        raise LowbitError(msg)


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]

