"""Which layers a mixed-precision search may drop to 2 bits, and their MACs and sizes.

Candidates are the quantized layers whose *weights* are below 8 bits, except the layers the preset keeps at 8
bits by role (:func:`lowbit.quant.layer_roles`): for CNNs the first and last executed quantizable layers (LSQ
keeps the stem and the classifier at 8 bits, methods.md §1.2 step 0), for transformers the head (pooler,
classifier); embeddings are float and never quantized. So a W4A4 network's candidates are its 4/4 layers and a
W4A8 network's are its 4/8 layers: the activation precision does not exclude a layer, the weight precision does.
Dropping a candidate sets it to ``low_bits`` for weights *and* inputs (``drop_layers_``, the knapsack's
``(low_bits, low_bits)``), so on a W4A8 plan a dropped layer goes to W2A2; EAGL scores only the weight codes
either way. ``include_first_last=True`` makes every quantized layer a candidate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.cost import LayerInfo, profile_layers
from lowbit.errors import LowbitError
from lowbit.quant import layer_roles, quant_layers
from lowbit.sensitivity.table import SensitivityRow

Candidates = Iterable[str] | str | None


def candidate_layers(model: nn.Module, candidates: Candidates = None, include_first_last: bool = False
                     ) -> list[str]:
    """Names of the candidate layers in module order.

    Args:
        model: a quantized model (after ``quantize_``).
        candidates: explicit names (a list, or one comma-separated string); None applies the default rule.
        include_first_last: also make the first/last and the 8-bit layers candidates.
    """
    layers = quant_layers(model)
    if not layers:
        raise LowbitError("the model has no quantized layers: sensitivity needs a quantized (W4A4) model")
    if isinstance(candidates, str):
        candidates = [c.strip() for c in candidates.split(",") if c.strip()]
    if candidates is not None:
        wanted = list(dict.fromkeys(candidates))
        unknown = [n for n in wanted if n not in layers]
        if unknown:
            raise LowbitError(f"candidates are not quantized layers of the model: {', '.join(unknown[:3])}; "
                              f"quantized layers: {', '.join(list(layers)[:8])}{' ...' if len(layers) > 8 else ''}")
        names = [n for n in layers if n in wanted]
    elif include_first_last:
        names = list(layers)
    else:
        roles = layer_roles(model)
        names = [n for n, m in layers.items() if roles.get(n) == "body" and m.w_bits is not None and m.w_bits < 8]
    if not names:
        raise LowbitError("no candidate layers: every quantized layer is a first/last, head or 8-bit-weight layer; "
                          "pass candidates or include_first_last=True")
    return names


def example_input(model_input_shape: Iterable[int] | None = None, data: Any = None) -> Any:
    """A batch-1 input for MAC profiling: the first validation example's inputs (a tensor, or a dict for
    models called as ``model(**inputs)``, so MACs follow the user's sequence length), or zeros of
    ``model_input_shape``."""
    if data is not None:
        return data.example(1)
    if model_input_shape is None:
        raise LowbitError("need the model's input shape (or data) to count MACs")
    return torch.zeros(1, *model_input_shape)


def profile(model: nn.Module, x: Any) -> dict[str, LayerInfo]:
    """``{name: LayerInfo}`` from one traced example on the model's device, or ``{}`` without an example."""
    from lowbit.data import to_device

    if x is None:
        return {}
    p = next(model.parameters(), None)
    return {li.name: li for li in profile_layers(model, to_device(x, p.device) if p is not None else x)}


def make_rows(model: nn.Module, names: list[str], scores: dict[str, float], infos: dict[str, LayerInfo],
              extra: dict[str, dict[str, Any]] | None = None) -> tuple[SensitivityRow, ...]:
    layers = quant_layers(model)
    return tuple(SensitivityRow(n, float(scores[n]), infos[n].macs if n in infos else None,
                                layers[n].weight.numel(), dict((extra or {}).get(n, {}))) for n in names)


def as_rng(random_state: int | np.random.Generator | None) -> np.random.Generator:
    """sklearn's convention: None = fresh entropy, an int = a fixed seed, a Generator is used as is."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is not None and (isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer))):
        raise LowbitError(f"random_state must be an int, None or a numpy Generator, got {random_state!r}")
    return np.random.default_rng(random_state)


__all__ = ["as_rng", "candidate_layers", "example_input", "make_rows", "profile"]
