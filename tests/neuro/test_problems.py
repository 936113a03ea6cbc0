"""Each problem at small size against its reference, the 1/sqrt(walkers) law, and the quantization bias."""

import numpy as np
import pytest
import scipy.sparse as sp

from lowbit.errors import LowbitError
from lowbit.neuro import (
    Chain,
    MertonParams,
    diffusion,
    dtmc,
    errors,
    estimate,
    heat,
    jump_diffusion,
    load_matrix,
    propagate,
    quantization_bias,
    save_matrix,
    simulate,
    start_counts,
)
from lowbit.neuro.problems import feynman_kac_point, parse_mesh
from lowbit.neuro.reference import heat_fd, hot_edge, merton_density
from lowbit.neuro.stats import chi2_goodness_of_fit, fit_slope
from tests.neuro.conftest import random_chain


def run(problem, walkers, seed=0, bits=16):
    state = simulate(problem.chain, start_counts(problem, walkers), problem.steps, prob_bits=bits, seed=seed)
    return state, estimate(problem, state.counts.numpy(), state.visits.numpy(), walkers)


@pytest.mark.parametrize("shape,topology", [((41,), "line"), ((15, 15), "grid"), ((12, 10), "torus"),
                                            ((30,), "torus")])
def test_diffusion_matches_the_exact_lattice_kernel(shape, topology):
    p = diffusion(shape, topology, steps=30, stay=0.5)
    law, _ = propagate(p.chain, p.source, 30)  # the spectral formula is the walk's law ...
    assert np.abs(law - p.reference).max() < 1e-12
    state, est = run(p, 20_000, seed=1)
    assert chi2_goodness_of_fit(state.counts.numpy(), p.reference)["p_value"] > 1e-3  # ... and the walk follows it
    assert p.info["gaussian_tv"] < 0.02  # the Gaussian limit is already close at 30 steps
    assert errors(p, est, p.info["gaussian"])["tv"] < p.info["gaussian_tv"] + 0.05


def test_jump_diffusion_matches_the_merton_density():
    params = MertonParams(sigma=1.0, jump_rate=4.0, jump_mean=0.4, jump_std=0.6)
    p = jump_diffusion(121, steps=50, params=params)
    law, _ = propagate(p.chain, p.source, 50)
    assert 0.5 * np.abs(law - p.reference).sum() < 2e-3  # discretization error of the DTMC itself
    h = p.info["h"]
    assert abs(p.reference.sum() - 1) < 1e-12 and abs(merton_density(np.array([0.0]), 1.0, 1, 4, 0.4, 0.6)[0]
                                                       * h - p.reference[60]) < 1e-3
    state, _ = run(p, 20_000, seed=2)
    assert chi2_goodness_of_fit(state.counts.numpy(), p.reference)["p_value"] > 1e-3


def test_jump_diffusion_mesh_too_small_says_how_big():
    with pytest.raises(LowbitError, match=r"use --mesh \d+ or more"):
        jump_diffusion(41, steps=200)


def test_heat_field_matches_finite_differences_and_forward_feynman_kac():
    p = heat((10, 12))
    state, est = run(p, 20_000, seed=3)
    assert state.alive == 0 and state.step < p.steps
    assert errors(p, est)["rel_l2"] < 0.03
    centre = int(np.ravel_multi_index((6, 6), (10, 12)))
    start = np.zeros(p.chain.n_nodes, np.int64)
    start[centre] = 20_000
    fk = simulate(p.chain, start, p.steps, seed=4)
    assert abs(feynman_kac_point(p, fk.absorbed.numpy(), 20_000) - p.reference[centre]) < 0.02


def test_heat_fd_solves_the_discrete_laplace_equation():
    u = heat_fd(hot_edge((7, 9)))
    mean = (u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:]) / 4
    assert np.abs(u[1:-1, 1:-1] - mean).max() < 1e-12


def test_user_dtmc_matches_its_exact_law():
    p = dtmc(random_chain(25, 5, seed=7), steps=8, start=3)
    state, _ = run(p, 30_000, seed=5)
    assert chi2_goodness_of_fit(state.counts.numpy(), p.reference)["p_value"] > 1e-3


def test_error_shrinks_like_one_over_sqrt_walkers():
    p = diffusion((25,), steps=40)
    sizes = [250, 1000, 4000, 16000]
    errs = [np.mean([errors(p, run(p, w, seed=s)[1])["l2"] for s in range(4)]) for w in sizes]
    assert abs(fit_slope(sizes, errs)["slope"] + 0.5) < 0.1


def test_quantization_bias_is_reported_and_shrinks_with_bits():
    p = diffusion((31,), steps=40, stay=0.2)  # 0.4 per neighbour is not dyadic
    coarse, fine = quantization_bias(p, 4), quantization_bias(p, 12)
    assert 0 < fine["law_tv"] < coarse["law_tv"] <= coarse["law_tv_bound"]
    assert coarse["max_edge_error"] < 2**-4 and fine["max_edge_error"] < 2**-12
    exact = quantization_bias(diffusion((31,), steps=40, stay=0.5), 4)  # quarters: exactly representable
    assert exact["law_tv"] == 0 and exact["max_edge_error"] == 0
    assert quantization_bias(heat((6, 6)), 8)["field_max_abs"] == 0
    jump = quantization_bias(jump_diffusion(121, steps=50), 8)
    assert jump["dropped_edges"] > 0 and jump["law_tv"] > quantization_bias(jump_diffusion(121, steps=50), 16)["law_tv"]


def test_biased_circuit_is_detected_against_the_exact_reference():
    p = diffusion((31,), steps=40, stay=0.2)
    state, _ = run(p, 50_000, seed=1, bits=3)
    assert chi2_goodness_of_fit(state.counts.numpy(), p.reference)["p_value"] < 1e-6


@pytest.mark.parametrize("matrix,needle", [
    (np.array([[0.5, 0.4], [0.0, 1.0]]), "row 0 of the transition matrix sums to 0.9"),
    (np.array([[1.2, -0.2], [0.0, 1.0]]), "negative probability"),
    (np.array([[0.5, 0.5]]), "must be square"),
    (np.array([[np.nan, 1.0], [0.0, 1.0]]), "NaN"),
])
def test_invalid_transition_matrices(matrix, needle):
    with pytest.raises(LowbitError, match=needle):
        Chain.from_scipy(sp.csr_matrix(matrix))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_matrix_files_round_trip(tmp_path, suffix):
    chain = random_chain(10, 3, seed=2)
    back = load_matrix(save_matrix(tmp_path / f"m{suffix}", chain))
    assert np.allclose(back.to_scipy().toarray(), chain.to_scipy().toarray())


def test_unreadable_matrix_files(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(LowbitError, match="not a readable transition matrix"):
        load_matrix(tmp_path / "bad.npz")
    with pytest.raises(LowbitError, match="expected a .npz"):
        load_matrix(_touch(tmp_path / "m.csv"))
    with pytest.raises(LowbitError, match="not found"):
        load_matrix(tmp_path / "missing.npz")


def _touch(path):
    path.write_text("1,0\n0,1\n")
    return path


@pytest.mark.parametrize("text,needle", [("64xx", "not a mesh"), ("0x4", "positive"), ("-3", "positive"),
                                         ("2x2x2", "1 or 2 sizes")])
def test_bad_meshes(text, needle):
    with pytest.raises(LowbitError, match=needle):
        parse_mesh(text)


def test_heat_needs_an_interior():
    with pytest.raises(LowbitError, match="at least 3x3"):
        heat((2, 5))
