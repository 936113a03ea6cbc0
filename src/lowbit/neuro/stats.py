"""The statistical tests the tests, the CLI and the benchmark quote.

Chi-square tests pool every bin whose expected count is under five into one bin (the usual validity rule), so
sparse tails neither inflate nor hide a difference.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

MIN_EXPECTED = 5.0


def chi2_goodness_of_fit(counts: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Pearson chi-square of observed ``counts`` against the law ``probs`` (same length)."""
    counts = np.asarray(counts, np.float64).reshape(-1)
    expected = np.asarray(probs, np.float64).reshape(-1) * counts.sum()
    big = expected >= MIN_EXPECTED
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    exp *= obs.sum() / exp.sum()
    statistic = float(((obs - exp) ** 2 / exp).sum())
    dof = max(len(obs) - 1, 1)
    return {"statistic": statistic, "dof": dof, "p_value": float(stats.chi2.sf(statistic, dof))}


def chi2_two_sample(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Chi-square test that two histograms (any totals) come from one law (2 x K contingency table)."""
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    total = a + b
    small_expected = np.minimum(total * a.sum(), total * b.sum()) / total.sum()
    big = small_expected >= MIN_EXPECTED
    table = np.stack([np.append(a[big], a[~big].sum()), np.append(b[big], b[~big].sum())])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return {"statistic": 0.0, "dof": 1, "p_value": 1.0}
    res = stats.chi2_contingency(table, correction=False)
    return {"statistic": float(res.statistic), "dof": int(res.dof), "p_value": float(res.pvalue)}


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Two-sample Kolmogorov–Smirnov on the node index of 1-D histograms (conservative for tied lattice data)."""
    x = np.arange(len(a))
    res = stats.ks_2samp(np.repeat(x, np.asarray(a, np.int64)), np.repeat(x, np.asarray(b, np.int64)),
                         method="asymp")
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue)}


def fit_slope(walkers, errors) -> dict[str, float]:
    """Least-squares slope of ``log(error)`` on ``log(walkers)``; Monte Carlo should give about -0.5."""
    x = np.log(np.asarray(walkers, np.float64))
    y = np.log(np.asarray(errors, np.float64))
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    se = float(np.sqrt((resid**2).sum() / max(len(x) - 2, 1) / ((x - x.mean()) ** 2).sum())) if len(x) > 2 else 0.0
    return {"slope": float(slope), "intercept": float(intercept), "slope_stderr": se}
