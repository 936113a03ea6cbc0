"""Deployment checks and benchmarks: what sits above both the exporter and the runtime.

Export writes the integer IR (:mod:`lowbit.ir`), the runtime's backends read it; neither imports the other.
This package uses both:

* :func:`verify`: runtime vs simulation (bit-exact), vs the fake-quant model, fast path and ONNX;
* :func:`check_lowering`: the independent check of the lowering, layer by layer against the fake-quant model,
  with batch-norm folds recomputed from the float model's statistics;
* :mod:`lowbit.deploy.bench`: latency of an exported model against its float baselines.
"""

from lowbit.deploy.lowering import LoweringCheck, check_lowering
from lowbit.deploy.verify import format_report, verify

__all__ = ["LoweringCheck", "check_lowering", "format_report", "verify"]
