"""Integer-model export: capture (torch.fx), lowering to the integer IR with dyadic constants, ONNX.

    from lowbit.export import export_run, export_model
    export_run("runs/w4a4", "model.lowbit")                       # a `lowbit quantize` run
    export_model(model, "m.lowbit", input_shape=(1, 28, 28), pixels={"mean": 0.286, "std": 0.353})

Export only writes the IR (:mod:`lowbit.ir`); what a ``.lowbit`` file computes is defined by the op table and
the reference backend. :class:`Simulation` re-implements the lowering's arithmetic on the PyTorch model.
Checking an export against the runtime (``verify``, the lowering check) sits above both, in
:mod:`lowbit.deploy`.
"""

from lowbit.export.exporter import ExportResult, Lowered, export_model, export_run, lower_model
from lowbit.export.simulate import Simulation
from lowbit.ir.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    load_codes,
    pack_tensor,
    read_model,
    validate_manifest,
    write_model,
)
from lowbit.ir.ops import OPS, OpSpec, register_op
from lowbit.ir.packing import SUPPORTED_BITS, code_range, pack, packed_nbytes, unpack

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "OPS", "ExportResult", "Lowered", "OpSpec", "SUPPORTED_BITS", "Simulation",
    "code_range", "export_model", "export_onnx", "export_run", "load_codes", "lower_model", "pack", "pack_tensor",
    "packed_nbytes", "read_model", "register_op", "unpack", "validate_manifest", "write_model",
]


def export_onnx(model, path, int4: bool = True):
    """QDQ ONNX export of a :class:`lowbit.ir.Graph` or a loaded runtime model (needs the onnx package)."""
    from lowbit.export.onnx_export import export_onnx as _export_onnx

    return _export_onnx(model, path, int4=int4)
