"""The cost model counts neurons, synapses, spikes and synaptic events as its table says."""

import numpy as np
import scipy.sparse as sp

from lowbit.neuro import Chain, compile_circuit, simulate, walk_cost
from lowbit.neuro.cost import PLATFORMS


def test_counts_of_a_two_node_chain_by_hand():
    # node 0 -> {0, 1} with 1/2 each (K=2), node 1 -> {1} (K=1): E = 3 kept edges, N = 2
    chain = Chain.from_scipy(sp.csr_matrix(np.array([[0.5, 0.5], [0.0, 1.0]])))
    circuit = compile_circuit(chain, 8)
    start = np.array([1000, 0])
    state = simulate(circuit, start, 1, seed=0)
    c = walk_cost(circuit, state)
    assert c["neurons"] == 3 * 2 + 2 * 3 + 1 and c["synapses"] == 4 * 3 + 2
    went = int(state.counts[1])  # walkers that took edge 1 (the last edge: no probability neuron fired)
    fired = 1000 - went          # the rest fired node 0's one probability neuron
    assert c["walker_steps"] == 1000
    assert c["spikes"] == 3 * 1000 + fired + 1
    assert c["synaptic_events"] == 1000 * 1 + 3 * 1000 + 2 * fired + 2 * 2
    assert c["truenorth_ticks"] == 1000 + 4
    assert np.isclose(c["truenorth_energy_j"], c["synaptic_events"] * PLATFORMS["truenorth"].joules_per_event)
    assert np.isclose(c["truenorth_chip_energy_j"], 1.004 * 0.070)


def test_every_platform_cites_its_source():
    for p in PLATFORMS.values():
        assert p.joules_per_event > 0 and "(20" in p.source
