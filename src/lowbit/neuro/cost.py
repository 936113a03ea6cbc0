"""Cost model of the neuromorphic run: neurons, synapses, spikes, synaptic events, time and energy.

Every figure below is an *estimate*. The circuit layout is ours (inferred from the paper's description of
buffer, counter and probability neurons, not its exact netlist), and the per-event energies are published
headline figures for other workloads, applied to our event counts. Static power, host I/O and chip-to-chip
traffic are left out of the per-event estimates; the TrueNorth whole-chip line adds the chip's power over the
modelled time instead.

Per mesh node with ``K`` kept successors (``F`` probability neurons fire for a walker):

==========================  =========================================================================
neurons                     4 (buffer count + generator, counter count + generator) + (K - 1)
                            probability neurons + K outputs; 3 N + 2 E + 1 with the mesh's one supervisor
synapses                    each edge's output -> downstream buffer (E), buffer -> counter (1 per node),
                            counter generator -> K - 1 probability neurons + the default output (K),
                            probability neuron -> its output (+) and the next output (-) (2 (K - 1)),
                            supervisor -> the two generators (2 per node): 4 E + N in all
spikes per walker step      buffer generator + counter generator + output + F
events per walker step      K (counter generator fan-out) + 2 F (probability neurons) + 1 (output to
                            the next node) + 1 (buffer to counter); plus 2 per node per step (supervisor)
TrueNorth time              the counter re-emits one walker per 1 ms tick, so a step takes the largest
                            walker count at any node plus the circuit depth (4 ticks)
==========================  =========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.neuro.circuit import Circuit
from lowbit.neuro.simulate import WalkState

CIRCUIT_DEPTH_TICKS = 4  # buffer -> counter -> probability neuron -> output -> next buffer
ASSUMED_CPU_WATTS = 15.0  # one busy server core with its share of uncore and DRAM: an assumption, not a measurement


@dataclass(frozen=True)
class Platform:
    """Published per-event energy of a neuromorphic chip (an estimate once applied to our event counts)."""

    name: str
    joules_per_event: float
    source: str
    tick_seconds: float | None = None
    chip_watts: float | None = None
    neurons_per_chip: int | None = None


PLATFORMS = {
    "truenorth": Platform(
        "TrueNorth", 26e-12,
        "Merolla et al., 'A million spiking-neuron integrated circuit ...', Science 345:668 (2014): about 26 pJ "
        "per synaptic event; the chip runs in real time at 1 kHz ticks on about 70 mW",
        tick_seconds=1e-3, chip_watts=0.070, neurons_per_chip=1 << 20),
    "loihi": Platform(
        "Loihi", 23.6e-12,
        "Davies et al., 'Loihi: a neuromorphic manycore processor with on-chip learning', IEEE Micro 38(1):82 "
        "(2018): 23.6 pJ minimum energy per synaptic spike operation",
        neurons_per_chip=131072),
}


def circuit_size(circuit: Circuit) -> dict[str, int]:
    """Neurons and synapses of the whole mesh (independent of the number of walkers)."""
    n, e = circuit.n_nodes, circuit.n_edges
    neurons = 4 * n + (e - n) + e + 1
    synapses = e + n + e + 2 * (e - n) + 2 * n
    return {"nodes": n, "edges": e, "neurons": neurons, "synapses": synapses}


def walk_cost(circuit: Circuit, state: WalkState) -> dict[str, float]:
    """Spikes, synaptic events, modelled TrueNorth time and per-platform energy of a finished run."""
    steps, w = state.step, state.walker_steps
    visits = state.visits
    neuron_inputs = int((visits * (circuit.degrees() - 1)).sum())       # sum over walker steps of K - 1
    fired = int((visits * (circuit.indptr[1:] - 1)).sum()) - state.edge_sum  # sum of (last edge - edge taken)
    events = neuron_inputs + w + 2 * fired + 2 * w + 2 * circuit.n_nodes * steps
    spikes = 3 * w + fired + steps
    ticks = state.peak_load + CIRCUIT_DEPTH_TICKS * steps
    out = {**circuit_size(circuit), "walker_steps": w, "spikes": spikes, "synaptic_events": events,
           "spikes_per_walker_step": spikes / max(w, 1), "events_per_walker_step": events / max(w, 1),
           "truenorth_ticks": ticks}
    for key, p in PLATFORMS.items():
        out[f"{key}_energy_j"] = events * p.joules_per_event
        out[f"{key}_chips"] = -(-out["neurons"] // p.neurons_per_chip)
    tn = PLATFORMS["truenorth"]
    out["truenorth_seconds"] = ticks * tn.tick_seconds
    out["truenorth_chip_energy_j"] = out["truenorth_seconds"] * tn.chip_watts
    return out


def cpu_energy(seconds: float, watts: float = ASSUMED_CPU_WATTS) -> float:
    """Joules of a measured CPU run at an assumed power."""
    return seconds * watts
