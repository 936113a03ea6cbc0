"""lowbit: aggressive low-precision inference for PyTorch networks.

Quantize weights and activations to 8/4/3/2 bits (LSQ, FAQ), select per-layer precision under budgets
(EAGL, ALPS, Hessian, random), measure the accuracy-throughput frontier, and export a truly integer model.
"""

from lowbit.errors import LowbitError

__version__ = "0.1.0"
__all__ = ["LowbitError", "__version__"]
