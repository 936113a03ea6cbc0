"""Cost model: per-layer MACs measured by tracing, plan costs (BOPs, weight bytes) and relative throughput.

>>> layers = profile_layers(model, torch.randn(1, 3, 32, 32))
>>> plan_cost(layers, plan).relative_throughput   # 1.0 for the W4A4 preset, > 1 with 2-bit layers
"""

from lowbit.cost.hardware import (
    FLOAT_BITS,
    VALID_BITS,
    BitsProportionalProfile,
    BopsProfile,
    HardwareProfile,
    MeasuredProfile,
    SizeProfile,
    effective_bits,
    get_profile,
    latency_key,
    layer_bops,
    layer_weight_bytes,
    list_profiles,
)
from lowbit.cost.layers import LayerInfo, profile_layers
from lowbit.cost.plan import (
    Plan,
    PlanCost,
    as_plan,
    bops,
    low_bit_mac_fraction,
    plan_cost,
    plan_time,
    relative_throughput,
    total_macs,
    w4a4_reference_plan,
    weight_bytes,
)

__all__ = [
    "FLOAT_BITS", "VALID_BITS", "BitsProportionalProfile", "BopsProfile", "HardwareProfile", "LayerInfo",
    "MeasuredProfile", "Plan", "PlanCost", "SizeProfile", "as_plan", "bops", "effective_bits", "get_profile",
    "latency_key", "layer_bops", "layer_weight_bytes", "list_profiles", "low_bit_mac_fraction", "plan_cost",
    "plan_time", "profile_layers", "relative_throughput", "total_macs", "w4a4_reference_plan", "weight_bytes",
]
