"""Model checkpoints in run directories: what to save so a model can be rebuilt without pickled code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import load_checkpoint
from lowbit.models import create_model

CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_path(run: str | Path) -> Path:
    """Accept a run directory or a checkpoint file."""
    p = Path(run)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    elif not p.exists():
        raise LowbitError(f"{run}: no such run directory or checkpoint")
    return p


def model_spec(model_name: str, model_kwargs: dict[str, Any], num_classes: int,
               input_shape: tuple[int, ...], data: str, val_fraction: float | None = None) -> dict[str, Any]:
    spec = {"model": model_name, "model_kwargs": dict(model_kwargs), "num_classes": num_classes,
            "input_shape": list(input_shape), "data": data}
    if val_fraction is not None:  # only when set, so specs of runs on the default split compare as before
        spec["val_fraction"] = val_fraction
    return spec


def spec_data_options(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The split and image size a run was trained with, so later stages select on the same validation images."""
    spec = spec or {}
    opts: dict[str, Any] = {}
    if spec.get("val_fraction") is not None:
        opts["val_fraction"] = spec["val_fraction"]
    if spec.get("data") == "imagefolder" and spec.get("input_shape"):
        opts["image_size"] = int(spec["input_shape"][-1])
    return opts


def build_model(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the (fp32 or quantized) model a checkpoint describes and load its weights."""
    spec = ckpt.get("spec")
    if not isinstance(spec, dict) or "model" not in spec:
        raise LowbitError("checkpoint has no model description (spec); it was not written by lowbit")
    model = create_model(spec["model"], spec["num_classes"], **spec.get("model_kwargs", {}))
    if ckpt.get("kind") == "quantized":
        from lowbit.quant import Plan, QuantConfig, build_quantized

        return build_quantized(model, Plan.from_dict(ckpt["plan"]), QuantConfig.from_dict(ckpt["quant_config"]),
                               ckpt["state_dict"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise LowbitError(f"checkpoint weights do not fit model {spec['model']!r}: {str(e).splitlines()[0]}") from None
    return model


def load_run_model(run: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    ckpt = load_checkpoint(checkpoint_path(run))
    return build_model(ckpt), ckpt
