"""EAGL: Entropy Approximation Guided Layer selection (Bablani et al., arXiv 2301.13330), data-free.

The paper says EAGL "uses the entropy of the weight distribution"; the exact formula was not retrieved, so
this follows the reconstruction in methods.md §1.2 step 1a [I]. For each candidate, take the trained integer
weight codes ``w̄ = round(clip(w / s_w, -Q_N, Q_P))`` with the layer's learned step (16 levels at 4 bits),
histogram them over exactly the quantizer's levels (no bin-width choice) and compute

    H = -Σ_k p_k log2 p_k   (bits; 0 log 0 = 0),  in [0, 4] at 4 bits.

A layer that uses all 16 levels evenly loses most when squeezed into 4 levels, so a high H means *keep at 4
bits*: H is the score. Variants (all configurable, none verified against the paper):

============== ========================================================================================
``h4``         H of the layer's current (4-bit) codes. The default.
``h4-h2``      H4 - H2, H2 from 2-bit codes with the step re-initialised by the layer's quantizer rule
               (LSQ: ``2·mean|w|/sqrt(Q_P)``): the information the drop would remove.
``h4-weighted`` N_W · H4: the layer's total code information in bits, so large layers count more.
============== ========================================================================================

No data, no gradients: O(parameters), milliseconds on a CPU.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.quant import make_quantizer, quant_layers
from lowbit.sensitivity.candidates import Candidates, candidate_layers, make_rows, profile
from lowbit.sensitivity.table import SensitivityTable, no_passes

VARIANTS = ("h4", "h4-h2", "h4-weighted")


def code_entropy(codes: Tensor, q_n: int, q_p: int) -> float:
    """Shannon entropy in bits of integer ``codes`` histogrammed over the levels ``-q_n .. q_p``."""
    codes = codes.reshape(-1).to(torch.int64)
    if codes.numel() == 0:
        raise LowbitError("entropy of an empty code tensor")
    if int(codes.min()) < -q_n or int(codes.max()) > q_p:
        raise LowbitError(f"codes outside the quantizer's levels [{-q_n}, {q_p}]")
    counts = torch.bincount(codes + q_n, minlength=q_n + q_p + 1).double()
    p = counts[counts > 0] / codes.numel()
    return float(-(p * torch.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def layer_entropies(layer: nn.Module, low_bits: int = 2) -> tuple[float, float]:
    """``(H at the layer's bits, H at low_bits)`` of one quantized layer's weight codes."""
    wq = layer.weight_quantizer
    if wq is None:
        raise LowbitError("EAGL needs quantized weights; this layer's weights are float")
    w = layer.weight.detach()
    h = code_entropy(wq.codes(w), wq.q_n, wq.q_p)
    low = make_quantizer(layer.quant_config, low_bits, "weight", signed=True).to(w)
    low.init_from_(w)
    return h, code_entropy(low.codes(w), low.q_n, low.q_p)


def eagl_scores(model: nn.Module, variant: str = "h4", candidates: Candidates = None, *,
                include_first_last: bool = False, example_input: Tensor | None = None,
                low_bits: int = 2) -> SensitivityTable:
    """Entropy scores of the candidate layers of a trained quantized (W4A4) model; higher = keep at 4 bits.

    Args:
        model: the trained quantized model (its learned weight steps define the codes).
        variant: ``"h4"``, ``"h4-h2"`` or ``"h4-weighted"`` (module docstring).
        candidates: layer names; default: all quantized layers but the first, last and 8-bit ones.
        example_input: a batch-1 input to count MACs (rows get ``macs=None`` without it).
        low_bits: the precision a dropped layer gets (for ``h4-h2``).
    """
    if variant not in VARIANTS:
        raise LowbitError(f"unknown EAGL variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    names = candidate_layers(model, candidates, include_first_last)
    layers = quant_layers(model)
    scores, extra = {}, {}
    with torch.no_grad():
        for n in names:
            h, h_low = layer_entropies(layers[n], low_bits)
            n_w = layers[n].weight.numel()
            scores[n] = {"h4": h, "h4-h2": h - h_low, "h4-weighted": n_w * h}[variant]
            extra[n] = {"entropy": h, "entropy_low": h_low, "bits": layers[n].w_bits,
                        "max_entropy": math.log2(layers[n].weight_quantizer.q_n + layers[n].weight_quantizer.q_p + 1)}
    wall = time.perf_counter() - t0
    rows = make_rows(model, names, scores, profile(model, example_input), extra)
    return SensitivityTable("eagl", rows, wall, no_passes(),
                            {"variant": variant, "low_bits": low_bits, "include_first_last": include_first_last})


__all__ = ["VARIANTS", "code_entropy", "eagl_scores", "layer_entropies"]
