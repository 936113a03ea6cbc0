"""Integer runtime: the backends that read the integer IR (:mod:`lowbit.ir`): the reference interpreter (the
definition) and its exact kernels, the oneDNN int8 CPU fast path (bit-exact) and the GPU path. Each registers
one kernel per op it runs (:mod:`lowbit.ir.kernels`); the runtime never imports the exporter.

    from lowbit.runtime import IntegerModel, FastModel
    model = IntegerModel.load("model.lowbit")      # validates the whole file
    logits = model(images_uint8)                   # integer arithmetic, logits dequantized once
    fast = FastModel(model)                        # same integers, oneDNN int8 kernels + one compiled graph
    fast = fast_model(model)                       # FastEncoderModel for an encoder (token inputs), else FastModel
    fast = FastModel(model, capability="avx2")     # paths for an AVX2-only CPU (or LOWBIT_CPU_ISA=avx2|vnni|amx)
    gpu = GpuModel(model)                          # CUDA: exact fp8/int8 tensor-core GEMMs (emulate=True: CPU)
"""

from lowbit.ir.dyadic import requantize, round_shift, to_dyadic, to_dyadic_common, to_fixed
from lowbit.runtime.engine import IntegerModel, load
from lowbit.runtime.fast_encoder import FastEncoderModel, compare_encoder, fast_model
from lowbit.runtime.fastpath import CAPABILITIES, FastModel, cpu_capability, forced_capability
from lowbit.runtime.gpu import GpuModel, LayerPath, fp8_bounds_ok, fp8_exact
from lowbit.runtime.reference import (
    adaptive_avgpool_int,
    add_requant,
    avgpool_int,
    clamp_int,
    conv2d_int,
    linear_int,
    maxpool_int,
    relu_int,
    sumpool_int,
    upsample_nearest_int,
)

__all__ = [
    "CAPABILITIES", "FastEncoderModel", "FastModel", "GpuModel", "IntegerModel", "LayerPath", "adaptive_avgpool_int",
    "add_requant", "avgpool_int", "clamp_int", "compare_encoder", "conv2d_int", "cpu_capability", "fast_model",
    "forced_capability", "fp8_bounds_ok", "fp8_exact", "linear_int", "load", "maxpool_int", "relu_int", "requantize",
    "round_shift", "sumpool_int", "to_dyadic", "to_dyadic_common", "to_fixed", "upsample_nearest_int",
]
