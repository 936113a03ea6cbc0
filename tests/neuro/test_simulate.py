"""The spiking density simulator and the conventional baseline: conservation, determinism, resume, agreement."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.neuro import WalkState, compile_circuit, diffusion, propagate, simulate, simulate_baseline, start_counts
from lowbit.neuro.stats import chi2_goodness_of_fit, chi2_two_sample
from tests.neuro.conftest import random_chain


@settings(max_examples=25)
@given(st.integers(0, 1000), st.integers(2, 30), st.integers(1, 6), st.integers(1, 16), st.integers(0, 400))
def test_walkers_are_conserved_without_absorbing_nodes(seed, n, degree, bits, walkers):
    chain = random_chain(n, degree, seed)
    start = np.random.default_rng(seed).multinomial(walkers, np.ones(n) / n)
    counts = []
    simulate(chain, start, 15, prob_bits=bits, seed=seed, checkpoint=lambda s: counts.append(s.alive),
             checkpoint_every=1, stop_when_empty=False)
    assert counts and set(counts) == {walkers}


def test_absorbed_plus_alive_is_conserved():
    chain = random_chain(20, 4, seed=1, absorbing=3)
    state = simulate(chain, np.full(20, 50), 40, seed=2)
    assert state.alive + int(state.absorbed.sum()) == 1000
    assert int(state.absorbed[3:].sum()) == 0 and int(state.absorbed.sum()) > 0


def test_same_seed_same_run_other_seed_other_run(chain):
    start = np.full(chain.n_nodes, 100)
    a = simulate(chain, start, 30, seed=5)
    b = simulate(chain, start, 30, seed=5)
    c = simulate(chain, start, 30, seed=6)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.visits, b.visits) and a.edge_sum == b.edge_sum
    assert not torch.equal(a.counts, c.counts)
    base = [simulate_baseline(chain, start, 30, seed=5).counts for _ in range(2)]
    assert torch.equal(*base)


def test_resume_from_a_checkpoint_is_bit_identical(chain):
    start = np.full(chain.n_nodes, 300)
    whole = simulate(chain, start, 70, seed=9)
    saved = []
    simulate(chain, start, 25, seed=9, checkpoint=lambda s: saved.append(s.to_payload()), checkpoint_every=10)
    resumed = simulate(chain, None, 70, seed=9, state=WalkState.from_payload(saved[-1]))
    assert resumed.step == 70 and torch.equal(whole.counts, resumed.counts)
    assert (whole.edge_sum, whole.peak_load, whole.walker_steps) == \
        (resumed.edge_sum, resumed.peak_load, resumed.walker_steps)


def test_spiking_and_conventional_agree_in_distribution(chain):
    start = np.zeros(chain.n_nodes, np.int64)
    start[0] = 20_000
    spiking = simulate(chain, start, 12, seed=1).counts.numpy()
    conventional = simulate_baseline(chain, start, 12, seed=1).counts.numpy()
    assert chi2_two_sample(spiking, conventional)["p_value"] > 1e-3
    law, _ = propagate(chain, start / start.sum(), 12)
    assert chi2_goodness_of_fit(spiking, law)["p_value"] > 1e-3
    assert chi2_goodness_of_fit(conventional, law)["p_value"] > 1e-3


def test_both_simulators_count_visits_for_absorbing_chains():
    chain = random_chain(15, 3, seed=4, absorbing=2)
    start = np.zeros(15, np.int64)
    start[5] = 5000
    a = simulate(chain, start, 500, seed=1)
    b = simulate_baseline(chain, start, 500, seed=1, visits=True)
    assert a.alive == b.alive == 0 and a.step < 500  # stopped once everyone was absorbed
    assert int(a.visits.sum()) == a.walker_steps and int(b.visits.sum()) == b.walker_steps
    assert chi2_two_sample(a.absorbed.numpy(), b.absorbed.numpy())["p_value"] > 1e-3


def test_a_compiled_circuit_can_be_reused():
    p = diffusion((9, 9), "torus", steps=10)
    circuit = compile_circuit(p.chain, 8)
    start = start_counts(p, 500)
    assert torch.equal(simulate(circuit, start, 10, seed=1).counts,
                       simulate(p.chain, start, 10, prob_bits=8, seed=1).counts)


def test_bad_start_and_device_are_user_errors(chain):
    with pytest.raises(LowbitError, match="shape"):
        simulate(chain, np.ones(3), 5)
    with pytest.raises(LowbitError, match=">= 0"):
        simulate(chain, -np.ones(chain.n_nodes), 5)
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="no CUDA"):
            simulate(chain, np.ones(chain.n_nodes), 5, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_is_bit_identical_to_cpu(chain):
    start = np.full(chain.n_nodes, 200)
    cpu = simulate(chain, start, 20, seed=3)
    gpu = simulate(chain, start, 20, seed=3, device="cuda")
    assert torch.equal(cpu.counts, gpu.counts.cpu()) and cpu.edge_sum == gpu.edge_sum
