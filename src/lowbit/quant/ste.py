"""Straight-through estimators: the value of one function, the gradient of another.

Written with the ``detach`` idiom of the LSQ paper rather than ``autograd.Function`` so they are
traceable, compile cleanly and need no hand-written backward.
"""

from __future__ import annotations

from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass (gradient 1)."""
    return (x.round() - x).detach() + x


def grad_scale(x: Tensor, g: float | Tensor) -> Tensor:
    """``x`` in the forward pass; multiplies the gradient flowing into ``x`` by ``g``.

    LSQ uses it on the step size only, so the step learns at a rate comparable to the weights. ``g`` may be a
    0-d tensor (no gradient flows into it), which keeps it out of a compiled graph's constants.
    """
    return (x - x * g).detach() + x * g


def clamp_min_ste(x: Tensor, min_value: float) -> Tensor:
    """``max(x, min_value)`` in the forward pass, identity in the backward pass.

    Keeps a learned step strictly positive without cutting its gradient: a plain ``clamp_min`` gives
    zero gradient below the bound, so a step pushed there by one large update could never come back.
    The forward value is the clamp itself plus an exact zero (``x - x.detach()``): the usual
    ``x + (clamp(x) - x).detach()`` rounds ``min_value - x`` to ``-x`` once ``|x| >> min_value`` (float32:
    ``x`` below about -0.3 for 1e-8) and so returns exactly 0, a step that divides zero inputs into NaN.
    """
    return x.detach().clamp_min(min_value) + (x - x.detach())


__all__ = ["clamp_min_ste", "grad_scale", "round_ste"]
