"""Task metrics: what ALPS and the frontier measure on validation, so they can rank layers for any task.

A metric is ``fn(model, data) -> float``, higher is better, where ``data`` is any source of
:mod:`lowbit.data.protocol` (the validation split); one that also takes ``batch_size`` and ``device`` keywords
gets them. ``"top1"`` (the default)
is the classification accuracy every command reported so far. Add others with :func:`register_metric`, or name
one as ``"package.module:function"``: lowbit imports that module (the user's own code) when the metric is used,
which is how a CLI run or a spawned worker finds a metric that no lowbit module registers.

    @register_metric("miou")
    def miou(model, dataset, *, batch_size=512, device="cpu") -> float: ...

    alps_scores(model, data, metric="miou")
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from lowbit.errors import LowbitError
from lowbit.plugins import import_callable

Metric = Callable[..., float]
_REGISTRY: dict[str, Metric] = {}
DEFAULT = "top1"


def register_metric(name: str) -> Callable[[Metric], Metric]:
    """Decorator: make ``fn`` available as ``metric=name`` (re-importing the same module may re-register)."""
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise LowbitError(f"metric name must be a non-empty string without ':', got {name!r}")

    def add(fn: Metric) -> Metric:
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise LowbitError(f"metric {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        _REGISTRY[name] = fn
        return fn

    return add


def list_metrics() -> list[str]:
    return sorted(_REGISTRY)


def get_metric(metric: str | Metric) -> Metric:
    """The function behind a registered name, a ``"module:function"`` string, or a callable as given."""
    if callable(metric):
        return metric
    if not isinstance(metric, str) or not metric:
        raise LowbitError(f"metric must be a name or 'package.module:function', got {metric!r}")
    if metric in _REGISTRY:
        return _REGISTRY[metric]
    if ":" not in metric:
        raise LowbitError(f"unknown metric {metric!r}; choose one of {', '.join(list_metrics())} or give "
                          "'package.module:function'")
    return import_callable(metric, "metric")


def metric_name(metric: str | Metric) -> str:
    """What results record: the name or string as given, ``module:qualname`` for a bare callable."""
    if isinstance(metric, str):
        return metric
    for name, fn in _REGISTRY.items():
        if fn is metric:
            return name
    return f"{metric.__module__}:{metric.__qualname__}"


def _takes(fn: Metric, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def measure(metric: str | Metric, model: nn.Module, dataset, *, batch_size: int = 512, device: str = "cpu",
            ) -> float:
    """``metric(model, dataset)``; a metric that takes ``batch_size`` / ``device`` keywords gets them too."""
    fn = get_metric(metric)
    kw = {k: v for k, v in (("batch_size", batch_size), ("device", device)) if _takes(fn, k)}
    value = fn(model, dataset, **kw)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LowbitError(f"metric {metric_name(metric)!r} returned {value!r}, not a number") from None


@register_metric("top1")
def top1(model: nn.Module, dataset, *, batch_size: int = 512, device: str = "cpu") -> float:
    """Top-1 accuracy (fraction); the mean pixel accuracy for per-pixel labels."""
    from lowbit.train import evaluate

    return evaluate(model, dataset, batch_size, device)[1]


__all__ = ["DEFAULT", "Metric", "get_metric", "list_metrics", "measure", "metric_name", "register_metric", "top1"]
