"""Export a quantized model (or a ``lowbit quantize`` run) to a ``.lowbit`` integer model.

    result = export_model(model, "model.lowbit", input_shape=(1, 28, 28), pixels=FMNIST_PIXELS)
    result = export_model(bert, "bert.lowbit", example={"input_ids": ids, "attention_mask": mask, ...})
    result = export_run("runs/w4a4", "model.lowbit")      # model, plan and normalisation from the run

The model is captured with torch.fx (:mod:`lowbit.export.capture`), lowered to integer nodes with dyadic
requantization (:mod:`lowbit.export.lower`) and written as the integer IR with the validating writer of
:mod:`lowbit.ir.format`. What the written file computes is defined by the op table (:mod:`lowbit.ir.ops`) and
the reference backend's kernels. A model called with a dict of token tensors (an ``example`` batch: a Hugging
Face encoder) goes through :mod:`lowbit.export.encoder` instead (``torch.export``, integer GEMMs with float
glue, format version 2).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.capture import FNode, capture
from lowbit.export.lower import WIDE_FRAC_BITS, Program, lower
from lowbit.ir.dyadic import EPILOGUE_MAX_ERROR
from lowbit.ir.format import FORMAT_NAME, FORMAT_VERSION, write_model

ROUNDING = "half_to_even"


@dataclass
class Lowered:
    """A model captured and lowered, before writing: what the simulation and the writer need."""

    model: nn.Module
    fnodes: list[FNode]
    program: Program
    input: dict[str, Any]

    def manifest(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON manifest: graph, declared tensors, input description, rounding rule and ``extra``."""
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "inputs": ["input"], "outputs": ["logits"],
            "graph": [n.to_json() for n in self.program.graph], "tensors": self.program.entries, "input": self.input,
            "rounding": ROUNDING, "wide_frac_bits": WIDE_FRAC_BITS, "layers": self.program.layers,
            **({"activations": self.program.activations} if self.program.activations else {}),
            "epilogue_error": self.program.epilogue_error,
            **(extra or {}),
        }


@dataclass
class ExportResult:
    """Where the model went and how big it is next to its fp32 weights."""

    path: Path
    file_bytes: int
    fp32_bytes: int
    lowered: Any = None  # Lowered (images) or LoweredEncoder (tokens)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """fp32 bytes / file bytes (how many times smaller the export is)."""
        return self.fp32_bytes / max(1, self.file_bytes)

    def summary(self) -> str:
        return (f"{self.path}: {_mib(self.file_bytes)} vs fp32 weights {_mib(self.fp32_bytes)} "
                f"({self.ratio:.1f}x smaller)")


def lower_model(model: nn.Module, input_shape: tuple[int, ...], pixels: dict[str, Any] | None = None,
                epilogue_error: float | None = None) -> Lowered:
    """Capture and lower an eval-mode copy of ``model`` for inputs of ``input_shape`` (no batch dim).

    ``pixels``: ``{"mean": m, "std": s}`` (scalars or per channel) when the model reads uint8 images
    normalised as ``(p / 255 - mean) / std``; the exported model then takes the uint8 pixels. None: the
    exported model takes the float input the PyTorch model takes. ``epilogue_error``: see :func:`export_model`.
    """
    epilogue_error = check_epilogue_error(epilogue_error)
    model = copy.deepcopy(model).cpu().float().eval()
    input_shape = tuple(int(d) for d in input_shape)
    example = torch.zeros((1, *input_shape))
    fnodes = capture(model, example)
    program = lower(fnodes, pixels, epilogue_error)
    spec = {"shape": list(input_shape), "dtype": "uint8" if pixels else "float32"}
    if pixels:
        spec.update(mean=_as_list(pixels["mean"]), std=_as_list(pixels["std"]))
    return Lowered(model, fnodes, program, spec)


def export_model(model: nn.Module, path: str | os.PathLike, *, input_shape: tuple[int, ...] | None = None,
                 pixels: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                 example: Mapping[str, torch.Tensor] | None = None, epilogue_error: float | None = None
                 ) -> ExportResult:
    """Export ``model`` (quantized with :func:`lowbit.quant.quantize_`, calibrated) to ``path``.

    ``input_shape``: the one input tensor of an image model; ``example``: instead, a batch of the token tensors
    an encoder is called with (``model(**example)``), which fixes the sequence length of the export.

    ``epilogue_error``: how many output steps a requantization narrowed for an int8 kernel's float32 epilogue may
    move a value (default :data:`~lowbit.ir.dyadic.EPILOGUE_MAX_ERROR`, 2^-10). A conv that writes codes runs
    its requantization inside the kernel (the CPU fast path's fastest form) only where a multiplier of about
    ``24 - log2(range)`` bits is exact there; a larger budget lets more layers do so, above all convs whose
    residual add is fused (their window is wider), at the cost of fidelity to the fake-quant model: a value
    within ``epilogue_error`` of a rounding tie may round the other way (the file and every backend still agree
    bit for bit; :func:`lowbit.deploy.check_lowering` widens its tolerance to match).

    Raises:
        LowbitError: a layer or operation the integer format cannot express (named), or an unwritable path.
    """
    if example is not None:
        if not isinstance(example, Mapping):
            raise LowbitError("example must be a dict of token tensors (model(**example)); give an image model "
                              "input_shape instead")
        if epilogue_error is not None:
            raise LowbitError("epilogue_error applies to image models (the encoder export requantizes in float glue)")
        return export_encoder(model, path, example, metadata)
    if input_shape is None:
        raise LowbitError("export_model needs input_shape (one input tensor) or example (a dict of token tensors)")
    lowered = lower_model(model, input_shape, pixels, epilogue_error)
    fp32 = fp32_weight_bytes(model)
    extra = {"fp32_weight_bytes": fp32, **(metadata or {})}
    path = write_model(path, lowered.manifest(extra), lowered.program.tensors)
    return ExportResult(Path(path), Path(path).stat().st_size, fp32, lowered)


def export_encoder(model: nn.Module, path: str | os.PathLike, example: Mapping[str, torch.Tensor],
                   metadata: dict[str, Any] | None = None) -> ExportResult:
    """Export an encoder called with token tensors (:mod:`lowbit.export.encoder`) to ``path`` (version 2)."""
    from lowbit.export.encoder import lower_encoder

    model = copy.deepcopy(model).cpu().float().eval()
    lowered = lower_encoder(model, example)
    fp32 = fp32_weight_bytes(model)
    path = write_model(path, lowered.manifest({"fp32_weight_bytes": fp32, **(metadata or {})}), lowered.program.tensors)
    return ExportResult(Path(path), Path(path).stat().st_size, fp32, lowered)


def check_epilogue_error(value: float | None) -> float:
    """``value`` (None: the default) as a float in ``(0, 0.5]``, or one-line LowbitError."""
    if value is None:
        return EPILOGUE_MAX_ERROR
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LowbitError(f"epilogue_error must be a number of output steps, got {value!r}") from None
    if not 0 < value <= 0.5:
        raise LowbitError(f"epilogue_error must be in (0, 0.5] output steps (default {EPILOGUE_MAX_ERROR:g}), got "
                          f"{value:g}")
    return value


def fp32_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's float state (weights, biases, BN statistics) without the quantizers' steps:
    what the fp32 model's weights occupy."""
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if "_quantizer." not in name)


def run_input_spec(ckpt: dict[str, Any]) -> tuple[tuple[int, ...], dict[str, Any] | None]:
    """Input shape and pixel normalisation of a run's data set: uint8 pixels for lowbit's image sets, the float
    tensor the model takes for a user's data."""
    spec = ckpt.get("spec", {})
    shape = tuple(spec.get("input_shape") or ())
    data = spec.get("data", "fashion-mnist")
    if not shape:
        if ":" in str(data):
            raise LowbitError("the exported integer model takes one input tensor, but this run's model is called "
                              "with several inputs (e.g. a dict); export it with lowbit.export.export_model and "
                              "its own example input")
        raise LowbitError("the run's checkpoint does not record its input shape")
    if ":" in str(data) and not str(data).startswith(("tv:", "timm:")):  # the user's own data: float input
        return shape, None
    if data in ("fashion-mnist", "fmnist"):
        from lowbit.data.datasets import FMNIST_MEAN, FMNIST_STD

        return shape, {"mean": FMNIST_MEAN, "std": FMNIST_STD}
    if data == "synthetic":
        from lowbit.data import synthetic

        ds = synthetic(n_train=1, n_val=1, n_test=1, shape=shape).train
        return shape, {"mean": ds.mean, "std": ds.std}
    if data == "imagefolder":
        from lowbit.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD

        return shape, {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    raise LowbitError(f"unknown data set {data!r} in the run's checkpoint: cannot tell its input normalisation")


def export_run(run: str | os.PathLike, out: str | os.PathLike, epilogue_error: float | None = None) -> ExportResult:
    """Export the model of a ``lowbit quantize`` run directory; reports the size against the fp32 run
    (``epilogue_error``: :func:`export_model`'s)."""
    from lowbit.train.checkpoint import CHECKPOINT_NAME
    from lowbit.train.quantize import load_quantized_run

    model, ckpt = load_quantized_run(run)
    spec = ckpt["spec"]
    example = _token_example(ckpt)
    if example is None:
        shape, pixels = run_input_spec(ckpt)
    meta = {"model": {"name": spec["model"], "kwargs": spec.get("model_kwargs", {}),
                      "num_classes": spec["num_classes"]},
            "data": spec.get("data"), "plan": ckpt.get("plan"), "quant_config": ckpt.get("quant_config"),
            "data_spec": {k: spec[k] for k in ("data", "data_args", "val_fraction") if spec.get(k) is not None},
            "source": {"quantized_run": str(run), "fp32_run": ckpt.get("source")}}
    if example is not None:
        result = export_model(model, out, example=example, metadata=meta, epilogue_error=epilogue_error)
    else:
        result = export_model(model, out, input_shape=shape, pixels=pixels, metadata=meta,
                              epilogue_error=epilogue_error)
    fp32_ckpt = Path(ckpt["source"]) / CHECKPOINT_NAME if ckpt.get("source") else None
    if fp32_ckpt is not None and fp32_ckpt.is_file():
        result.info["fp32_checkpoint_bytes"] = fp32_ckpt.stat().st_size
    return result


def _token_example(ckpt: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Two validation examples of a run whose model is called with a dict of tensors (an encoder), else None."""
    spec = ckpt.get("spec", {})
    if spec.get("input_shape") or ":" not in str(spec.get("data", "")):
        return None
    from lowbit.train.checkpoint import run_data

    example = run_data(spec).example(2)
    return dict(example) if isinstance(example, Mapping) else None


def _as_list(v: Any) -> list[float]:
    return [float(v)] if isinstance(v, (int, float)) else [float(x) for x in v]


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB" if n >= 2**16 else f"{n / 1024:.1f} KiB"
