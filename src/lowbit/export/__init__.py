"""Integer-model export: bit-packing of codes and the `.lowbit` file (safetensors + JSON manifest)."""

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

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "OPS", "OpSpec", "SUPPORTED_BITS", "code_range", "load_codes", "pack",
    "pack_tensor", "packed_nbytes", "read_model", "register_op", "unpack", "validate_manifest", "write_model",
]
