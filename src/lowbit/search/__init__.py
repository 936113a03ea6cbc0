"""Choose which layers drop from 4 to 2 bits: exact knapsack / ILP selection under one or more budgets.

>>> plan, cost, sel = select_plan(layers, w4a4_reference_plan(layers), scores, min_throughput=1.5)
"""

from lowbit.search.select import select_plan
from lowbit.search.solver import DP_MAX_CAPACITY, METHODS, Selection, solve

__all__ = ["DP_MAX_CAPACITY", "METHODS", "Selection", "select_plan", "solve"]
