"""The integer routing circuit: weights, thresholds, and that walkers leave with the programmed probabilities."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.neuro import Chain, compile_circuit
from lowbit.neuro.circuit import quantize_probs, thresholds
from lowbit.neuro.stats import chi2_goodness_of_fit
from tests.neuro.conftest import random_chain


def one_node_chain(p):
    """Node 0 routes to nodes 0..K-1 with probabilities ``p``; the others stay put."""
    k = len(p)
    m = sp.lil_matrix((k, k))
    m[0, :] = p
    for i in range(1, k):
        m[i, i] = 1.0
    return Chain.from_scipy(m.tocsr())


def row0_weights(p, bits: int) -> np.ndarray:
    """Integer weight of each successor of node 0 (zero where the matrix has no edge)."""
    chain = one_node_chain(p)
    w = quantize_probs(chain, bits)
    out = np.zeros(len(p), np.int64)
    out[chain.indices[: chain.indptr[1]]] = w[: chain.indptr[1]]
    return out


def route_from_node0(circuit, walkers: int, seed: int) -> np.ndarray:
    node = torch.zeros(walkers, dtype=torch.int64)
    r = thresholds(seed, range(1), torch.arange(walkers), circuit.bits)[0]
    dest = circuit.successors[circuit.route(node, r)]
    return torch.bincount(dest, minlength=circuit.n_nodes).numpy()


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12).filter(lambda v: sum(v) > 1e-3),
       st.integers(1, 24))
def test_weights_sum_to_one_and_round_within_one_unit(raw, bits):
    p = np.array(raw) / sum(raw)
    w = row0_weights(p, bits)
    assert w.sum() == 2**bits and (w >= 0).all()
    assert np.abs(w / 2**bits - p).max() < 2.0**-bits


def test_ties_go_to_the_self_loop_so_symmetric_stencils_do_not_drift():
    p = np.full(5, 0.2)  # 2**16 / 5 is not an integer: one unit is left over
    w = row0_weights(p, 16)
    assert w[0] == w[1:].max() + 1 and len(set(w[1:])) == 1


@given(st.integers(0, 10_000), st.integers(1, 16))
def test_route_is_the_neuron_by_neuron_definition(seed, bits):
    circuit = compile_circuit(random_chain(9, 5, seed=seed % 97), bits)
    node = torch.arange(9).repeat(20)
    r = thresholds(seed, range(1), torch.arange(len(node)), bits)[0]
    assert torch.equal(circuit.route(node, r), circuit.route_by_neurons(node, r))
    taken = circuit.route(node, r)
    assert bool(((taken >= circuit.indptr[node]) & (taken < circuit.indptr[node + 1])).all())


def test_walkers_leave_with_the_programmed_probabilities():
    p = np.array([0.1, 0.25, 0.05, 0.6])
    circuit = compile_circuit(one_node_chain(p), 16)
    counts = route_from_node0(circuit, 200_000, seed=3)
    test = chi2_goodness_of_fit(counts, p)
    assert test["p_value"] > 1e-3, test


def test_coarse_weights_route_with_the_quantized_not_the_programmed_probabilities():
    p = np.array([0.3, 0.3, 0.4])
    circuit = compile_circuit(one_node_chain(p), 3)  # eighths: 2/8, 3/8, 3/8
    counts = route_from_node0(circuit, 200_000, seed=4)
    realised = circuit.to_chain().to_scipy().toarray()[0]
    assert chi2_goodness_of_fit(counts, realised)["p_value"] > 1e-3
    assert chi2_goodness_of_fit(counts, p)["p_value"] < 1e-10


def test_thresholds_are_uniform_deterministic_and_step_dependent():
    slots = torch.arange(1 << 16)
    r = thresholds(7, range(3), slots, 8)
    assert r.shape == (3, 1 << 16) and int(r.min()) >= 0 and int(r.max()) < 256
    assert chi2_goodness_of_fit(torch.bincount(r[0], minlength=256).numpy(), np.full(256, 1 / 256))["p_value"] > 1e-3
    assert torch.equal(r[1], thresholds(7, range(1, 2), slots, 8)[0])  # a row depends on its step only
    assert not torch.equal(r[0], r[1])
    assert not torch.equal(r[0], thresholds(8, range(1), slots, 8)[0])
    assert abs(np.corrcoef(r[0].numpy(), r[1].numpy())[0, 1]) < 0.02


def test_zero_weight_edges_are_dropped():
    p = np.array([0.999, 0.001])
    circuit = compile_circuit(one_node_chain(p), 4)
    assert circuit.degrees()[0] == 1 and circuit.to_chain().n_edges == 2


@pytest.mark.parametrize("bits", [0, 25, 2.5])
def test_prob_bits_out_of_range(bits):
    with pytest.raises(LowbitError, match="prob_bits"):
        compile_circuit(random_chain(3, 2, 0), bits)
