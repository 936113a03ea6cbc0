import numpy as np
import pytest
import scipy.sparse as sp

from lowbit.neuro import Chain


def random_chain(n: int, degree: int, seed: int, absorbing: int = 0) -> Chain:
    """A random sparse row-stochastic chain (every row ``degree`` successors incl. a self-loop)."""
    rng = np.random.default_rng(seed)
    rows, cols, vals = [], [], []
    for i in range(n):
        succ = np.unique(np.append(rng.choice(n, size=min(degree, n), replace=False), i))
        p = rng.dirichlet(np.ones(len(succ)))
        rows += [i] * len(succ)
        cols += list(succ)
        vals += list(p)
    mask = np.zeros(n, bool)
    mask[:absorbing] = True
    return Chain.from_scipy(sp.csr_matrix((vals, (rows, cols)), shape=(n, n)), absorbing=mask)


@pytest.fixture
def chain():
    return random_chain(12, 4, seed=0)
