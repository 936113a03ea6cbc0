"""Kernel registries: each backend registers one kernel per op of the op table it runs.

    @kernel("conv2d", backend="reference")
    def _conv2d(node, params, xs): ...

A kernel's signature is the backend's own (the reference takes values and returns a value, the fast path
builds a step, ONNX emits nodes); the registry only guarantees one kernel per (backend, op), for ops in the op
table. :func:`require_kernels` is how a backend refuses a graph it cannot run, naming the ops; a backend that
runs what it lacks through the reference kernels says so with :func:`kernel_or_fallback`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from lowbit.errors import LowbitError
from lowbit.ir.ops import OPS

BACKENDS = ("reference", "cpu_fast", "cpu_fast_encoder", "gpu", "onnx")  # who reads the IR (each backend's module)

F = TypeVar("F", bound=Callable[..., Any])
_KERNELS: dict[str, dict[str, Callable[..., Any]]] = {b: {} for b in BACKENDS}


def kernel(op: str, backend: str) -> Callable[[F], F]:
    """Register the decorated function as ``backend``'s kernel for ``op`` (once per pair)."""
    if op not in OPS:
        raise LowbitError(f"cannot register a {backend} kernel for unknown op {op!r}: register the op first "
                          f"(lowbit.ir.register_op)")
    table = _KERNELS.setdefault(backend, {})

    def register(fn: F) -> F:
        if op in table:
            raise LowbitError(f"backend {backend!r} already has a kernel for op {op!r}")
        table[op] = fn
        return fn

    return register


def unregister_kernel(op: str, backend: str) -> None:
    """Remove a kernel (tests and plugins that add an op temporarily)."""
    _KERNELS.get(backend, {}).pop(op, None)


def kernels(backend: str) -> dict[str, Callable[..., Any]]:
    """A copy of ``backend``'s kernels by op."""
    return dict(_KERNELS.get(backend, {}))


def missing_kernels(backend: str, ops: Iterable[str] | None = None) -> list[str]:
    """The ops (default: every op in the table) for which ``backend`` has no kernel."""
    have = _KERNELS.get(backend, {})
    return [op for op in (OPS if ops is None else ops) if op not in have]


def require_kernels(backend: str, ops: Iterable[str], source: str = "model") -> dict[str, Callable[..., Any]]:
    """``backend``'s kernels, or a :class:`LowbitError` naming each op of ``ops`` it has no kernel for."""
    missing = sorted(set(missing_kernels(backend, ops)))
    if missing:
        raise LowbitError(f"{source}: the {backend} backend has no kernel for op(s) {', '.join(missing)}")
    return kernels(backend)


def kernel_or_fallback(backend: str, op: str, fallback: str = "reference") -> tuple[Callable[..., Any], bool]:
    """``(kernel, True)`` from ``backend``, else ``(kernel, False)`` from ``fallback``; raises if neither has
    one."""
    if op in _KERNELS.get(backend, {}):
        return _KERNELS[backend][op], True
    if op in _KERNELS.get(fallback, {}):
        return _KERNELS[fallback][op], False
    raise LowbitError(f"op {op!r} has no kernel in the {backend} backend nor in {fallback}")
