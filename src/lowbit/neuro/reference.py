"""References that share no code or randomness with the simulators.

* :func:`lattice_diffusion`: the exact law of the lazy lattice walk from its eigen-decomposition (a cosine
  transform for reflecting edges, a Fourier transform for the torus), i.e. the discrete heat kernel.
* :func:`gaussian_diffusion`: the continuum heat kernel (a Gaussian with images for the edges) sampled at the
  nodes, the limit the lattice law approaches as the walk spreads.
* :func:`merton_density`: the Merton jump-diffusion density, a Poisson mixture of Gaussians.
* :func:`heat_fd`: the steady heat (Laplace) equation by a five-point finite-difference solve (scipy sparse).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.stats import norm, poisson


def lattice_diffusion(shape: tuple[int, ...], topology: str, stay: float, start: int, steps: int) -> np.ndarray:
    """Exact law after ``steps`` steps of the walk :func:`lowbit.neuro.chain.lattice_walk` builds, from ``start``.

    The walk operator is ``stay + move * sum_axes (S_+ + S_-)``; reflecting edges are diagonalised by the
    orthonormal DCT-II (eigenvalues ``2 cos(pi k / n)`` per axis), the torus by the DFT (``2 cos(2 pi k / n)``).
    """
    d = len(shape)
    move = (1.0 - stay) / (2 * d)
    delta = np.zeros(shape)
    delta[np.unravel_index(start, shape)] = 1.0
    period = 1.0 if topology == "torus" else 2.0
    axes_eig = [2.0 * np.cos(2.0 * np.pi * np.arange(n) / (period * n)) for n in shape]
    eig = stay + move * sum(np.meshgrid(*axes_eig, indexing="ij"))
    if topology == "torus":
        law = np.real(scipy.fft.ifftn(scipy.fft.fftn(delta) * eig**steps))
    else:
        law = scipy.fft.idctn(scipy.fft.dctn(delta, type=2, norm="ortho") * eig**steps, type=2, norm="ortho")
    law = np.clip(law, 0.0, None)
    return (law / law.sum()).reshape(-1)


def gaussian_diffusion(shape: tuple[int, ...], topology: str, stay: float, start: int, steps: int) -> np.ndarray:
    """Continuum heat kernel at the nodes: variance ``steps * (1 - stay) / d`` per axis, edges by images.

    Reflecting edges sit half a cell outside the mesh (the walk's Neumann boundary), so the images of ``x0`` are
    ``-1 - x0`` and their translates by ``2n``; the torus has translates by ``n``.
    """
    d = len(shape)
    var = steps * (1.0 - stay) / d
    centre = np.unravel_index(start, shape)
    factors = []
    for n, x0 in zip(shape, centre):
        x = np.arange(n, dtype=np.float64)
        k = np.arange(-4, 5)[:, None]
        if topology == "torus":
            images = x0 + n * k
        else:
            images = np.concatenate([x0 + 2 * n * k, -1 - x0 + 2 * n * k])
        f = np.exp(-((x[None, :] - images) ** 2) / (2 * var)).sum(0)
        factors.append(f / f.sum())
    law = factors[0]
    for f in factors[1:]:
        law = np.multiply.outer(law, f)
    return law.reshape(-1) / law.sum()


def merton_density(x: np.ndarray, t: float, sigma: float, jump_rate: float, jump_mean: float, jump_std: float,
                   tol: float = 1e-15) -> np.ndarray:
    """Density of ``X_t = sigma W_t + sum_{i <= N_t} Y_i``, ``N_t ~ Poisson(jump_rate t)``, ``Y ~ N(mean, std^2)``.

    The Poisson mixture ``sum_n Pois(n; lambda t) N(x; n mu_J, sigma^2 t + n sigma_J^2)``, truncated where the
    Poisson tail drops below ``tol``.
    """
    lam = jump_rate * t
    n_max = int(poisson.isf(tol, lam)) + 1 if lam > 0 else 0
    n = np.arange(n_max + 1)[:, None]
    weight = poisson.pmf(n, lam)
    mean = n * jump_mean
    std = np.sqrt(sigma**2 * t + n * jump_std**2)
    return (weight * norm.pdf(x[None, :], mean, std)).sum(0)


def merton_cdf(x: np.ndarray, t: float, sigma: float, jump_rate: float, jump_mean: float, jump_std: float,
               tol: float = 1e-15) -> np.ndarray:
    lam = jump_rate * t
    n_max = int(poisson.isf(tol, lam)) + 1 if lam > 0 else 0
    n = np.arange(n_max + 1)[:, None]
    std = np.sqrt(sigma**2 * t + n * jump_std**2)
    return (poisson.pmf(n, lam) * norm.cdf(x[None, :], n * jump_mean, std)).sum(0)


def hot_edge(shape: tuple[int, int]) -> np.ndarray:
    """Boundary temperature: ``sin(pi x / L)`` along the last row, zero on the other three edges, ``[n0, n1]``."""
    g = np.zeros(shape)
    g[-1, :] = np.sin(np.pi * np.arange(shape[1]) / (shape[1] - 1))
    return g


def heat_fd(g: np.ndarray) -> np.ndarray:
    """Solve ``u = mean of the four neighbours`` inside the mesh with ``u = g`` on its edge; ``[n0, n1]``.

    The five-point Laplacian ``4 u_ij - u_(i±1)j - u_i(j±1) = 0`` on the interior, boundary values moved to
    the right-hand side, one sparse direct solve.
    """
    n0, n1 = g.shape
    m0, m1 = n0 - 2, n1 - 2
    lap0 = sp.diags([-np.ones(m0 - 1), 2 * np.ones(m0), -np.ones(m0 - 1)], [-1, 0, 1])
    lap1 = sp.diags([-np.ones(m1 - 1), 2 * np.ones(m1), -np.ones(m1 - 1)], [-1, 0, 1])
    lap = sp.kron(lap0, sp.eye(m1)) + sp.kron(sp.eye(m0), lap1)
    rhs = np.zeros((m0, m1))
    rhs[0, :] += g[0, 1:-1]
    rhs[-1, :] += g[-1, 1:-1]
    rhs[:, 0] += g[1:-1, 0]
    rhs[:, -1] += g[1:-1, -1]
    u = g.astype(np.float64).copy()
    u[1:-1, 1:-1] = spla.spsolve(lap.tocsc(), rhs.reshape(-1)).reshape(m0, m1)
    return u


def heat_continuum(shape: tuple[int, int]) -> np.ndarray:
    """The PDE's own solution for :func:`hot_edge`: ``sin(pi x / L) sinh(pi y / L) / sinh(pi H / L)``."""
    n0, n1 = shape
    length = n1 - 1
    y, x = np.meshgrid(np.arange(n0), np.arange(n1), indexing="ij")
    return np.sin(np.pi * x / length) * np.sinh(np.pi * y / length) / math.sinh(np.pi * (n0 - 1) / length)
