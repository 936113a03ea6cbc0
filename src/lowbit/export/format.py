"""The ``.lowbit`` file lives in :mod:`lowbit.ir.format` (ops in :mod:`lowbit.ir.ops`); this module keeps the
old import path."""

from lowbit.ir.format import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_KEY,
    load_codes,
    pack_tensor,
    read_model,
    validate_manifest,
    write_model,
)
from lowbit.ir.ops import OPS, OpSpec, register_op

__all__ = ["DTYPES", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_KEY", "OPS", "OpSpec", "load_codes", "pack_tensor",
           "read_model", "register_op", "validate_manifest", "write_model"]
