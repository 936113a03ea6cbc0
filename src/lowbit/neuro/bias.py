"""How far the integer circuit's chain is from the chain it was compiled from (exact, no sampling).

The circuit runs the quantized chain ``P_q`` exactly; the bias is what ``P_q`` changes in the answer: the
distance of its law after the run from ``P``'s law (densities), or of its absorbed field from ``P``'s (heat).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from lowbit.neuro.chain import Chain, propagate
from lowbit.neuro.circuit import quantize_probs
from lowbit.neuro.problems import Problem


def quantized_chain(chain: Chain, bits: int) -> Chain:
    """``chain`` with every probability replaced by its ``bits``-bit circuit weight (zero edges kept)."""
    weights = quantize_probs(chain, bits)
    return Chain(chain.indptr, chain.indices, weights / float(1 << bits), chain.absorbing)


def absorbed_field(chain: Chain, g: np.ndarray) -> np.ndarray:
    """``u = E_x[g(X_tau)]`` on the transient nodes by one sparse solve ``(I - P_TT) u = P_TA g``."""
    p = chain.to_scipy()
    t = ~chain.absorbing
    lhs = sp.eye(int(t.sum())) - p[t][:, t]
    rhs = p[t][:, ~t] @ g[~t]
    u = g.astype(np.float64).copy()
    u[t] = spla.spsolve(lhs.tocsc(), rhs)
    return u


def quantization_bias(problem: Problem, bits: int) -> dict[str, float]:
    """Edge and row errors of the ``bits``-bit weights, and their exact effect on the problem's answer.

    Returns ``max_edge_error`` (largest ``|p_q - p|``), ``max_row_tv`` (largest per-step total variation),
    ``dropped_edges`` (edges whose weight rounds to zero) and either ``law_tv`` (total variation between the
    laws after the run; bounded by ``steps * max_row_tv``) or ``field_max_abs`` (heat).
    """
    chain = problem.chain
    qchain = quantized_chain(chain, bits)
    err = np.abs(qchain.probs - chain.probs)
    row_tv = 0.5 * np.add.reduceat(err, chain.indptr[:-1])
    live = ~chain.absorbing
    out = {"bits": bits, "max_edge_error": float(err[live[chain.rows]].max(initial=0.0)),
           "max_row_tv": float(row_tv[live].max(initial=0.0)),
           "dropped_edges": int(((qchain.probs == 0) & (chain.probs > 0)).sum())}
    if problem.observable == "field":
        g = problem.info["boundary"]
        du = absorbed_field(qchain, g) - absorbed_field(chain, g)
        out["field_max_abs"] = float(np.abs(du[problem.mask]).max())
        return out
    law, _ = propagate(chain, problem.source, problem.steps)
    qlaw, _ = propagate(qchain, problem.source, problem.steps)
    out["law_tv"] = float(0.5 * np.abs(qlaw - law).sum())
    out["law_tv_bound"] = min(1.0, problem.steps * out["max_row_tv"])
    return out
