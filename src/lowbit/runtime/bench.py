"""``lowbit bench``: latency of an exported model against its float baselines, in one process.

Variants, timed round-robin (so load from other processes hits all alike), median of ``runs`` after
``warmup`` calls: fp32 eager, fp32 channels-last, bf16 autocast (channels-last), the lowbit fast path and,
when onnxruntime is installed, the QDQ ONNX export. The float baselines are the model's architecture rebuilt
from the manifest with random weights: speed does not depend on the weights. A variant that would exceed
``budget_s`` gets fewer runs (recorded; flagged when below 30).

:func:`latency_table` measures the fast path per layer, at the model's shapes, for every bit width, in the
format :class:`lowbit.cost.MeasuredProfile` reads, so the frontier can use ``--cost measured``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import FastModel, _Val, cpu_has_vnni, layer_step

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
BITS = (2, 3, 4, 8)


def machine_info() -> dict[str, Any]:
    """CPU model, ISA flags that matter for int8/bf16, threads, load average and library versions."""
    info: dict[str, Any] = {"cpu": platform.processor() or "unknown", "flags": [], "threads": torch.get_num_threads(),
                            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
                            "python": platform.python_version(), "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        info["cpu"] = m.group(1).strip() if m else info["cpu"]
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
        info["flags"] = [f for f in CPU_FLAGS if f in flags]
        info["loadavg"] = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def time_variants(variants: dict[str, Callable[[], Any]], runs: int, warmup: int, budget_s: float
                  ) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved round-robin (in a shuffled order each round) so that load
    from other processes and cache effects hit all alike. A variant stops once its measured time passes
    ``budget_s`` (at least one run); a variant whose warm-up call alone passes the budget keeps that call as
    its only measurement (see :func:`cold_only`)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    _COLD.clear()
    for name, fn in variants.items():
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if dt > budget_s:
                times[name] = [dt]
                _COLD.add(name)
                break
    names, rng = list(variants), random.Random(0)
    for _ in range(runs):
        rng.shuffle(names)  # a new order each round: no variant always follows the same one (cache state)
        for name in names:
            fn = variants[name]
            if name in _COLD or (times[name] and sum(times[name]) > budget_s):
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


_COLD: set[str] = set()


def cold_only() -> set[str]:
    """Variants of the last :func:`time_variants` measured by their single warm-up call (over the budget)."""
    return set(_COLD)


@contextlib.contextmanager
def _silence_fd2():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory(fn: Callable[[], Any]) -> int | None:
    """Peak bytes PyTorch's CPU allocator holds during one call beyond what it held before (profiler)."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover
        return None
    with warnings.catch_warnings(), _silence_fd2():  # kineto prints start/stop lines on fd 2 in C++
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            peak = max(peak, int(e.extra_fields.total_allocated))
        stack.extend(e.children)
    return peak


def float_model(manifest: dict[str, Any]) -> torch.nn.Module | None:
    """The exported model's float architecture with random weights, from the manifest's ``model`` record."""
    spec = manifest.get("model")
    if not spec:
        return None
    from lowbit.models import create_model

    return create_model(spec["name"], spec["num_classes"], **spec.get("kwargs", {})).eval()


def benchmark(path: str | os.PathLike, batches: list[int], *, runs: int = 30, warmup: int = 3,
              budget_s: float = 60.0, onnx: bool = True, seed: int = 0,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every variant at every batch size; returns rows plus machine, sizes and fast-path layer paths."""
    model = IntegerModel.load(path)
    fast = FastModel(model)
    spec = model.input_spec
    fp = float_model(model.manifest)
    sizes = {"lowbit_file_bytes": Path(path).stat().st_size,
             "fp32_weight_bytes": model.manifest.get("fp32_weight_bytes")}
    onnx_model, onnx_note = None, None
    if onnx:
        onnx_model, onnx_note = _onnx_session(model, sizes)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for batch in batches:
        shape = (batch, *spec["shape"])
        pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        x = pixels if model.pixel_input else torch.randn(shape, generator=g)
        xf = torch.randn(shape, generator=g)
        variants: dict[str, Callable[[], Any]] = {}
        if fp is not None:
            fp_cl = _channels_last_copy(fp)
            xf_cl = xf.contiguous(memory_format=torch.channels_last)
            variants["fp32 eager"] = lambda fp=fp, xf=xf: fp(xf)
            variants["fp32 channels-last"] = lambda m=fp_cl, x=xf_cl: m(x)

            def bf16(m=fp_cl, x=xf_cl):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return m(x)

            variants["bf16 autocast"] = bf16
        variants["lowbit fast path"] = lambda x=x: fast(x)
        if onnx_model is not None:
            variants["onnxruntime"] = lambda x=x: onnx_model(x)
        if progress:
            progress(f"batch {batch}: timing {', '.join(variants)}")
        with torch.inference_mode():
            times = time_variants(variants, runs, warmup, budget_s)
            rows.extend(summarize(batch, times, {}))
            for row in rows[-len(variants):]:  # memory after timing: the profiler would perturb the timings
                fn = variants[row["variant"]]
                peak = None if row["variant"] == "onnxruntime" or row["cold_only"] else peak_memory(fn)
                row["peak_mib"] = None if peak is None else peak / 2**20
    return {"model": str(path), "machine": machine_info(), "vnni": fast.vnni, "paths": fast.paths,
            "sizes": sizes, "onnx_note": onnx_note, "runs": runs, "warmup": warmup, "budget_s": budget_s,
            "rows": rows}


def _channels_last_copy(m: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(m).to(memory_format=torch.channels_last)


def _onnx_session(model: IntegerModel, sizes: dict[str, Any]):
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, "onnxruntime is not installed"
    from lowbit.export.onnx_export import OnnxModel, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx")
        sizes["onnx_file_bytes"] = path.stat().st_size
        return OnnxModel(path, threads=torch.get_num_threads()), None


def summarize(batch: int, times: dict[str, list[float]], mem: dict[str, int | None]) -> list[dict[str, Any]]:
    """One row per variant: median/min ms, images/s, speed-ups against fp32 eager and bf16, peak MiB."""
    med = {name: statistics.median(t) for name, t in times.items()}
    base, bf16 = med.get("fp32 eager"), med.get("bf16 autocast")
    rows = []
    for name, t in times.items():
        rows.append({"batch": batch, "variant": name, "runs": len(t), "median_ms": 1e3 * med[name],
                     "min_ms": 1e3 * min(t), "images_per_s": batch / med[name],
                     "speedup_vs_fp32": base / med[name] if base else None,
                     "speedup_vs_bf16": bf16 / med[name] if bf16 else None,
                     "peak_mib": None if mem.get(name) is None else mem[name] / 2**20,
                     "cold_only": name in _COLD})
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The rows as a fixed-width table with the machine line on top."""
    m = result["machine"]
    lines = [f"{m['cpu']} | {m['threads']} threads | flags: {' '.join(m['flags']) or '-'} | torch {m['torch']} "
             f"| load {' '.join(f'{v:.1f}' for v in m.get('loadavg', []))}",
             f"{'batch':>5} {'variant':<20} {'runs':>4} {'median ms':>10} {'img/s':>9} {'vs fp32':>8} "
             f"{'vs bf16':>8} {'peak MiB':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['batch']:>5} {r['variant']:<20} {r['runs']:>4} {r['median_ms']:>10.2f} "
                     f"{r['images_per_s']:>9.1f} {_x(r['speedup_vs_fp32']):>8} {_x(r['speedup_vs_bf16']):>8} "
                     f"{'-' if r['peak_mib'] is None else format(r['peak_mib'], '.1f'):>9}")
    s = result["sizes"]
    fp32 = s.get("fp32_weight_bytes")
    ratio = f" ({fp32 / s['lowbit_file_bytes']:.1f}x smaller)" if fp32 else ""
    lines.append(f"file: {s['lowbit_file_bytes'] / 2**20:.3f} MiB .lowbit vs fp32 weights "
                 f"{'-' if not fp32 else format(fp32 / 2**20, '.3f')} MiB{ratio}"
                 + (f"; ONNX {s['onnx_file_bytes'] / 2**20:.3f} MiB" if "onnx_file_bytes" in s else ""))
    exact = [n for n, p in result["paths"].items() if p != "int8"]
    lines.append(f"fast path: {len(result['paths']) - len(exact)} layers on int8 kernels"
                 + (f", exact path for {', '.join(exact)}" if exact else ""))
    few = sorted({f"{r['variant']} (batch {r['batch']})" for r in result["rows"] if r["runs"] < 30})
    if few:
        lines.append(f"note: fewer than 30 runs (time budget) for: {', '.join(few)}")
    cold = sorted({f"{r['variant']} (batch {r['batch']})" for r in result["rows"] if r.get("cold_only")})
    if cold:
        lines.append(f"note: one cold call only (slower than the budget): {', '.join(cold)}")
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


# -------------------------------------------------------------------------------------- latency table
def latency_table(path: str | os.PathLike, batch: int = 8, runs: int = 20, warmup: int = 2,
                  seed: int = 0) -> dict[str, Any]:
    """Seconds per example of each conv/linear layer on the fast path at every ``(w_bits, a_bits)``.

    Keys follow :func:`lowbit.cost.latency_key`: ``"4"`` for w4a4, ``"w4a8"`` for mixed, ``"32"`` for the
    float (fp32 channels-last) layer. Weight codes are those LSQ's initial step gives Gaussian weights
    (max |code| about 28 at 8 bits), activation codes uniform over their range, so each key takes the path a
    trained layer of that width takes; ``"8_exact"`` adds the w8a8 worst case (full-range codes, which take
    the exact path where u8 x s8 pairs could saturate int16). Layers take their shapes and geometry from the
    file; the table's ``paths`` says which path each key took.
    """
    from lowbit.cost import latency_key

    model = IntegerModel.load(path)
    vnni = cpu_has_vnni()
    g = torch.Generator().manual_seed(seed)
    table: dict[str, dict[str, float]] = {}
    paths: dict[str, dict[str, str]] = {}
    for node in model.nodes:
        if node["op"] not in ("conv2d", "linear"):
            continue
        a, name = node["attrs"], node["name"]
        w_shape = list(model.params[name]["weight"].shape)
        in_shape = [batch, *model.shapes[node["inputs"][0]]]
        entry, kinds = {}, {}
        variants: dict[str, Callable[[], Any]] = {}
        for wb, ab, key in [*((w, x, latency_key(w, x)) for w in BITS for x in BITS), (8, 8, "8_exact")]:
            step, kinds[key] = _synthetic_layer(node["op"], a, w_shape, wb, ab, vnni, g, full=key == "8_exact")
            x = _Val(_codes_input(in_shape, ab, node["op"], g), 0)
            variants[key] = lambda step=step, x=x: step([x])
        variants["32"] = _float_layer(node["op"], a, w_shape, in_shape, g)
        kinds["32"] = "fp32"
        with torch.inference_mode():
            times = time_variants(variants, runs, warmup, budget_s=30.0)
        for key, t in times.items():
            entry[key] = statistics.median(t) / batch
        table[name], paths[name] = entry, kinds
    return {"layers": table, "unit": "seconds per example", "batch": batch, "runs": runs, "paths": paths,
            "model": str(path), "machine": machine_info()}


def _synthetic_layer(op, a, w_shape, w_bits, a_bits, vnni, g, full=False):
    lo_w, hi_w = -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1
    c = w_shape[0]
    if full:
        w = torch.randint(lo_w, hi_w + 1, w_shape, generator=g, dtype=torch.int32)
    else:  # LSQ's initial step 2 mean|w| / sqrt(Q_P) on Gaussian weights
        v = torch.randn(w_shape, generator=g)
        w = (v / (2 * v.abs().mean() / hi_w**0.5)).round().clamp(lo_w, hi_w).to(torch.int32)
    p = {"weight": w,
         "multiplier": torch.full((c,), 2**30, dtype=torch.int32), "shift": torch.full((c,), 40, dtype=torch.int32),
         "bias": torch.zeros(c, dtype=torch.int64)}
    attrs = {**a, "lo": 0, "hi": 15}
    return layer_step(op, attrs, p, (0, (1 << a_bits) - 1), 0, 0, vnni)


def _codes_input(shape, a_bits, op, g):
    x = torch.randint(0, 1 << a_bits, shape, generator=g, dtype=torch.uint8)
    return x.contiguous(memory_format=torch.channels_last) if op == "conv2d" else x


def _float_layer(op, a, w_shape, in_shape, g):
    import torch.nn.functional as F

    w = torch.randn(w_shape, generator=g)
    x = torch.randn(in_shape, generator=g)
    if op == "conv2d":
        w, x = w.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        return lambda: F.conv2d(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"])
    return lambda: F.linear(x, w)


def check_runs(runs: int) -> int:
    if runs < 1:
        raise LowbitError(f"--runs must be at least 1, got {runs}")
    return runs
