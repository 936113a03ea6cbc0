"""Discrete-time Markov chains as sparse row-stochastic matrices, and the mesh chains the problems use.

A :class:`Chain` is the DTMC every simulator runs: CSR arrays (``indptr``, ``indices``, ``probs``) plus a mask of
absorbing nodes, where walkers stop and are tallied. It is validated once, on construction, so the simulators
never see a row that does not sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lowbit.errors import LowbitError

ROW_SUM_TOL = 1e-9
TOPOLOGIES = ("line", "grid", "torus")


@dataclass(frozen=True, eq=False)
class Chain:
    """A DTMC on ``n_nodes`` states: row ``i`` lists the successors of ``i`` and their probabilities.

    Args:
        indptr: CSR row pointers, shape ``[n_nodes + 1]``.
        indices: successor of each edge, shape ``[n_edges]``.
        probs: probability of each edge; each row sums to one.
        absorbing: nodes that remove a walker on arrival (their rows must still be valid; a self-loop will do).
    """

    indptr: np.ndarray
    indices: np.ndarray
    probs: np.ndarray
    absorbing: np.ndarray = field(default=None)

    def __post_init__(self):
        n = len(self.indptr) - 1
        absorbing = np.zeros(n, bool) if self.absorbing is None else np.asarray(self.absorbing, bool)
        object.__setattr__(self, "indptr", np.asarray(self.indptr, np.int64))
        object.__setattr__(self, "indices", np.asarray(self.indices, np.int64))
        object.__setattr__(self, "probs", np.asarray(self.probs, np.float64))
        object.__setattr__(self, "absorbing", absorbing)
        _validate(self)

    @property
    def n_nodes(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_edges(self) -> int:
        return len(self.indices)

    @property
    def rows(self) -> np.ndarray:
        """Source node of every edge."""
        return np.repeat(np.arange(self.n_nodes), np.diff(self.indptr))

    def to_scipy(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.probs, self.indices, self.indptr), shape=(self.n_nodes, self.n_nodes))

    @classmethod
    def from_scipy(cls, matrix, absorbing=None) -> Chain:
        """Validate and wrap any scipy sparse (or dense array) transition matrix."""
        m = sp.csr_matrix(matrix, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise LowbitError(f"a transition matrix must be square; got shape {m.shape}")
        m.sum_duplicates()
        m.sort_indices()
        return cls(m.indptr, m.indices, m.data, absorbing)


def _validate(chain: Chain) -> None:
    n = chain.n_nodes
    if n < 1:
        raise LowbitError("a transition matrix needs at least one state")
    if chain.absorbing.shape != (n,):
        raise LowbitError(f"absorbing mask has shape {chain.absorbing.shape}, expected ({n},)")
    if len(chain.indices) and (chain.indices.min() < 0 or chain.indices.max() >= n):
        raise LowbitError(f"successor indices must lie in [0, {n}); the matrix is malformed")
    if not np.all(np.isfinite(chain.probs)):
        raise LowbitError("the transition matrix holds NaN or infinite entries")
    neg = np.flatnonzero(chain.probs < 0)
    if len(neg):
        row = int(np.searchsorted(chain.indptr, neg[0], side="right") - 1)
        raise LowbitError(f"row {row} of the transition matrix has a negative probability "
                          f"({chain.probs[neg[0]]:g}); probabilities must be >= 0")
    sums = np.add.reduceat(chain.probs, chain.indptr[:-1]) if chain.n_edges else np.zeros(n)
    sums[np.diff(chain.indptr) == 0] = 0.0  # reduceat repeats the next value on empty rows
    bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOL)
    if len(bad):
        i = int(bad[0])
        raise LowbitError(f"row {i} of the transition matrix sums to {sums[i]:.6g}, not 1 "
                          f"({len(bad)} bad row(s)); each row must sum to 1 within {ROW_SUM_TOL:g}: "
                          f"normalise the rows or add the missing mass as a self-loop")


def load_matrix(path: str | Path) -> Chain:
    """A transition matrix from ``.npz`` (``scipy.sparse.save_npz``) or ``.safetensors`` (CSR or dense).

    The safetensors file holds either ``indptr``, ``indices``, ``data`` (and optionally ``shape``) or one
    2-D tensor ``matrix``; nothing in it is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: matrix file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            matrix = sp.load_npz(path)
        elif suffix == ".safetensors":
            matrix = _load_safetensors(path)
        else:
            raise LowbitError(f"{path}: expected a .npz (scipy.sparse.save_npz) or .safetensors matrix file")
    except LowbitError:
        raise
    except Exception as e:  # numpy/scipy/safetensors raise many types on foreign or truncated files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"{path}: not a readable transition matrix ({first[:160]})") from None
    return Chain.from_scipy(matrix)


def _load_safetensors(path: Path):
    from safetensors.numpy import load_file

    t = load_file(str(path))
    if "matrix" in t:
        return sp.csr_matrix(t["matrix"].astype(np.float64))
    if {"indptr", "indices", "data"} <= set(t):
        n = len(t["indptr"]) - 1
        shape = tuple(int(s) for s in t["shape"]) if "shape" in t else (n, n)
        return sp.csr_matrix((t["data"].astype(np.float64), t["indices"], t["indptr"]), shape=shape)
    raise LowbitError(f"{path}: expected tensors 'indptr', 'indices', 'data' (CSR) or 'matrix' (dense); "
                      f"found {sorted(t)}")


def save_matrix(path: str | Path, chain: Chain) -> Path:
    """Write a chain's matrix as ``.npz`` or ``.safetensors`` (CSR), atomically."""
    import io

    from lowbit.io import atomic_write_bytes

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.numpy import save

        arrays = {"indptr": chain.indptr, "indices": chain.indices, "data": chain.probs,
                  "shape": np.array([chain.n_nodes, chain.n_nodes], np.int64)}
        return atomic_write_bytes(path, save(arrays))
    buf = io.BytesIO()
    sp.save_npz(buf, chain.to_scipy())
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------- mesh chains
def lattice_walk(shape: tuple[int, ...], topology: str, stay: float) -> Chain:
    """Lazy nearest-neighbour walk: stay with ``stay``, else move to each of the ``2d`` neighbours equally.

    ``line`` and ``grid`` reflect at the edges (a move off the mesh becomes a stay, the Neumann boundary);
    ``torus`` wraps around.
    """
    n = int(np.prod(shape))
    d = len(shape)
    move = (1.0 - stay) / (2 * d)
    coords = np.indices(shape).reshape(d, n)  # [d, n]
    src, dst, pr = [np.arange(n)], [np.arange(n)], [np.full(n, stay)]
    for axis in range(d):
        for sign in (-1, 1):
            c = coords.copy()
            c[axis] += sign
            ok = (c[axis] >= 0) & (c[axis] < shape[axis]) | (topology == "torus")
            c[axis] %= shape[axis]
            target = np.where(ok, np.ravel_multi_index(c, shape), np.arange(n))
            src.append(np.arange(n))
            dst.append(target)
            pr.append(np.full(n, move))
    m = sp.coo_matrix((np.concatenate(pr), (np.concatenate(src), np.concatenate(dst))), shape=(n, n))
    return Chain.from_scipy(m.tocsr())


def convolution_walk(n: int, kernel: np.ndarray, offset: int) -> Chain:
    """1-D chain whose increment has law ``kernel[m]`` for a move of ``m - offset``; moves clamp at the ends."""
    m_values = np.arange(len(kernel)) - offset
    keep = kernel > 0
    m_values, kernel = m_values[keep], kernel[keep]
    src = np.repeat(np.arange(n), len(kernel))
    dst = np.clip(src + np.tile(m_values, n), 0, n - 1)
    m = sp.coo_matrix((np.tile(kernel, n), (src, dst)), shape=(n, n))
    return Chain.from_scipy(m.tocsr())


def propagate(chain: Chain, start: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact law after ``steps`` steps by sparse products ``pi <- pi P``: (law over nodes, absorbed mass per node).

    Deterministic linear algebra on the chain itself: the reference for user DTMCs and the yardstick for the
    discretization and quantization errors of the mesh problems.
    """
    pt = chain.to_scipy().T.tocsr()
    pi = np.asarray(start, np.float64).copy()
    absorbed = np.zeros_like(pi)
    for _ in range(steps):
        pi = pt @ pi
        absorbed += np.where(chain.absorbing, pi, 0.0)
        pi[chain.absorbing] = 0.0
    return pi, absorbed
