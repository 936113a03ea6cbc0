"""Statistics a reviewer asks of a frontier over seeds: paired differences with confidence intervals, plan overlap.

Two methods' points at one budget and one seed share everything but the layer choice (same W4A4 start, recipe,
data order), so their accuracy difference is paired by seed; the interval is Student's t on the per-seed
differences. Plan overlap is the Jaccard index of the sets of layers each method dropped to 2 bits.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                      power: float = 0.8) -> dict[str, Any]:
    """Mean of ``a[i] - b[i]`` with a two-sided ``confidence`` interval (t distribution, n - 1 dof).

    With one pair the interval is unbounded (NaN ends): one seed says nothing about the spread.
    ``seeds_for_power``: how many pairs a test at this confidence needs to detect the observed mean with
    probability ``power``, were the observed mean and spread the true ones (normal approximation,
    n = ((z_{1-α/2} + z_power) · sd / mean)²; None for a zero mean); it says whether more seeds could settle
    a small difference.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need equally many paired values, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "low": math.nan, "high": math.nan, "excludes_zero": False,
                "seeds_for_power": None}
    from scipy.stats import norm, t

    sd = statistics.stdev(diffs)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    z = float(norm.ppf(0.5 + confidence / 2) + norm.ppf(power))
    needed = None if mean == 0 else max(2, math.ceil((z * sd / abs(mean)) ** 2))
    return {"n": n, "mean": mean, "sd": sd, "low": low, "high": high, "excludes_zero": bool(low > 0 or high < 0),
            "seeds_for_power": needed}


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """|A ∩ B| / |A ∪ B|; two empty plans are identical (1.0)."""
    a, b = set(a), set(b)
    return 1.0 if not a | b else len(a & b) / len(a | b)


def compare_methods(payloads: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str]],
                    key: str = "test_acc", confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per budget and (method, baseline) pair: the paired difference of ``key`` over seeds, and the mean plan
    overlap. ``payloads`` are frontier.json dicts of the same W4A4 run under different seeds."""
    by = {}
    for seed, payload in enumerate(payloads):
        for p in payload["points"]:
            if p.get("budget") is not None:
                by[(p["method"], p["budget"], seed)] = p
    budgets = sorted({b for _, b, _ in by})
    rows = []
    for budget in budgets:
        for m, base in pairs:
            seeds = [s for s in range(len(payloads)) if (m, budget, s) in by and (base, budget, s) in by]
            if not seeds:
                continue
            a = [by[(m, budget, s)][key] for s in seeds]
            b = [by[(base, budget, s)][key] for s in seeds]
            overlap = statistics.fmean(jaccard(by[(m, budget, s)]["low_layers"], by[(base, budget, s)]["low_layers"])
                                       for s in seeds)
            rows.append({"budget": budget, "method": m, "baseline": base, "key": key,
                         **paired_difference(a, b, confidence), "plan_overlap": overlap})
    return rows


__all__ = ["compare_methods", "jaccard", "paired_difference"]
