"""The quantization workflow: ``quantize_`` -> ``calibrate_`` -> build the optimizer -> fine-tune.

    plan = Plan.preset("w4a4", model)                 # first/last layers at 8-bit
    quantize_(model, plan, QuantConfig(method="lsq"))  # swap Conv2d/Linear for QuantConv2d/QuantLinear
    calibrate_(model, batches)                         # initialise every step
    optimizer = torch.optim.SGD(model.parameters(), ...)  # only now: LSQ steps are Parameters

Rebuilding a saved model needs only the float architecture, the plan, the config and the state dict:
see :func:`build_quantized`.

With ``QuantConfig.residual_bits`` the residual adds are quantized too and ``quantize_`` returns a new model (a
``torch.fx`` GraphModule with the same modules): keep the returned model, ``model = quantize_(model, ...)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.data.protocol import call_model, split_batch, to_device
from lowbit.errors import LowbitError
from lowbit.quant.config import QuantConfig
from lowbit.quant.modules import QUANT_LAYERS, QuantAct, QuantConv2d, QuantLinear, QuantMatmul
from lowbit.quant.plan import Plan, is_quantizable, is_transformer
from lowbit.quant.quantizers import _Quantizer, check_bits
from lowbit.quant.residual import quantize_residuals

QuantLayer = QuantConv2d | QuantLinear


def _as_plan(plan: Plan | Mapping | str, model: nn.Module) -> Plan:
    """A preset name (``"w4a4"``) for this model, else the one conversion every entry point uses."""
    return Plan.preset(plan, model) if isinstance(plan, str) else Plan.coerce(plan)


def _as_config(config: QuantConfig | Mapping | None) -> QuantConfig:
    if config is None:
        return QuantConfig()
    return config if isinstance(config, QuantConfig) else QuantConfig.from_dict(dict(config))


def quantize_(model: nn.Module, plan: Plan | Mapping | str, config: QuantConfig | Mapping | None = None
              ) -> nn.Module:
    """Replace, in place, every Conv2d/Linear listed in ``plan`` by a QuantConv2d/QuantLinear.

    Layers planned ``(None, None)`` or not listed stay as they are. The plan is validated before anything
    changes. Returns ``model`` for chaining. Steps are not initialised yet: call :func:`calibrate_`.
    A Hugging Face transformer switches to eager attention (:func:`lowbit.models.hf.use_eager_attention_`);
    with ``config.quantize_matmuls`` its attention matmuls are quantized too
    (:func:`lowbit.models.hf.quantize_matmuls_`).

    With ``config.residual_bits`` it returns a *new* model that must be used from then on: ``model`` traced by
    ``torch.fx`` with a QuantAct after every residual add (:func:`lowbit.quant.residual.quantize_residuals`),
    holding the same layers, names and parameters. ``model`` itself has its layers swapped, but its adds
    stay float. A model fx cannot trace is refused before anything changes.
    """
    config = _as_config(config)
    plan = _as_plan(plan, model)
    plan.validate(model)
    if config.residual_bits is not None:  # check that its adds can be quantized before swapping anything
        quantize_residuals(model, config.residual_bits, config)
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
    if is_transformer(model) and hasattr(getattr(model, "config", None), "_attn_implementation"):
        from lowbit.models.hf import use_eager_attention_  # lazy: transformers is optional

        use_eager_attention_(model)  # a Hugging Face model: eager maths (second derivatives, quantized matmuls)
    if config.quantize_matmuls:
        from lowbit.models.hf import quantize_matmuls_

        if not quantize_matmuls_(model, plan, config):
            raise LowbitError("quantize_matmuls: no attention block with a quantized query projection was found")
    if config.residual_bits is not None:
        return quantize_residuals(model, config.residual_bits, config)
    return model


def quant_matmuls(model: nn.Module) -> dict[str, QuantMatmul]:
    """All quantized matmuls (attention's Q·Kᵀ and softmax·V) of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantMatmul)}


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """All quantized layers of ``model`` by name, in ``named_modules()`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def quant_acts(model: nn.Module) -> dict[str, QuantAct]:
    """All standalone activation quantizers (residual stream, ``QuantConfig.residual_bits``) of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantAct)}


def plan_of(model: nn.Module) -> Plan:
    """Read the plan back from a model: every quantizable layer, ``(None, None)`` for float ones."""
    return Plan({name: (m.w_bits, m.a_bits) if isinstance(m, QUANT_LAYERS) else (None, None)
                 for name, m in model.named_modules() if is_quantizable(m)})


def _batch_input(batch: Any, device: torch.device | None) -> Any:
    """The model inputs of a batch (tensor, ``(inputs, target)`` or dict; see lowbit.data.protocol)."""
    return to_device(split_batch(batch)[0], device)


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
        call_model(model, _batch_input(batch, device))
        n += 1
    if n == 0:
        raise LowbitError("calibration needs at least one batch, got none")
    return n


def calibrate_(model: nn.Module, batches: Iterable) -> nn.Module:
    """Initialise every quantizer's step; call it after :func:`quantize_` and before building the optimizer.

    ``batches`` yields input tensors, ``(inputs, target)`` tuples or dicts (``model(**inputs)``, e.g.
    ``input_ids`` + ``attention_mask``); a DataLoader works as it is. The model runs in eval mode under no_grad with
    all quantizers passing data through unchanged, so activation statistics come from the *unquantized*
    network (residual QuantActs included): LSQ takes its activation step from the first batch, FAQ and MinMax
    use all batches. Weight steps come from the weights. Signedness of inputs is detected here unless the config
    fixes it. Re-calibrating re-initialises everything; LSQ step Parameters keep their identity.
    """
    layers = quant_layers(model)
    if not layers:
        raise LowbitError("model has no quantized layers: call lowbit.quant.quantize_(model, plan) first")
    inputs = {name: m.input_quantizer for name, m in layers.items()
              if m.input_quantizer is not None and not m.shares_input}  # a shared one is its QuantAct's
    for name, mm in quant_matmuls(model).items():  # both operands of a matmul are activations
        for side, q in (("a", mm.a_quantizer), ("b", mm.b_quantizer)):
            if q is not None:
                inputs[f"{name}.{side}"] = q
    acts = quant_acts(model)
    for name, act in acts.items():  # the residual stream is an activation too
        inputs[name] = act.input_quantizer
    weights = [layer.weight_quantizer for layer in layers.values() if layer.weight_quantizer is not None]
    with _observing(model, [*inputs.values(), *weights]):  # weight quantizers just pass weights through
        _run(model, batches)
    idle = [name for name, q in inputs.items() if q._n_observed == 0]
    if idle:
        extra = ", or remove QuantAct modules the forward does not call" if any(n in acts for n in idle) else ""
        raise LowbitError(f"layers never ran during calibration: {', '.join(idle)}; leave them float in the "
                          f"plan (or quantize only their weights){extra}")
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
    would scale it for the new Q_P (LSQ: ``sqrt(old_Q_P/new_Q_P)``; MinMax and FAQ: ``old_Q_P/new_Q_P``, FAQ with
    power-of-two ranges ``(old_Q_P+1)/(new_Q_P+1)``, which keeps the range).
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
    if new is None or layer.shares_input:  # the residual stream's step, not this layer's to reset
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
    With ``residual_bits`` in the config the model is traced again and its QuantActs get the names they had; a layer
    that would share a QuantAct's step (``share_residual_steps``) but was saved with a step of its own keeps its own.
    """
    model = quantize_(model_fp, plan, config)
    for name, layer in quant_layers(model).items():  # saved with a step of its own (a layout from before sharing,
        if layer.shares_input and f"{name}.input_quantizer.step" in state_dict:  # or reset_layer_): keep it
            layer.own_input_quantizer_()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise LowbitError("state dict does not match the plan and model: "
                          + " ".join(line.strip() for line in first[:4])[:400]) from None
    return model


__all__ = ["QuantConfig", "build_quantized", "calibrate_", "plan_of", "quant_acts", "quant_layers", "quant_matmuls",
           "quantize_", "reset_layer_"]
