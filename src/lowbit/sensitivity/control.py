"""The random control: seeded uniform scores, so "which layers" is chosen by chance at the same budget.

Any method worth its cost must beat this at equal throughput (methods.md §1.3 controls).
"""

from __future__ import annotations

import time

import numpy as np
from torch import Tensor, nn

from lowbit.sensitivity.candidates import Candidates, as_rng, candidate_layers, make_rows, profile
from lowbit.sensitivity.table import SensitivityTable, no_passes


def random_scores(model: nn.Module, candidates: Candidates = None, *,
                  random_state: int | np.random.Generator | None = None, include_first_last: bool = False,
                  example_input: Tensor | None = None) -> SensitivityTable:
    """Scores drawn uniformly from [0, 1), one per candidate in module order, from ``random_state``."""
    t0 = time.perf_counter()
    names = candidate_layers(model, candidates, include_first_last)
    seed = int(as_rng(random_state).integers(2**62))
    draws = np.random.default_rng(seed).random(len(names))
    scores = dict(zip(names, map(float, draws)))
    wall = time.perf_counter() - t0
    rows = make_rows(model, names, scores, profile(model, example_input))
    return SensitivityTable("random", rows, wall, no_passes(),
                            {"seed": seed, "include_first_last": include_first_last})


__all__ = ["random_scores"]
