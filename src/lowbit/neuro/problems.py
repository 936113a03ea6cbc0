"""The four problems: each a chain, where its walkers start, and a reference computed without simulation.

* :func:`diffusion` — lazy walk on a line, grid or torus; reference: the exact lattice heat kernel (and the
  Gaussian limit, reported beside it).
* :func:`jump_diffusion` — Merton process on a line (Brownian part plus compound-Poisson normal jumps per
  step); reference: the Merton density (Poisson mixture of Gaussians) at the nodes.
* :func:`heat` — steady heat equation with Dirichlet edges by absorbing walkers; reference: finite differences.
* :func:`dtmc` — any user chain; reference: its exact law by sparse products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.stats import norm, poisson

from lowbit.errors import LowbitError
from lowbit.neuro.chain import TOPOLOGIES, Chain, convolution_walk, lattice_walk, propagate
from lowbit.neuro.reference import (
    gaussian_diffusion,
    heat_continuum,
    heat_fd,
    hot_edge,
    lattice_diffusion,
    merton_cdf,
    merton_density,
)

PROBLEMS = ("diffusion", "jump-diffusion", "heat", "dtmc")
EDGE_MASS_LIMIT = 1e-4  # jump-diffusion: most density allowed outside the mesh


@dataclass(frozen=True, eq=False)
class Problem:
    """A chain plus what the walkers estimate and the reference they are judged against.

    Attributes:
        observable: ``density`` (walkers per node after ``steps``, divided by the walkers) or ``field`` (the
            heat solution, ``scale * visits / walkers`` on the interior).
        source: release distribution of the walkers over the nodes.
        steps: steps to run; for ``heat`` a cap (the run ends when every walker is absorbed).
        reference: the expected observable per node.
        mask: nodes where errors are measured (the heat problem's interior; every node otherwise).
        info: parameters and secondary references for the report.
    """

    name: str
    chain: Chain
    shape: tuple[int, ...]
    topology: str
    observable: str
    source: np.ndarray
    steps: int
    reference: np.ndarray
    reference_name: str
    mask: np.ndarray
    scale: float = 1.0
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MertonParams:
    """Merton jump-diffusion ``X_t = sigma W_t + sum_{i <= N_t} Y_i`` from ``X_0 = 0``, in the units of ``x``.

    Args:
        sigma: Brownian volatility per unit sqrt-time.
        jump_rate: Poisson intensity (jumps per unit time).
        jump_mean: mean jump size.
        jump_std: jump size standard deviation.
        horizon: time at which the density is compared.
    """

    sigma: float = 1.0
    jump_rate: float = 3.0
    jump_mean: float = -0.3
    jump_std: float = 0.5
    horizon: float = 1.0

    def __post_init__(self):
        for name in ("sigma", "jump_std", "horizon"):
            if not getattr(self, name) > 0:
                raise LowbitError(f"jump-diffusion {name} must be > 0, got {getattr(self, name)}")
        if not self.jump_rate >= 0:
            raise LowbitError(f"jump-diffusion jump_rate must be >= 0, got {self.jump_rate}")


def start_counts(problem: Problem, walkers: int) -> np.ndarray:
    """``walkers`` spread over the source by largest remainder (deterministic, sums to ``walkers``)."""
    if walkers < 1:
        raise LowbitError(f"walkers must be >= 1, got {walkers}")
    share = problem.source * walkers
    counts = np.floor(share).astype(np.int64)
    short = walkers - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:short]] += 1
    return counts


def estimate(problem: Problem, counts: np.ndarray, visits: np.ndarray | None, walkers: int) -> np.ndarray:
    """The observable a run measured, per node: the density, or the heat field (edges hold their values)."""
    if problem.observable == "density":
        return counts / walkers
    field_ = problem.reference.copy()  # edges are known (Dirichlet); the interior is estimated
    field_[problem.mask] = problem.scale * visits[problem.mask] / walkers
    return field_


def errors(problem: Problem, est: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """``l2``: the norm of the density error (RMS over the interior for a field), the 1/sqrt(walkers) metric;
    ``tv`` (densities) or ``max_abs`` (fields)."""
    ref = problem.reference if reference is None else reference
    diff = (est - ref)[problem.mask]
    if problem.observable == "density":
        return {"l2": float(np.sqrt((diff**2).sum())), "tv": float(0.5 * np.abs(diff).sum())}
    return {"l2": float(np.sqrt((diff**2).mean())), "max_abs": float(np.abs(diff).max()),
            "rel_l2": float(np.sqrt((diff**2).mean()) / np.abs(ref).max())}


# --------------------------------------------------------------------------------------------- builders
def parse_mesh(text: str | tuple | list) -> tuple[int, ...]:
    """``"64x64"`` -> ``(64, 64)``, ``"256"`` -> ``(256,)``; anything else is one actionable error."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).lower().replace("×", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise LowbitError(f"mesh {text!r} is not a mesh: write N for a line or NxM for a grid/torus, "
                          f"e.g. 256 or 64x64") from None
    if not 1 <= len(shape) <= 2:
        raise LowbitError(f"mesh {text!r}: expected 1 or 2 sizes (N or NxM), got {len(shape)}")
    if any(s < 1 for s in shape):
        raise LowbitError(f"mesh {text!r}: sizes must be positive, got {'x'.join(map(str, shape))}")
    return shape


def _centre(shape: tuple[int, ...]) -> int:
    return int(np.ravel_multi_index(tuple(s // 2 for s in shape), shape))


def _check_topology(shape: tuple[int, ...], topology: str) -> None:
    if topology not in TOPOLOGIES:
        raise LowbitError(f"topology {topology!r}: expected one of {', '.join(TOPOLOGIES)}")
    if topology == "line" and len(shape) != 1:
        raise LowbitError(f"topology line needs a 1-D mesh (N), got {'x'.join(map(str, shape))}; "
                          f"use --topology grid or torus for NxM")
    if topology == "grid" and len(shape) != 2:
        raise LowbitError(f"topology grid needs a 2-D mesh (NxM), got {shape[0]}; use --topology line")


def _check_start(start: int, n: int) -> int:
    if not 0 <= start < n:
        raise LowbitError(f"start node {start} is outside the mesh's {n} nodes (0..{n - 1})")
    return int(start)


def _check_steps(steps: int) -> int:
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise LowbitError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def diffusion(shape: tuple[int, ...], topology: str | None = None, *, steps: int = 200, stay: float = 0.5,
              start: int | None = None) -> Problem:
    """Diffusion from one node: a lazy walk (stay with ``stay``, else to a uniformly chosen neighbour).

    The reference is the walk's exact law (:func:`~lowbit.neuro.reference.lattice_diffusion`); the Gaussian
    limit and its distance from the exact law are kept in ``info`` for the report.
    """
    shape = parse_mesh(shape)
    topology = topology or ("line" if len(shape) == 1 else "grid")
    _check_topology(shape, topology)
    steps = _check_steps(steps)
    if min(shape) < 2:
        raise LowbitError(f"diffusion needs at least 2 nodes per axis, got {'x'.join(map(str, shape))}")
    if not 0.0 <= stay < 1.0:
        raise LowbitError(f"stay probability must be in [0, 1), got {stay}")
    n = int(np.prod(shape))
    start = _check_start(_centre(shape) if start is None else start, n)
    exact = lattice_diffusion(shape, topology, stay, start, steps)
    gauss = gaussian_diffusion(shape, topology, stay, start, steps)
    source = np.zeros(n)
    source[start] = 1.0
    return Problem("diffusion", lattice_walk(shape, topology, stay), shape, topology, "density", source, steps,
                   exact, "exact lattice heat kernel (DCT/DFT eigen-decomposition of the walk)", np.ones(n, bool),
                   info={"stay": stay, "start": start, "gaussian": gauss,
                         "gaussian_tv": float(0.5 * np.abs(exact - gauss).sum()),
                         "variance_per_axis": steps * (1.0 - stay) / len(shape)})


def jump_diffusion(n: int | tuple, *, steps: int = 200, params: MertonParams | None = None,
                   stay: float = 0.5) -> Problem:
    """Merton jump-diffusion on a line of ``n`` nodes centred on ``x = 0``.

    One step of length ``dt = horizon / steps`` moves by a lazy lattice step (variance ``sigma^2 dt``, which
    sets the spacing ``h``) plus the compound-Poisson jump of that step (``N ~ Poisson(rate dt)`` normal jumps),
    binned to the mesh with Sheppard's correction so each jump keeps its variance. Moves past an end clamp.
    """
    shape = parse_mesh(n)
    if len(shape) != 1:
        raise LowbitError(f"jump-diffusion runs on a line: pass --mesh N, got {'x'.join(map(str, shape))}")
    steps = _check_steps(steps)
    params = params or MertonParams()
    if not 0.0 <= stay < 1.0:
        raise LowbitError(f"stay probability must be in [0, 1), got {stay}")
    n = shape[0]
    dt = params.horizon / steps
    q = (1.0 - stay) / 2
    h = params.sigma * math.sqrt(dt / (2 * q))
    kernel, offset = _merton_step_kernel(params, dt, h, q)
    centre = n // 2
    x = (np.arange(n) - centre) * h
    p = (params.sigma, params.jump_rate, params.jump_mean, params.jump_std)
    below = float(merton_cdf(np.array([x[0] - h / 2]), params.horizon, *p)[0])
    above = 1.0 - float(merton_cdf(np.array([x[-1] + h / 2]), params.horizon, *p)[0])
    if below + above > EDGE_MASS_LIMIT:
        need = _nodes_needed(params, h)
        raise LowbitError(f"mesh of {n} nodes spans x in [{x[0]:.2f}, {x[-1]:.2f}] (h = {h:.3g} from "
                          f"{steps} steps) and misses {100 * (below + above):.2g}% of the jump-diffusion "
                          f"density; use --mesh {need} or more, or fewer --steps")
    ref = merton_density(x, params.horizon, *p) * h
    ref[0] += below
    ref[-1] += above
    ref /= ref.sum()
    source = np.zeros(n)
    source[centre] = 1.0
    info = {"h": h, "dt": dt, "x0": float(x[0]), "kernel_width": len(kernel), "edge_mass": below + above,
            "params": {k: getattr(params, k) for k in ("sigma", "jump_rate", "jump_mean", "jump_std", "horizon")}}
    return Problem("jump-diffusion", convolution_walk(n, kernel, offset), shape, "line", "density", source,
                   steps, ref, "Merton density (Poisson mixture of Gaussians) at the nodes", np.ones(n, bool),
                   info=info)


def _merton_step_kernel(params: MertonParams, dt: float, h: float, q: float) -> tuple[np.ndarray, int]:
    """Law of one step's lattice increment: lazy step convolved with the binned compound-Poisson jump."""
    lam = params.jump_rate * dt
    j_max = int(poisson.isf(1e-15, lam)) + 1 if lam > 0 else 0
    mu, s = params.jump_mean / h, params.jump_std / h          # jump law in cells
    if j_max and s**2 <= 1 / 12:
        raise LowbitError(f"jump_std {params.jump_std} is under 0.3 mesh cells (h = {h:.3g}); use more --steps "
                          f"for a finer mesh, or larger jumps")
    reach = int(math.ceil(abs(mu) * j_max + 9 * s * math.sqrt(max(j_max, 1)))) + 1
    m = np.arange(-reach, reach + 1)
    jump = np.zeros(len(m))
    jump[reach] = math.exp(-lam)
    for j in range(1, j_max + 1):
        sd = math.sqrt(j * s**2 - 1 / 12)                    # Sheppard: binning adds 1/12 cell^2
        mass = norm.cdf(m + 0.5, j * mu, sd) - norm.cdf(m - 0.5, j * mu, sd)
        jump += poisson.pmf(j, lam) * mass
    jump /= jump.sum()
    step = np.convolve(np.array([q, 1.0 - 2 * q, q]), jump)
    return step, reach + 1


def _nodes_needed(params: MertonParams, h: float) -> int:
    p = (params.sigma, params.jump_rate, params.jump_mean, params.jump_std)
    for half in range(8, 1 << 20, 8):
        x = np.array([-(half + 0.5) * h, (half + 0.5) * h])
        c = merton_cdf(x, params.horizon, *p)
        if c[0] + 1.0 - c[1] <= EDGE_MASS_LIMIT / 2:
            return 2 * half + 1
    return 1 << 20


def heat(shape: tuple[int, ...], *, steps: int | None = None) -> Problem:
    """Steady heat equation on a grid, edges held at :func:`~lowbit.neuro.reference.hot_edge`.

    Feynman–Kac: ``u(x) = E_x[g(X_tau)]`` for the walk to a uniform neighbour absorbed at the edge. Its
    adjoint gives the whole field from one population: by the symmetry of the walk's Green's function,
    ``u(x) = sum_y s(y) G(y, x)`` with ``s(y) = sum_{b ~ y} g(b) / 4``, so walkers released at the
    edge-adjacent nodes in proportion to ``s`` and absorbed at the edge visit ``x`` on average
    ``u(x) / S`` times each (``S = sum s``). Steps are a cap; the run ends when every walker is absorbed.
    """
    shape = parse_mesh(shape)
    if len(shape) != 2 or min(shape) < 3:
        raise LowbitError(f"heat needs a 2-D mesh of at least 3x3 nodes (an interior and an edge), got "
                          f"{'x'.join(map(str, shape))}")
    steps = 4 * max(shape) ** 2 if steps is None or steps == 0 else _check_steps(steps)
    n = int(np.prod(shape))
    idx = np.arange(n).reshape(shape)
    inner = idx[1:-1, 1:-1].reshape(-1)
    edge = np.ones(shape, bool)
    edge[1:-1, 1:-1] = False
    edge = edge.reshape(-1)
    neighbours = np.stack([idx[:-2, 1:-1], idx[2:, 1:-1], idx[1:-1, :-2], idx[1:-1, 2:]], -1).reshape(-1, 4)
    outer = np.flatnonzero(edge)
    # interior: 1/4 to each neighbour; edge: a self-loop (never taken: walkers are absorbed on arrival)
    src = np.concatenate([np.repeat(inner, 4), outer])
    dst = np.concatenate([neighbours.reshape(-1), outer])
    prob = np.concatenate([np.full(4 * len(inner), 0.25), np.ones(len(outer))])
    chain = Chain.from_scipy(sp.csr_matrix((prob, (src, dst)), shape=(n, n)), absorbing=edge)
    g = hot_edge(shape)
    reference = heat_fd(g).reshape(-1)
    gflat = g.reshape(-1)
    s = np.zeros(n)
    s[inner] = 0.25 * gflat[neighbours].sum(1)  # g is zero inside, so only edge neighbours count
    scale = float(s.sum())
    continuum = heat_continuum(shape).reshape(-1)
    return Problem("heat", chain, shape, "grid", "field", s / scale, steps, reference,
                   "five-point finite-difference solve (scipy.sparse spsolve)", ~edge, scale=scale,
                   info={"boundary": gflat, "fd_vs_continuum_max": float(np.abs(reference - continuum).max())})


def feynman_kac_point(problem: Problem, absorbed: np.ndarray, walkers: int) -> float:
    """Forward Feynman–Kac estimate ``u(x) = mean g(exit point)`` for walkers all released at one node ``x``."""
    return float((absorbed * problem.info["boundary"]).sum() / walkers)


def dtmc(chain: Chain, *, steps: int = 200, start: int = 0) -> Problem:
    """Any user chain from one start node; the reference is its exact law after ``steps`` steps."""
    steps = _check_steps(steps)
    n = chain.n_nodes
    start = _check_start(start, n)
    source = np.zeros(n)
    source[start] = 1.0
    law, _ = propagate(chain, source, steps)
    return Problem("dtmc", chain, (n,), "dtmc", "density", source, steps, law,
                   "exact law by sparse products pi_t = pi_0 P^t", np.ones(n, bool), info={"start": start})
