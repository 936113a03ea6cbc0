"""The two simulators of a chain: the spiking density method and the conventional Monte Carlo baseline.

:func:`simulate` is the neuromorphic algorithm: the state is an integer walker count per mesh node (the counter
neurons), walkers cost only spikes, and each walker is routed by its node's integer circuit
(:class:`~lowbit.neuro.circuit.Circuit`). :func:`simulate_baseline` is what one would write on a CPU or GPU:
one float position per walker, a float uniform per walker step and a search of the row's cumulative
probabilities. Both are vectorized over walkers, run on CPU or CUDA and are deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.neuro.chain import Chain
from lowbit.neuro.circuit import Circuit, compile_circuit, thresholds

BLOCK_ELEMENTS = 1 << 22  # thresholds drawn ahead: at most this many (32 MiB of int64)
BLOCK_STEPS = 64


@dataclass
class WalkState:
    """Where a run stands after ``step`` steps: walkers per node plus the exact tallies the cost model reads.

    Attributes:
        counts: walkers at each node (the counter neurons), int64 ``[N]``.
        absorbed: walkers removed at each absorbing node so far, int64 ``[N]``.
        visits: walker count of each node summed over the steps taken (the heat problem's estimator, and with
            the circuit's degrees the probability-neuron inputs); ``None`` for a baseline run not asked for it.
        walker_steps: walker updates done (one per live walker per step).
        edge_sum: sum of the global index of every edge taken (gives the probability-neuron spikes).
        peak_load: sum over steps of the largest walker count at any node (the serial re-emission bound).
    """

    step: int
    counts: torch.Tensor
    absorbed: torch.Tensor
    visits: torch.Tensor | None = None
    walker_steps: int = 0
    edge_sum: int = 0
    peak_load: int = 0

    @property
    def alive(self) -> int:
        return int(self.counts.sum())

    def to_payload(self) -> dict:
        return {f.name: (v.cpu() if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                for f in fields(self)}

    @classmethod
    def from_payload(cls, payload: dict, device: str | torch.device = "cpu") -> WalkState:
        kw = {f.name: payload[f.name] for f in fields(cls)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device)
        return cls(**kw)


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu`` or ``cuda``; asking for CUDA without a GPU is a user error, not a crash."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError("device cuda: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise LowbitError(f"device {device.type}: expected cpu or cuda")
    return device


def start_state(start: np.ndarray | torch.Tensor, n_nodes: int, device, visits: bool = True) -> WalkState:
    start = start if isinstance(start, torch.Tensor) else np.asarray(start)
    counts = torch.as_tensor(start, dtype=torch.int64, device=device)
    if counts.shape != (n_nodes,):
        raise LowbitError(f"start counts have shape {tuple(counts.shape)}, expected ({n_nodes},)")
    if bool((counts < 0).any()):
        raise LowbitError("start counts must be >= 0 walkers per node")
    zeros = torch.zeros_like(counts)
    return WalkState(0, counts, zeros.clone(), zeros.clone() if visits else None)


def simulate(chain: Chain | Circuit, start, steps: int, *, prob_bits: int = 16, seed: int = 0,
             device: str | torch.device = "cpu", state: WalkState | None = None,
             checkpoint: Callable[[WalkState], None] | None = None, checkpoint_every: int = 0,
             progress: bool = False, stop_when_empty: bool = True) -> WalkState:
    """Run the spiking density method for ``steps`` steps (or from ``state`` up to ``steps``).

    Args:
        chain: the DTMC, or a circuit already compiled from it (then ``prob_bits`` is the circuit's).
        start: walkers per node at step 0, integer ``[N]``.
        state: continue a run from this state (from a checkpoint); ``start`` is then ignored.
        checkpoint: called with the state every ``checkpoint_every`` steps and at the end.
        stop_when_empty: stop early once every walker has been absorbed.

    Returns:
        The final :class:`WalkState`; ``state.step`` is the number of steps done. The result depends only on
        the chain, ``start``, ``steps``, ``prob_bits`` and ``seed``: not on the device, nor on checkpoints.
    """
    device = resolve_device(device)
    circuit = chain if isinstance(chain, Circuit) else compile_circuit(chain, prob_bits, device)
    n = circuit.n_nodes
    state = state or start_state(start, n, device)
    nodes = torch.arange(n, device=device)
    slots = torch.arange(max(state.alive, 1), device=device)
    absorbing = circuit.absorbing.long() if bool(circuit.absorbing.any()) else None
    edge_sum = torch.zeros((), dtype=torch.int64, device=device)
    peak = torch.zeros((), dtype=torch.int64, device=device)
    block, first = slots[:0].unsqueeze(0), state.step   # thresholds drawn ahead, for steps first, first + 1, ...
    bar = _bar(progress, steps, state.step, "spiking walk")
    while state.step < steps:
        alive = state.alive
        if alive == 0 and stop_when_empty:
            break
        if state.step - first >= len(block) or alive > block.shape[1]:
            ahead = max(1, min(BLOCK_STEPS, steps - state.step, BLOCK_ELEMENTS // max(alive, 1)))
            first = state.step
            block = thresholds(seed, range(first, first + ahead), slots[:alive], circuit.bits)  # [ahead, W]
        counts = state.counts
        node = torch.repeat_interleave(nodes, counts, output_size=alive)    # [W] walker spikes, node order
        r = block[state.step - first, :alive]                               # [W] stochastic thresholds
        edge = circuit.route(node, r)                                       # [W] edge taken
        new = torch.bincount(circuit.successors[edge], minlength=n)         # counter neurons of step t+1
        edge_sum += edge.sum()
        peak += counts.max()
        state.visits += counts
        state.walker_steps += alive
        if absorbing is not None:
            hit = new * absorbing
            state.absorbed += hit
            new -= hit
        state.counts = new
        state.step += 1
        bar.update(1)
        if checkpoint is not None and checkpoint_every and state.step % checkpoint_every == 0:
            _fold(state, edge_sum, peak)
            checkpoint(state)
    bar.close()
    _fold(state, edge_sum, peak)
    if checkpoint is not None:
        checkpoint(state)
    return state


def _fold(state: WalkState, edge_sum: torch.Tensor, peak: torch.Tensor) -> None:
    """Move the on-device tallies into the state's exact Python ints (one sync, only when saving or done)."""
    state.edge_sum += int(edge_sum)
    state.peak_load += int(peak)
    edge_sum.zero_()
    peak.zero_()


def simulate_baseline(chain: Chain, start, steps: int, *, seed: int = 0, device: str | torch.device = "cpu",
                      visits: bool = False, progress: bool = False, stop_when_empty: bool = True) -> WalkState:
    """The conventional vectorized Monte Carlo of the same chain: float positions, float uniforms, exact probs.

    Only ``counts``, ``absorbed``, ``visits`` (if asked for) and ``walker_steps`` of the state are filled.
    """
    device = resolve_device(device)
    n = chain.n_nodes
    state = start_state(start, n, device, visits)
    gen = torch.Generator(device=device).manual_seed(seed)
    keys, successors = _float_keys(chain, device)
    absorbing = torch.as_tensor(chain.absorbing, device=device) if chain.absorbing.any() else None
    # keep pos + u below pos + 1 in float64 for pos < 2**20 (u near 1 would round up); shifts probabilities by < 1e-9
    shrink = 1.0 - 2.0**-30
    pos = torch.repeat_interleave(torch.arange(n, device=device), state.counts)
    bar = _bar(progress, steps, 0, "baseline walk")
    while state.step < steps:
        if len(pos) == 0 and stop_when_empty:
            break
        u = torch.rand(len(pos), generator=gen, dtype=torch.float64, device=device)
        if state.visits is not None:
            state.visits += torch.bincount(pos, minlength=n)
        state.walker_steps += len(pos)
        edge = torch.searchsorted(keys, pos + u * shrink, right=True)
        pos = successors[edge]
        if absorbing is not None:
            hit = absorbing[pos]
            state.absorbed += torch.bincount(pos[hit], minlength=n)
            pos = pos[~hit]
        state.step += 1
        bar.update(1)
    bar.close()
    state.counts = torch.bincount(pos, minlength=n)
    return state


def _float_keys(chain: Chain, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``row + cumulative probability`` per edge, each row's last key exactly ``row + 1``."""
    if chain.n_nodes >= 2**20:
        raise LowbitError(f"the baseline supports chains of fewer than 2**20 nodes, got {chain.n_nodes}")
    keep = chain.probs > 0  # a zero-probability edge must never be found, not even by rounding
    rows, probs, successors = chain.rows[keep], chain.probs[keep], chain.indices[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=chain.n_nodes))])
    total = np.concatenate([[0.0], np.cumsum(probs)])
    cum = total[1:] - np.repeat(total[indptr[:-1]], np.diff(indptr))
    row_end = np.zeros(len(rows), bool)
    row_end[indptr[1:] - 1] = True
    cum = np.where(row_end, 1.0, np.minimum(cum, 1.0))
    keys = torch.as_tensor(rows + cum, dtype=torch.float64, device=device)
    return keys, torch.as_tensor(successors, dtype=torch.int64, device=device)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: int, initial: int, desc: str):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, disable=None)
