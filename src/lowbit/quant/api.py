"""The quantization workflow: ``quantize_`` -> ``calibrate_`` -> build the optimizer -> fine-tune.

    plan = Plan.preset("w4a4", model)                 # first/last layers at 8-bit
    quantize_(model, plan, QuantConfig(method="lsq"))  # swap Conv2d/Linear for QuantConv2d/QuantLinear
    calibrate_(model, batches)                         # initialise every step
    optimizer = torch.optim.SGD(model.parameters(), ...)  # only now: LSQ steps are Parameters

Rebuilding a saved model needs only the float architecture, the plan, the config and the state dict:
see :func:`build_quantized`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.quant.config import QuantConfig
from lowbit.quant.modules import QUANT_LAYERS, QuantConv2d, QuantLinear
from lowbit.quant.plan import Plan, is_quantizable
from lowbit.quant.quantizers import _Quantizer, check_bits

QuantLayer = QuantConv2d | QuantLinear


def _as_plan(plan: Plan | Mapping | str, model: nn.Module) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        return Plan.preset(plan, model)
    if isinstance(plan, Mapping):
        return Plan.from_dict(plan) if "layers" in plan else Plan(plan)
    raise LowbitError(f"expected a Plan, a preset name or a mapping, got {type(plan).__name__}")


def _as_config(config: QuantConfig | Mapping | None) -> QuantConfig:
    if config is None:
        return QuantConfig()
    return config if isinstance(config, QuantConfig) else QuantConfig.from_dict(dict(config))


def quantize_(model: nn.Module, plan: Plan | Mapping | str, config: QuantConfig | Mapping | None = None
              ) -> nn.Module:
    """Replace, in place, every Conv2d/Linear listed in ``plan`` by a QuantConv2d/QuantLinear.

    Layers planned ``(None, None)`` or not listed stay as they are. The plan is validated before anything
    changes. Returns ``model`` for chaining. Steps are not initialised yet: call :func:`calibrate_`.
    """
    config = _as_config(config)
    plan = _as_plan(plan, model)
    plan.validate(model)
    todo = {name: bits for name, bits in plan.layers.items() if bits != (None, None)}
    if "" in todo:
        raise LowbitError("cannot quantize the model object itself in place; wrap it: nn.Sequential(layer)")
    done = [name for name in todo if isinstance(model.get_submodule(name), QUANT_LAYERS)]
    if done:
        raise LowbitError(f"layers already quantized: {', '.join(done)}; change their bits with reset_layer_")
    for name, (w_bits, a_bits) in todo.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        cls = QuantConv2d if isinstance(old, nn.Conv2d) else QuantLinear
        setattr(parent, child, cls.from_float(old, w_bits, a_bits, cfg=config))
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """All quantized layers of ``model`` by name, in ``named_modules()`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def plan_of(model: nn.Module) -> Plan:
    """Read the plan back from a model: every quantizable layer, ``(None, None)`` for float ones."""
    return Plan({name: (m.w_bits, m.a_bits) if isinstance(m, QUANT_LAYERS) else (None, None)
                 for name, m in model.named_modules() if is_quantizable(m)})


def _batch_input(batch: Any, device: torch.device | None) -> Any:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return x.to(device) if isinstance(x, Tensor) and device is not None else x


@contextmanager
def _observing(model: nn.Module, quantizers: Iterable[_Quantizer]):
    """Eval mode, no grad, ``quantizers`` observing (passing data through); every module's mode restored."""
    quantizers = list(quantizers)
    modes = {m: m.training for m in model.modules()}
    for q in quantizers:
        q._reset_stats()
        q.observing = True
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for q in quantizers:
            q.observing = False
        for m, training in modes.items():
            m.training = training


def _run(model: nn.Module, batches: Iterable) -> int:
    param = next(model.parameters(), None)
    device = None if param is None else param.device
    n = 0
    for batch in batches:
        model(_batch_input(batch, device))
        n += 1
    if n == 0:
        raise LowbitError("calibration needs at least one batch, got none")
    return n


def calibrate_(model: nn.Module, batches: Iterable) -> nn.Module:
    """Initialise every quantizer's step; call it after :func:`quantize_` and before building the optimizer.

    ``batches`` yields input tensors or ``(x, y)`` tuples. The model runs in eval mode under no_grad with
    all quantizers passing data through unchanged, so activation statistics come from the *unquantized*
    network: LSQ takes its activation step from the first batch, FAQ and MinMax use all batches. Weight
    steps come from the weights. Signedness of inputs is detected here unless the config fixes it.
    Re-calibrating re-initialises everything; LSQ step Parameters keep their identity.
    """
    layers = quant_layers(model)
    if not layers:
        raise LowbitError("model has no quantized layers: call lowbit.quant.quantize_(model, plan) first")
    inputs = {name: m.input_quantizer for name, m in layers.items() if m.input_quantizer is not None}
    weights = [layer.weight_quantizer for layer in layers.values() if layer.weight_quantizer is not None]
    with _observing(model, [*inputs.values(), *weights]):  # weight quantizers just pass weights through
        _run(model, batches)
    idle = [name for name, q in inputs.items() if q._n_observed == 0]
    if idle:
        raise LowbitError(f"layers never ran during calibration: {', '.join(idle)}; leave them float in the "
                          "plan (or quantize only their weights)")
    for layer in layers.values():
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.init_from_(layer.weight.detach())
    for q in inputs.values():
        q.finish_observation_()
    return model


def reset_layer_(layer: QuantLayer, w_bits: int | None, a_bits: int | None, batches: Iterable | None = None,
                 *, model: nn.Module | None = None) -> QuantLayer:
    """Change one quantized layer's bits and re-initialise its steps, e.g. to drop it to 2-bit for ALPS.

    The weight step is re-initialised from the weight. The input step comes from ``batches`` if given:
    the layer's own inputs, or, with ``model=``, inputs to ``model`` (run in eval mode, the rest of the
    network quantized as it is). Without batches it is the old input step rescaled as the init rule
    would scale it for the new Q_P (LSQ: ``sqrt(old_Q_P/new_Q_P)``; FAQ/MinMax: ``old_Q_P/new_Q_P``).
    Input signedness is kept. The quantizers are new modules: build the optimizer afterwards.
    """
    if not isinstance(layer, QUANT_LAYERS):
        raise LowbitError(f"reset_layer_ needs a QuantConv2d or QuantLinear, got {type(layer).__name__}")
    w_bits = None if w_bits is None else check_bits(w_bits)
    a_bits = None if a_bits is None else check_bits(a_bits)
    old = layer.input_quantizer
    old_ready = old is not None and old._ready
    if a_bits is not None and batches is None and not old_ready:
        raise LowbitError("the layer has no calibrated input step to rescale: pass batches to reset_layer_")
    layer.set_quantizers_(w_bits, a_bits, input_signed=old.signed if old_ready else None)
    if layer.weight_quantizer is not None:
        layer.weight_quantizer.init_from_(layer.weight.detach())
    new = layer.input_quantizer
    if new is None:
        return layer
    if batches is None:
        new.init_from_step_(old.scale, old.q_p)
        return layer
    if model is None:
        with torch.no_grad():
            for batch in batches:
                new.observe(_batch_input(batch, layer.weight.device))
    else:
        with _observing(model, [new]):
            _run(model, batches)
    if new._n_observed == 0:
        raise LowbitError("reset_layer_: the layer received no input from the given batches")
    new.finish_observation_()
    return layer


def build_quantized(model_fp: nn.Module, plan: Plan | Mapping, config: QuantConfig | Mapping | None,
                    state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Rebuild a saved quantized model: ``quantize_`` a fresh float model, then load weights and steps.

    No calibration is needed afterwards: steps, signedness and ``initialized`` flags are in the state dict.
    """
    model = quantize_(model_fp, plan, config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise LowbitError("state dict does not match the plan and model: "
                          + " ".join(line.strip() for line in first[:4])[:400]) from None
    return model


__all__ = ["QuantConfig", "build_quantized", "calibrate_", "plan_of", "quant_layers", "quantize_",
           "reset_layer_"]
