"""Integer runtime: the reference interpreter of ``.lowbit`` models (the definition), its exact kernels and
dyadic requantization (round half to even everywhere), and the oneDNN int8 fast path.

    from lowbit.runtime import IntegerModel, FastModel
    model = IntegerModel.load("model.lowbit")      # validates the whole file
    logits = model(images_uint8)                   # integer arithmetic, logits dequantized once
    fast = FastModel(model)                        # same call, PyTorch's int8 kernels
    gpu = GpuModel(model)                          # CUDA: exact fp8/int8 tensor-core GEMMs (emulate=True: CPU)
"""

from lowbit.runtime.dyadic import requantize, round_shift, to_dyadic, to_dyadic_common, to_fixed
from lowbit.runtime.engine import IntegerModel, load
from lowbit.runtime.fastpath import FastModel
from lowbit.runtime.gpu import GpuModel, LayerPath, fp8_bounds_ok, fp8_exact
from lowbit.runtime.reference import (
    adaptive_avgpool_int,
    add_requant,
    avgpool_int,
    conv2d_int,
    linear_int,
    maxpool_int,
    relu_int,
    sumpool_int,
)

__all__ = [
    "FastModel", "GpuModel", "IntegerModel", "LayerPath", "adaptive_avgpool_int", "add_requant", "avgpool_int",
    "conv2d_int", "fp8_bounds_ok", "fp8_exact", "linear_int", "load", "maxpool_int", "relu_int", "requantize",
    "round_shift", "sumpool_int", "to_dyadic", "to_dyadic_common", "to_fixed",
]
