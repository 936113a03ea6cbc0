"""Mixed 4/2-bit plans and the accuracy-throughput frontier of layer-selection methods.

    sel = PrecisionSelector(budget=0.5).fit(model, eagl_scores(model), example_input=x)   # one plan
    frontier("runs/w4a4", "runs/frontier", FrontierConfig(budgets=(0.25, 0.5, 0.75, 1.0)))  # the comparison
"""

from lowbit.frontier.report import plot_frontier, spearman, spearman_vs
from lowbit.frontier.select import (
    BUDGET_KINDS,
    COSTS,
    PrecisionSelector,
    SelectResult,
    check_budget,
    parse_budgets,
    select,
    select_layers,
)
from lowbit.frontier.sweep import ENDPOINTS, FrontierConfig, frontier, load_points, point_checkpoint

__all__ = [
    "BUDGET_KINDS", "COSTS", "ENDPOINTS", "FrontierConfig", "PrecisionSelector", "SelectResult", "check_budget",
    "frontier", "load_points", "parse_budgets", "plot_frontier", "point_checkpoint", "select", "select_layers",
    "spearman", "spearman_vs",
]
