"""The integer routing circuit of one mesh node, compiled for a whole chain.

Each node ``i`` with ``K`` successors owns ``K - 1`` stochastic probability neurons with integer weights
``c_0 < c_1 < ... < c_{K-2}`` (cumulative transition probabilities in units of ``2**-bits``). A walker spike
leaving the node meets one seeded pseudo-random integer threshold ``r`` in ``[0, 2**bits)``; neuron ``j`` fires
iff ``r < c_j``, and lateral inhibition lets only the first firing neuron's output through, so the walker leaves
on edge ``k = #{j : c_j <= r}`` with probability ``(c_k - c_{k-1}) / 2**bits`` (the decision tree of the
TrueNorth circuit, compressed into one layer). Evaluating all nodes at once is one sorted search over the
global thresholds ``(i << bits) + c_ij``, integer arithmetic throughout.

The thresholds come from a counter-based hash of (seed, step, walker slot), not from a stateful generator, so
a run is bit-identical on CPU and CUDA and resumes from a checkpoint without saving any generator state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.neuro.chain import Chain

MAX_PROB_BITS = 24
_M32 = 0xFFFFFFFF


def quantize_probs(chain: Chain, bits: int) -> np.ndarray:
    """Integer weights per edge that sum to exactly ``2**bits`` in every row (largest remainder).

    Each weight is within one unit of ``p * 2**bits``; the leftover units go to the largest remainders, ties to
    the self-loop first so that symmetric stencils stay free of drift.
    """
    _check_bits(bits)
    scale = 1 << bits
    rows = chain.rows
    row_sum = np.add.reduceat(chain.probs, chain.indptr[:-1])
    p = chain.probs / row_sum[rows]
    scaled = p * scale
    w = np.floor(scaled).astype(np.int64)
    remainder = scaled - w
    deficit = scale - np.add.reduceat(w, chain.indptr[:-1])
    deficit = np.clip(deficit, 0, np.diff(chain.indptr))
    not_self = chain.indices != rows
    order = np.lexsort((chain.indices, not_self, -remainder, rows))  # by row, then largest remainder first
    rank = np.arange(len(order)) - chain.indptr[rows[order]]
    w[order[rank < deficit[rows[order]]]] += 1
    return w


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_PROB_BITS:
        raise LowbitError(f"prob_bits must be an integer in [1, {MAX_PROB_BITS}], got {bits!r}")


# --------------------------------------------------------------------------------------------- thresholds
def _mix64(x: int) -> int:
    """splitmix64 finaliser on Python ints: turns (seed, step) into well-spread 32-bit keys."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' prospector, both multipliers < 2**31 so int64 never overflows)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    x = x ^ (x >> 15)
    return x


def thresholds(seed: int, steps: range, slots: torch.Tensor, bits: int) -> torch.Tensor:
    """Pseudo-random integer thresholds in ``[0, 2**bits)``, ``[len(steps), len(slots)]``, for walker slots.

    Two keyed hash rounds: each step applies its own keyed permutation of the 32-bit slot space, so different
    steps never reuse each other's draws. Several steps are drawn at once only to save per-op overhead; row
    ``i`` depends on ``steps[i]`` alone.
    """
    keys = [_mix64((seed << 32) ^ s) for s in steps]
    k1 = torch.tensor([k & _M32 for k in keys], dtype=torch.int64, device=slots.device).unsqueeze(1)
    k2 = torch.tensor([k >> 32 for k in keys], dtype=torch.int64, device=slots.device).unsqueeze(1)
    x = _hash32(slots.unsqueeze(0) ^ k1)
    x = _hash32(x ^ k2)
    return x >> (32 - bits)


# --------------------------------------------------------------------------------------------- the circuit
@dataclass(frozen=True, eq=False)
class Circuit:
    """A chain compiled to integer neurons: weights, cumulative thresholds and successors, on one device.

    Edges whose weight rounds to zero are dropped: they have no neuron, and the walk can never take them (part
    of the quantization bias that :func:`lowbit.neuro.quantization_bias` reports).
    """

    bits: int
    indptr: torch.Tensor      # [N + 1] row pointers over the kept edges
    successors: torch.Tensor  # [E] successor node of each kept edge
    weights: torch.Tensor     # [E] integer weight, rows sum to 2**bits
    keys: torch.Tensor        # [E] (row << bits) + cumulative weight: sorted, searched per walker
    absorbing: torch.Tensor   # [N] bool

    @property
    def n_nodes(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_edges(self) -> int:
        return len(self.successors)

    def degrees(self) -> torch.Tensor:
        """Kept successors per node (``K_i``)."""
        return self.indptr[1:] - self.indptr[:-1]

    def route(self, node: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Edge taken by walkers at ``node`` with thresholds ``r``: the first neuron with ``r < c_j``."""
        return torch.searchsorted(self.keys, (node << self.bits) | r, right=True)

    def route_by_neurons(self, node: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The same routing written out neuron by neuron (slow; the definition ``route`` is checked against)."""
        lo, hi = self.indptr[node], self.indptr[node + 1]
        width = int((hi - lo).max())
        j = lo.unsqueeze(1) + torch.arange(width, device=node.device)       # [W, K] edge ids
        valid = j < hi.unsqueeze(1)
        cum = self.keys[j.clamp(max=self.n_edges - 1)] - (node.unsqueeze(1) << self.bits)
        fired = (r.unsqueeze(1) < cum) & valid                                # probability neurons that fire
        first = torch.where(fired, torch.arange(width, device=node.device), width).min(1).values
        return lo + first

    def probabilities(self) -> np.ndarray:
        """Realised transition probability of each kept edge (``weight / 2**bits``)."""
        return self.weights.cpu().numpy() / float(1 << self.bits)

    def to_chain(self) -> Chain:
        """The DTMC the circuit actually runs (the quantized chain)."""
        return Chain(self.indptr.cpu().numpy(), self.successors.cpu().numpy(), self.probabilities(),
                     self.absorbing.cpu().numpy())


def compile_circuit(chain: Chain, bits: int, device: str | torch.device = "cpu") -> Circuit:
    """Quantize ``chain`` to ``bits``-bit weights and lay out the thresholds for :meth:`Circuit.route`."""
    weights = quantize_probs(chain, bits)
    keep = weights > 0
    rows = chain.rows[keep]
    weights = weights[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=chain.n_nodes))])
    total = np.concatenate([[0], np.cumsum(weights)])
    cum = total[1:] - np.repeat(total[indptr[:-1]], np.diff(indptr))  # cumulative weight within each row
    keys = (rows << bits) + cum
    t = lambda a, dtype=torch.int64: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)  # noqa: E731
    return Circuit(bits=bits, indptr=t(indptr), successors=t(chain.indices[keep]), weights=t(weights),
                   keys=t(keys), absorbing=t(chain.absorbing, torch.bool))
