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


def model_spec(model_name: str, model_kwargs: dict[str, Any], num_classes: int | None,
               input_shape: tuple[int, ...] | None, data: str, val_fraction: float | None = None, *,
               data_args: dict[str, Any] | None = None, loss: str | None = None) -> dict[str, Any]:
    """What rebuilds a run's model and data in a later stage: names or the user's import paths and their args."""
    spec = {"model": model_name, "model_kwargs": dict(model_kwargs), "num_classes": num_classes,
            "input_shape": None if input_shape is None else list(input_shape), "data": data}
    # optional keys only when set, so specs of runs on the defaults compare as before
    for key, value in (("val_fraction", val_fraction), ("data_args", data_args or None), ("loss", loss)):
        if value is not None:
            spec[key] = value
    return spec


def resolve_loss(loss: Any):
    """A loss function from its import path (as recorded in a run), a callable as given, or None (default)."""
    if loss is None or callable(loss):
        return loss
    from lowbit.plugins import import_callable

    return import_callable(loss, "loss function")


def loss_name(loss: Any) -> str | None:
    """How a run records a loss: its import path; a callable by ``module:qualname``."""
    if loss is None or isinstance(loss, str):
        return loss
    return f"{loss.__module__}:{loss.__qualname__}"


def spec_data_options(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The split and image size a run was trained with, so later stages select on the same validation images."""
    spec = spec or {}
    opts: dict[str, Any] = {}
    if spec.get("data_args"):
        opts["data_args"] = spec["data_args"]
    if spec.get("val_fraction") is not None:
        opts["val_fraction"] = spec["val_fraction"]
    if spec.get("data") == "imagefolder" and spec.get("input_shape"):
        opts["image_size"] = int(spec["input_shape"][-1])
    return opts


def run_data(spec: dict[str, Any] | None, data: str | None = None, data_dir: str | None = None, **kw):
    """The data set of a run (``data`` None or the run's own: same split, args and image size), or ``data``."""
    from lowbit.data import get_data

    spec = spec or {}
    name = data or spec.get("data") or "fashion-mnist"
    own = spec_data_options(spec) if name == spec.get("data") else {}
    return get_data(name, data_dir, **{**own, **{k: v for k, v in kw.items() if v is not None}})


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
