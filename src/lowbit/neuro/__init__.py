"""Neuromorphic random walks: Monte Carlo DTMCs as integer spiking circuits (the density method).

After Smith, Hill, Musuvathy, Aimone et al., "Neuromorphic scaling advantages for energy-efficient random walk
computations", Nature Electronics 5:102 (2022). Each mesh node is a small circuit of counter neurons and
stochastic probability neurons with integer weights; walkers are spikes, so the state is a walker count per
node. Self-contained: nothing here imports the quantization stages.

    from lowbit.neuro import WalkConfig, walk
    summary = walk(WalkConfig(problem="diffusion", mesh=(64, 64), walkers=32000, steps=200), "runs/walk")

    from lowbit.neuro import diffusion, simulate, start_counts
    p = diffusion((64, 64), "torus", steps=200)
    state = simulate(p.chain, start_counts(p, 32000), p.steps, prob_bits=8, seed=0)
"""

from lowbit.neuro.bias import quantization_bias
from lowbit.neuro.chain import Chain, load_matrix, propagate, save_matrix
from lowbit.neuro.circuit import Circuit, compile_circuit
from lowbit.neuro.config import WalkConfig, build_problem
from lowbit.neuro.cost import PLATFORMS, walk_cost
from lowbit.neuro.problems import (
    MertonParams,
    Problem,
    diffusion,
    dtmc,
    errors,
    estimate,
    heat,
    jump_diffusion,
    start_counts,
)
from lowbit.neuro.run import walk
from lowbit.neuro.simulate import WalkState, simulate, simulate_baseline

__all__ = [
    "PLATFORMS", "Chain", "Circuit", "MertonParams", "Problem", "WalkConfig", "WalkState", "build_problem",
    "compile_circuit", "diffusion", "dtmc", "errors", "estimate", "heat", "jump_diffusion", "load_matrix",
    "propagate", "quantization_bias", "save_matrix", "simulate", "simulate_baseline", "start_counts", "walk",
    "walk_cost",
]
