"""Integer-model export: capture (torch.fx), lowering to dyadic integer nodes, the ``.lowbit`` file, ONNX.

    from lowbit.export import export_run, export_model
    export_run("runs/w4a4", "model.lowbit")                       # a `lowbit quantize` run
    export_model(model, "m.lowbit", input_shape=(1, 28, 28), pixels={"mean": 0.286, "std": 0.353})

What a ``.lowbit`` file computes is defined by :mod:`lowbit.runtime.engine`; :class:`Simulation` is the
independent re-implementation on the PyTorch model that must agree with it bit for bit.
"""

from lowbit.export.exporter import ExportResult, Lowered, export_model, export_run, lower_model
from lowbit.export.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    OPS,
    OpSpec,
    load_codes,
    pack_tensor,
    read_model,
    register_op,
    validate_manifest,
    write_model,
)
from lowbit.export.packing import SUPPORTED_BITS, code_range, pack, packed_nbytes, unpack
from lowbit.export.simulate import Simulation
from lowbit.export.verify import format_report, verify

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "OPS", "ExportResult", "Lowered", "OpSpec", "SUPPORTED_BITS", "Simulation",
    "code_range", "export_model", "export_onnx", "export_run", "format_report", "load_codes", "lower_model", "pack",
    "pack_tensor", "packed_nbytes", "read_model", "register_op", "unpack", "validate_manifest", "verify",
    "write_model",
]


def export_onnx(model, path, int4: bool = True):
    """QDQ ONNX export of a loaded :class:`lowbit.runtime.IntegerModel` (needs the onnx package)."""
    from lowbit.export.onnx_export import export_onnx as _export_onnx

    return _export_onnx(model, path, int4=int4)
