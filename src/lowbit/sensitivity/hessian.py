"""Hessian-trace sensitivity: the HAWQ-V2/V3 baseline (methods.md §1.3, performance.md §6).

HAWQ-V3 weighs each layer's quantisation perturbation by its average Hessian trace [R]:

    Ω_l = Tr(H_l) / n_l · ||Q(W_l) - W_l||²

with H_l the diagonal block of the loss Hessian for layer l's weights, n_l its weight count and Q the 2-bit
quantizer with its initial step (LSQ: ``2·mean|w|/sqrt(Q_P)``), i.e. the perturbation a drop would cause.

Traces come from Hutchinson's estimator (Hutchinson 1990; PyHessian, Yao et al. 2020): for Rademacher vectors
v (entries ±1), E[vᵀHv] = Tr(H). One Hessian-vector product per batch is a double backward through the
(quantized W4A4, eval-mode) network's loss; the per-layer products v_lᵀ(Hv)_l come from the same HVP, so the
cost does not grow with the number of layers. Each iteration draws one v and averages vᵀHv over the batches
(weighted by batch size); the estimate is the running mean over iterations. It stops, as PyHessian's
``trace(maxIter, tol)`` does, when the running total trace changes by less than ``tol`` relative to its
previous value, or after ``max_iter`` iterations. Cost: iterations × batches × (forward + backward + HVP).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.data import batch_len, call_model, head, split_batch
from lowbit.errors import LowbitError
from lowbit.progress import progress
from lowbit.quant import make_quantizer, quant_layers
from lowbit.sensitivity.candidates import Candidates, as_rng, candidate_layers, make_rows, profile
from lowbit.sensitivity.table import SensitivityTable
from lowbit.train.loop import default_loss


def hutchinson_traces(model: nn.Module, params: list[Tensor], batches: list, *, tol: float = 1e-2,
                      max_iter: int = 100, generator: torch.Generator | None = None, quiet: bool = True,
                      loss_fn: Callable | None = None, rse: float | None = None,
                      ) -> tuple[np.ndarray, dict[str, int | bool | list[float]]]:
    """Per-parameter Hessian-trace estimates of the mean loss over ``batches`` (any batch of
    :mod:`lowbit.data.protocol`; ``loss_fn(outputs, batch)``, cross-entropy by default).

    Returns ``(traces, info)``: one trace per tensor in ``params``, and ``iterations``, ``converged``, the
    pass counts, the running total after each iteration (``history``) and each estimate's relative standard
    error (``relative_se``: the standard error of the mean over iterations / |mean|). With ``rse`` the stopping
    rule is per layer instead of on the total: stop once every layer's relative standard error is below it
    (at least 3 iterations), the rule a ranking of noisy per-layer traces needs.
    """
    if not batches:
        raise LowbitError("the Hessian trace needs at least one batch of data")
    if not 0 < tol or max_iter < 1:
        raise LowbitError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    modes = {m: m.training for m in model.modules()}
    needs = [p.requires_grad for p in params]
    model.eval()  # BN uses running statistics: the loss the deployed network sees
    for p in params:
        p.requires_grad_(True)
    sizes = [batch_len(split_batch(b)[0]) for b in batches]
    total_n = sum(sizes)
    sums = np.zeros(len(params))
    per_iter: list[np.ndarray] = []
    history: list[float] = []
    forward = hvp = 0
    converged = False
    try:
        bar = progress(range(max_iter), desc="Hutchinson", quiet=quiet, unit="iteration", leave=False)
        for it in bar:
            vhv = np.zeros(len(params))
            for batch, k in zip(batches, sizes):
                inputs, y = split_batch(batch)
                out = call_model(model, inputs)
                loss = default_loss(out, y) if loss_fn is None else loss_fn(out, batch)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                vs = [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
                      for p in params]
                hv = torch.autograd.grad(grads, params, grad_outputs=vs)
                vhv += k / total_n * np.array([float((v * h).sum()) for v, h in zip(vs, hv)])
                forward, hvp = forward + 1, hvp + 1
            sums += vhv
            per_iter.append(vhv)
            history.append(float(sums.sum() / (it + 1)))
            bar.set_postfix(trace=f"{history[-1]:.4g}")
            if rse is not None:
                if it >= 2 and float(_relative_se(per_iter).max()) < rse:
                    converged = True
                    break
            elif it > 0 and abs(history[-1] - history[-2]) / (abs(history[-2]) + 1e-6) < tol:
                converged = True
                break
    finally:
        for p, r in zip(params, needs):
            p.requires_grad_(r)
        for m, training in modes.items():
            m.training = training
    iterations = len(history)
    return sums / iterations, {"iterations": iterations, "converged": converged, "forward": forward,
                               "backward": forward, "hvp": hvp, "history": history,
                               "relative_se": _relative_se(per_iter).tolist()}


def _relative_se(per_iter: list[np.ndarray]) -> np.ndarray:
    """Standard error of each layer's mean estimate over iterations, relative to |mean| (inf with one draw)."""
    draws = np.stack(per_iter)
    if len(draws) < 2:
        return np.full(draws.shape[1], np.inf)
    se = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    return se / np.maximum(np.abs(draws.mean(axis=0)), 1e-30)


@torch.no_grad()
def low_bit_error(layer: nn.Module, low_bits: int = 2) -> float:
    """``||Q(W) - W||²`` with ``Q`` the layer's quantizer type at ``low_bits``, step from its init rule."""
    w = layer.weight.detach()
    q = make_quantizer(layer.quant_config, low_bits, "weight", signed=True).to(w)
    q.init_from_(w)
    return float((q(w) - w).square().sum())


def hessian_scores(model: nn.Module, batches: Iterable, candidates: Candidates = None, *, tol: float = 1e-2,
                   max_iter: int = 100, random_state: int | np.random.Generator | None = None,
                   low_bits: int = 2, include_first_last: bool = False, quiet: bool = True,
                   loss_fn: Callable | None = None, rse: float | None = None) -> SensitivityTable:
    """HAWQ-style scores ``Tr(H_l)/n_l · ||Q2(W_l) - W_l||²``; higher = keep at 4 bits (module docstring).

    Args:
        model: the trained quantized model; the Hessian is of its fake-quantized loss, BN in eval mode.
        batches: validation batches on the model's device (tensors, tuples or dicts); all are used in every
            iteration.
        candidates: layer names; default: all quantized layers but the first, last and 8-bit ones.
        tol: relative change of the total trace estimate below which the iterations stop (PyHessian: 1e-3;
            1e-2 by default here, since only the ranking of the layers matters).
        max_iter: most iterations (each: one Rademacher vector, one HVP per batch).
        random_state: seed of the Rademacher vectors (sklearn convention).
        rse: stop when every layer's trace has a relative standard error below this (e.g. 0.1) instead of
            on ``tol``; ``max_iter`` still caps the iterations and the table reports each layer's error.
    """
    t0 = time.perf_counter()
    names = candidate_layers(model, candidates, include_first_last)
    layers = quant_layers(model)
    batches = list(batches)
    seed = int(as_rng(random_state).integers(2**62))
    device = layers[names[0]].weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    traces, info = hutchinson_traces(model, [layers[n].weight for n in names], batches, tol=tol,
                                     max_iter=max_iter, generator=gen, quiet=quiet, loss_fn=loss_fn, rse=rse)
    scores, extra = {}, {}
    for n, tr, rel in zip(names, traces, info["relative_se"]):
        n_w = layers[n].weight.numel()
        err = low_bit_error(layers[n], low_bits)
        scores[n] = tr / n_w * err
        extra[n] = {"trace": float(tr), "trace_per_param": float(tr / n_w), "quant_error": err,
                    "trace_relative_se": float(rel)}
    wall = time.perf_counter() - t0
    rows = make_rows(model, names, scores, profile(model, head(split_batch(batches[0])[0], 1)), extra)
    passes = {"forward": info["forward"], "backward": info["backward"], "hvp": info["hvp"], "epochs": 0.0}
    config = {"tol": tol, "rse": rse, "max_relative_se": float(max(info["relative_se"])),
              "max_iter": max_iter, "iterations": info["iterations"], "converged": info["converged"],
              "seed": seed, "batches": len(batches), "examples": sum(batch_len(split_batch(b)[0]) for b in batches),
              "low_bits": low_bits, "include_first_last": include_first_last, "trace_history": info["history"]}
    return SensitivityTable("hessian", rows, wall, passes, config)


__all__ = ["hessian_scores", "hutchinson_traces", "low_bit_error"]
