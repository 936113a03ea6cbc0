"""``lowbit bench``: latency of an exported model against its float baselines, in one process.

A harness above export and runtime (it builds float baselines from :mod:`lowbit.models` and exports ONNX), so
it lives in :mod:`lowbit.deploy`, not in the runtime.

Variants, timed round-robin (so load from other processes hits all alike), median of ``runs`` after
``warmup`` calls: fp32 eager, fp32 channels-last, fp32 ``torch.compile`` (Inductor, freezing), bf16 autocast
(channels-last), PyTorch's own int8 for the same architecture (:func:`pytorch_int8`: PT2E with the x86
Inductor quantizer when torchao is installed, else eager ``torch.ao`` x86 static quantization), the lowbit fast
path (bit-exact, compiled) and, when onnxruntime is installed, the QDQ ONNX export. These anchors show where
the export stands against what a user would run instead. The float baselines are the model's architecture
rebuilt from the manifest with random weights (the int8 anchor calibrated on random inputs): speed does not
depend on the weights. Compiled variants are compiled by a first call outside the timing, whose seconds are
reported (``compile_s``). A variant that would exceed ``budget_s`` gets fewer runs (recorded; flagged when
below 30).

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
from lowbit.quant.bits import SUPPORTED_BITS
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import FastModel, _Val, cpu_capability, layer_step

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


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
    for lib in ("onnxruntime", "torchao"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info[lib] = __import__(lib).__version__
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


def float_model(manifest: dict[str, Any], name: str | None = None, kwargs: dict[str, Any] | None = None
                ) -> torch.nn.Module | None:
    """The exported model's float architecture with random weights: from the manifest's ``model`` record (a
    registry name or the user's factory, as the run recorded it), or ``name`` / ``kwargs`` given."""
    spec = manifest.get("model") or {}
    name = name or spec.get("name")
    if not name:
        return None
    from lowbit.models import create_model

    kwargs = spec.get("kwargs", {}) if kwargs is None else kwargs
    return create_model(name, spec.get("num_classes"), **kwargs).eval()


def _channels_last_or_none(m: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module | None:
    """A channels-last copy of ``m``, or None for user code such as ``x.view(x.size(0), -1)`` that fails on
    channels-last tensors (such models are timed in NCHW only)."""
    if x.ndim != 4:
        return None
    m_cl = _channels_last_copy(m)
    try:
        with torch.inference_mode():
            m_cl(x[:2].contiguous(memory_format=torch.channels_last))
        return m_cl
    except RuntimeError:
        return None


def pytorch_int8(model: torch.nn.Module, example: torch.Tensor) -> tuple[Callable[[torch.Tensor], Any], str]:
    """PyTorch's own static int8 for ``model`` (speed only: calibrated on ``example``), and its label.

    With torchao: ``torch.export`` (strict) -> ``X86InductorQuantizer`` -> ``prepare_pt2e`` / calibrate /
    ``convert_pt2e`` -> ``torch.compile``, to be called with freezing on (:func:`_frozen`; compiled on the first
    call), every conv/linear on oneDNN int8 with add/ReLU fused. Without torchao: eager
    ``torch.ao`` FX static quantization with the x86 engine (expects channels-last input for speed)."""
    import copy

    m = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torchao.quantization.pt2e import move_exported_model_to_eval
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
        except ImportError:
            from torch.ao.quantization import get_default_qconfig_mapping
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

            torch.backends.quantized.engine = "x86"
            prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), (example,))
            with torch.no_grad():
                prepared(example)
            return convert_fx(prepared), "PyTorch int8 (torch.ao x86, eager)"
        exported = torch.export.export(m, (example,), strict=True).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            prepared(example)
        converted = convert_pt2e(prepared)
        move_exported_model_to_eval(converted)
    return torch.compile(converted), "PyTorch int8 (PT2E x86 inductor)"


def compile_call(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` spends compiling: its first call, plus what the second call takes beyond the third (in
    case a second call recompiles)."""
    times = []
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times[0] + max(0.0, times[1] - times[2])


def _frozen(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """Call ``fn`` with Inductor's freezing on (weights folded in as constants, as PT2E and fp32 deployment
    compile), every time: a call under another config recompiles."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        return fn(x)


def anchor_variants(fp: torch.nn.Module, xf: torch.Tensor, compile_s: dict[str, float],
                    progress: Callable[[str], None] | None = None) -> dict[str, Callable[[], Any]]:
    """fp32 ``torch.compile`` (freezing) and PyTorch's own int8 (:func:`pytorch_int8`) for ``xf``, compiled
    here; their first-call seconds go to ``compile_s``. A variant that fails to build is left out (noted in
    ``compile_s`` as ``None``)."""
    out: dict[str, Callable[[], Any]] = {}
    xcl = xf.contiguous(memory_format=torch.channels_last) if xf.ndim == 4 else xf
    # A fresh Dynamo cache: graphs compiled earlier in this process for the same forward code (another run, a
    # test) would otherwise count against the recompile limit and fail the anchor's guards.
    torch._dynamo.reset()
    # PyTorch int8 first: torch.export resets Dynamo's caches, which would drop an earlier compile
    try:
        q, label = pytorch_int8(fp, xf)
        x_in = xf if "PT2E" in label else xcl
        compile_s[label] = compile_call(lambda: _frozen(q, x_in))
        out[label] = lambda: _frozen(q, x_in)
    except Exception as e:  # noqa: BLE001
        compile_s["PyTorch int8"] = None
        if progress:
            progress(f"PyTorch int8 anchor failed: {str(e).splitlines()[0][:200]}")
    compiled = torch.compile(_channels_last_or_none(fp, xf) or fp)
    try:
        compile_s["fp32 compiled"] = compile_call(lambda: _frozen(compiled, xcl))
        out["fp32 compiled"] = lambda: _frozen(compiled, xcl)
    except Exception as e:  # noqa: BLE001 - an anchor that does not build is reported, not fatal
        compile_s["fp32 compiled"] = None
        if progress:
            progress(f"fp32 torch.compile failed: {str(e).splitlines()[0][:200]}")
    return out


def benchmark(path: str | os.PathLike, batches: list[int], *, runs: int = 30, warmup: int = 3,
              budget_s: float = 60.0, onnx: bool = True, seed: int = 0,
              progress: Callable[[str], None] | None = None, model_name: str | None = None,
              model_kwargs: dict[str, Any] | None = None, anchors: bool = True) -> dict[str, Any]:
    """Time every variant at every batch size; returns rows plus machine, sizes, compile times and the fast
    path's layer paths.

    The float baselines are the architecture the manifest records, or ``model_name`` (a registry name or
    ``package.module:factory``) with ``model_kwargs``; ``anchors``: also fp32 ``torch.compile`` and PyTorch's
    own int8 (:func:`anchor_variants`).
    """
    model = IntegerModel.load(path)
    if model.token_input:
        return benchmark_encoder(model, batches, runs=runs, warmup=warmup, budget_s=budget_s, onnx=onnx, seed=seed,
                                 progress=progress, model_name=model_name, model_kwargs=model_kwargs)
    fast = FastModel(model, compile=True)
    spec = model.input_spec
    fp = float_model(model.manifest, model_name, model_kwargs)
    sizes = {"lowbit_file_bytes": Path(path).stat().st_size,
             "fp32_weight_bytes": model.manifest.get("fp32_weight_bytes")}
    onnx_model, onnx_note = None, None
    if onnx:
        onnx_model, onnx_note = _onnx_session(model, sizes)
    g = torch.Generator().manual_seed(seed)
    rows, compile_s = [], {}
    for batch in batches:
        shape = (batch, *spec["shape"])
        pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        x = pixels if model.pixel_input else torch.randn(shape, generator=g)
        xf = torch.randn(shape, generator=g)
        variants: dict[str, Callable[[], Any]] = {}
        if fp is not None:
            fp_cl = _channels_last_or_none(fp, xf)
            cl = fp_cl is not None
            fp_cl = fp_cl if cl else fp
            xf_cl = xf.contiguous(memory_format=torch.channels_last) if cl else xf
            variants["fp32 eager"] = lambda fp=fp, xf=xf: fp(xf)
            if cl:
                variants["fp32 channels-last"] = lambda m=fp_cl, x=xf_cl: m(x)

            def bf16(m=fp_cl, x=xf_cl):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return m(x)

            variants["bf16 autocast"] = bf16
            if anchors:
                cs: dict[str, float] = {}
                variants.update(anchor_variants(fp, xf, cs, progress))
                compile_s.update({f"{k} (batch {batch})": v for k, v in cs.items()})
        compile_s[f"lowbit fast path (batch {batch})"] = compile_call(lambda x=x: fast(x))
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
    return {"model": str(path), "machine": machine_info(), "vnni": fast.vnni, "capability": fast.capability,
            "paths": fast.paths, "requant": fast.requant, "fallbacks": fast.fallbacks, "compile_s": compile_s,
            "sizes": sizes, "onnx_note": onnx_note, "runs": runs, "warmup": warmup, "budget_s": budget_s,
            "rows": rows}


def token_inputs(model: IntegerModel, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token inputs for an encoder file: ids below each embedding's vocabulary, an all-ones attention
    mask, zeros for inputs nothing embeds."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *model.input_spec["shape"])
    out = {}
    for name in model.graph.inputs:
        readers = model.graph.readers(name)
        emb = next((n for n in readers if n.op == "embedding"), None)
        if emb is not None:
            out[name] = torch.randint(0, model.params[emb.name]["weight"].shape[0], shape, generator=g)
        elif any(n.op == "attention_mask" for n in readers):
            out[name] = torch.ones(shape, dtype=torch.int64)
        else:
            out[name] = torch.zeros(shape, dtype=torch.int64)
    return out


def int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """PyTorch's own dynamic int8 quantization of every Linear (``torch.ao.quantization.quantize_dynamic``): the
    int8 a user of an encoder would pick first (activations quantized per call, float output)."""
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def benchmark_encoder(model: IntegerModel, batches: list[int], *, runs: int = 30, warmup: int = 3,
                      budget_s: float = 60.0, onnx: bool = True, seed: int = 0,
                      progress: Callable[[str], None] | None = None, model_name: str | None = None,
                      model_kwargs: dict[str, Any] | None = None, reference: bool = False) -> dict[str, Any]:
    """:func:`benchmark` for an encoder file (token inputs): fp32 eager, bf16 autocast and PyTorch's dynamic
    int8 (:func:`int8_dynamic`) of the float architecture, the lowbit fast path (compiled, bit-exact) and
    onnxruntime; ``reference`` adds the integer reference runtime."""
    from lowbit.runtime.fast_encoder import FastEncoderModel

    fast = FastEncoderModel(model, compile=True)
    fp = float_model(model.manifest, model_name, model_kwargs)
    sizes = {"lowbit_file_bytes": Path(model.source).stat().st_size if Path(model.source).is_file() else None,
             "fp32_weight_bytes": model.manifest.get("fp32_weight_bytes")}
    onnx_model, onnx_note = _onnx_session(model, sizes) if onnx else (None, None)
    dyn = int8_dynamic(fp) if fp is not None else None
    rows, compile_s = [], {}
    for batch in batches:
        x = token_inputs(model, batch, seed)
        variants: dict[str, Callable[[], Any]] = {}
        if fp is not None:
            variants["fp32 eager"] = lambda x=x: fp(**x)

            def bf16(x=x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return fp(**x)

            variants["bf16 autocast"] = bf16
            variants["PyTorch int8 (dynamic, Linear)"] = lambda x=x: dyn(**x)
        if reference:
            variants["lowbit reference"] = lambda x=x: model(x)
        compile_s[f"lowbit fast path (batch {batch})"] = compile_call(lambda x=x: fast(x))
        variants["lowbit fast path"] = lambda x=x: fast(x)
        if onnx_model is not None:
            variants["onnxruntime"] = lambda x=x: onnx_model(x)
        if progress:
            progress(f"batch {batch}: timing {', '.join(variants)}")
        with torch.inference_mode():
            times = time_variants(variants, runs, warmup, budget_s)
        rows.extend(summarize(batch, times, {}))
    return {"model": model.source, "machine": machine_info(), "vnni": fast.vnni, "capability": fast.capability,
            "paths": fast.paths, "requant": fast.requant, "fallbacks": fast.fallbacks, "compile_s": compile_s,
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
             f"{'batch':>5} {'variant':<34} {'runs':>4} {'median ms':>10} {'img/s':>9} {'vs fp32':>8} "
             f"{'vs bf16':>8} {'peak MiB':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['batch']:>5} {r['variant']:<34} {r['runs']:>4} {r['median_ms']:>10.2f} "
                     f"{r['images_per_s']:>9.1f} {_x(r['speedup_vs_fp32']):>8} {_x(r['speedup_vs_bf16']):>8} "
                     f"{'-' if r['peak_mib'] is None else format(r['peak_mib'], '.1f'):>9}")
    s = result["sizes"]
    fp32 = s.get("fp32_weight_bytes")
    ratio = f" ({fp32 / s['lowbit_file_bytes']:.1f}x smaller)" if fp32 else ""
    lines.append(f"file: {(s['lowbit_file_bytes'] or 0) / 2**20:.3f} MiB .lowbit vs fp32 weights "
                 f"{'-' if not fp32 else format(fp32 / 2**20, '.3f')} MiB{ratio}"
                 + (f"; ONNX {s['onnx_file_bytes'] / 2**20:.3f} MiB" if "onnx_file_bytes" in s else ""))
    lines.append(describe_paths(result))
    if result.get("compile_s"):
        lines.append("first-call compile: " + ", ".join(
            f"{k} {'failed' if v is None else format(v, '.1f') + ' s'}" for k, v in result["compile_s"].items()))
    few = sorted({f"{r['variant']} (batch {r['batch']})" for r in result["rows"] if r["runs"] < 30})
    if few:
        lines.append(f"note: fewer than 30 runs (time budget) for: {', '.join(few)}")
    cold = sorted({f"{r['variant']} (batch {r['batch']})" for r in result["rows"] if r.get("cold_only")})
    if cold:
        lines.append(f"note: one cold call only (slower than the budget): {', '.join(cold)}")
    return "\n".join(lines)


def describe_paths(result: dict[str, Any]) -> str:
    """One line: which conv/linear layers run on oneDNN int8 (how many requantizing in the kernel), which on an
    exact float conv and why, the glue's arithmetic (requantizations per type) and the reference-kernel nodes."""
    paths = result["paths"]
    other = {n: p for n, p in paths.items() if not p.startswith("int8")}
    fused = sum(p == "int8 fused" for p in paths.values())
    modes: dict[str, int] = {}
    for r in (result.get("requant") or {}).values():
        if r != "in the int8 kernel":
            modes[r.split(" ")[0]] = modes.get(r.split(" ")[0], 0) + 1
    cap = f" ({result['capability']} assumed)" if "capability" in result else ""
    return (f"fast path{cap}, bit-exact: {len(paths) - len(other)}/{len(paths)} conv/linear layers on oneDNN int8"
            + (f" ({fused} requantizing in the kernel, uint8 out)" if fused else "")
            + (f"; exact float conv for {', '.join(f'{n} [{p}]' for n, p in other.items())}" if other else "")
            + (f"; glue requantization in {', '.join(f'{m} x{n}' for m, n in modes.items())}" if modes else "")
            + (f"; reference kernel for {', '.join(result['fallbacks'])}" if result.get("fallbacks") else ""))


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
    file; the table's ``paths`` says which path each key took, on the CPU capability ``capability`` records
    (:func:`lowbit.runtime.fastpath.cpu_capability`: detected, or forced with ``LOWBIT_CPU_ISA``).
    """
    from lowbit.cost import latency_key

    model = IntegerModel.load(path)
    capability = cpu_capability()
    g = torch.Generator().manual_seed(seed)
    table: dict[str, dict[str, float]] = {}
    paths: dict[str, dict[str, str]] = {}
    for node in model.nodes:
        if node.op not in ("conv2d", "conv2d_add", "linear"):
            continue
        a, name = node.attrs, node.name
        op = "linear" if node.op == "linear" else "conv2d"  # a fused residual add is timed as its conv
        w_shape = list(model.params[name]["weight"].shape)
        in_shape = [batch, *model.shapes[node.inputs[0]]]
        entry, kinds = {}, {}
        variants: dict[str, Callable[[], Any]] = {}
        widths = [(w, x, latency_key(w, x)) for w in SUPPORTED_BITS for x in SUPPORTED_BITS]
        for wb, ab, key in [*widths, (8, 8, "8_exact")]:
            step, kinds[key] = _synthetic_layer(op, a, w_shape, wb, ab, capability, g,
                                                full=key == "8_exact")
            x = _Val(_codes_input(in_shape, ab, op, g), 0)
            variants[key] = lambda step=step, x=x: step([x])
        variants["32"] = _float_layer(op, a, w_shape, in_shape, g)
        kinds["32"] = "fp32"
        with torch.inference_mode():
            times = time_variants(variants, runs, warmup, budget_s=30.0)
        for key, t in times.items():
            entry[key] = statistics.median(t) / batch
        table[name], paths[name] = entry, kinds
    return {"layers": table, "unit": "seconds per example", "batch": batch, "runs": runs, "paths": paths,
            "capability": capability, "model": str(path), "machine": machine_info()}


def _synthetic_layer(op, a, w_shape, w_bits, a_bits, capability, g, full=False):
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
    return layer_step(op, attrs, p, (0, (1 << a_bits) - 1), 0, 0, capability)


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
