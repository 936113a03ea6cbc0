"""Probe PyTorch's quantized CPU conv kernels on this machine: exactness vs lowbit's requantize, and speed.

A 4-bit layer in a fast path would hand uint8 codes in 0..15 and int8 weights in -8..7 to PyTorch's
int8 kernels, with per-channel requantization scales. This script asks, for every supported quantized
engine (x86, fbgemm, onednn, qnnpack):

(a) exactness: do its output codes equal ``lowbit.runtime.dyadic.requantize`` of the exact int64
    accumulator (round half to even, 31-bit dyadic multipliers)? Also compared with float64 round-half-even
    and with a float32 model (``round_half_even(float32(acc) * float32(M) + float32(B))``) to identify
    the engine's arithmetic; a second case with full 8-bit codes shows accumulator saturation (AVX2 int8
    kernels without VNNI add u8*s8 pairs in int16 via ``vpmaddubsw``).
(b) speed: the quantized conv vs fp32 and bf16 conv (all channels-last), median of ``--runs`` (>= 30)
    after warm-up, in one process, at a ResNet shape (64 ch, 56x56, 3x3) for batch 1 and 64.

Usage: ``python bench/fastpath_probe.py [--out docs/results/fastpath_probe.json] [--runs 30] [--threads 1]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F

from lowbit.io import save_json
from lowbit.ir.dyadic import requantize, to_dyadic, to_fixed
from lowbit.runtime.reference import conv2d_int

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def machine() -> dict:
    info = {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "engines": list(torch.backends.quantized.supported_engines),
            "python": platform.python_version(), "cpu": platform.processor() or "unknown", "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(ln.split(":", 1) for ln in text.splitlines() if ":" in ln)  # first CPU's values win
        fields = {k.strip(): v.strip() for k, v in reversed(list(fields.items()))}
        info["cpu"] = fields.get("model name", info["cpu"])
        info["flags"] = [f for f in CPU_FLAGS if f in fields.get("flags", "").split()]
        info["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        pass
    return info


def make_case(batch: int, channels: int, size: int, x_max: int, w_bits: int, seed: int,
              ties: bool = False) -> dict:
    """Integer codes, per-channel weight scales, and an output scale and bias giving a spread of 4-bit codes.

    With ``ties`` all scales are powers of two and the offsets integers, so ``M*acc + B`` hits exact
    half-integers often and the engine's tie rule shows.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, x_max + 1, (batch, channels, size, size), generator=g, dtype=torch.uint8)
    w = torch.randint(-(2 ** (w_bits - 1)), 2 ** (w_bits - 1), (channels, channels, 3, 3), generator=g,
                      dtype=torch.int8)
    acc = conv2d_int(x, w, 1, 1)  # exact int64 accumulators
    if ties:
        s_x, s_out = 0.25, 1.0
        s_w = 2.0 ** -(4 + torch.arange(channels, dtype=torch.float64) % 3)  # M = 2^-6, 2^-7, 2^-8
        mean = (acc.double() * (s_x * s_w)[:, None, None]).mean(dim=(0, 2, 3))
        bias = (8 - mean).round()  # integer offsets keep the half-integers
    else:
        s_x = 0.05
        s_w = torch.rand(channels, generator=g, dtype=torch.float64) * 0.02 + 0.005
        s_out = float((acc.double() * (s_x * s_w)[:, None, None]).std() / 5)  # ~5 codes per std
        bias = (torch.rand(channels, generator=g, dtype=torch.float64) * 11 - 3) * s_out  # like a folded BN
    return dict(x=x, w=w, s_x=s_x, s_w=s_w, s_out=s_out, bias=bias, acc=acc)


def quantized_conv(case: dict, engine: str):
    """A prepacked torch.ao quantized conv for ``engine`` and its channels-last quint8 input."""
    torch.backends.quantized.engine = engine
    c = case["w"].shape[0]
    zero = torch.zeros(c, dtype=torch.int64)
    wq = torch._make_per_channel_quantized_tensor(case["w"], case["s_w"], zero, 0)
    conv = nnq.Conv2d(c, c, 3, padding=1)
    conv.set_weight_bias(wq, case["bias"].float())
    conv.scale, conv.zero_point = case["s_out"], 0
    xq = torch._make_per_tensor_quantized_tensor(case["x"], case["s_x"], 0)
    return conv, xq.contiguous(memory_format=torch.channels_last)


def exactness(case: dict, engine: str, label: str) -> dict:
    conv, xq = quantized_conv(case, engine)
    got = conv(xq).int_repr().to(torch.int64)
    M = case["s_x"] * case["s_w"] / case["s_out"]  # per-channel multiplier (float64)
    B = case["bias"] / case["s_out"]  # per-channel offset in output codes
    m, k = to_dyadic(M)
    dyadic = requantize(case["acc"], m, k, to_fixed(B, k), lo=0, hi=255).to(torch.int64)
    exact = case["acc"].double() * M[:, None, None] + B[:, None, None]
    half_even = exact.round().clamp(0, 255).to(torch.int64)
    f32 = (case["acc"].float() * M.float()[:, None, None] + B.float()[:, None, None]).round()
    f32 = f32.clamp(0, 255).to(torch.int64)
    diff = (got - dyadic).abs()
    near_tie = ((exact - exact.floor() - 0.5).abs() < 1e-9) & (exact > -0.5) & (exact < 255.5)
    return {
        "engine": engine, "case": label, "outputs": got.numel(),
        "frac_diff_vs_dyadic": float((diff > 0).double().mean()), "max_diff_vs_dyadic": int(diff.max()),
        "frac_diff_vs_dyadic_4bit": float((got.clamp(0, 15) != dyadic.clamp(0, 15)).double().mean()),
        "frac_diff_vs_f64_half_even": float((got != half_even).double().mean()),
        "frac_diff_vs_f32_model": float((got != f32).double().mean()),
        "max_diff_vs_f32_model": int((got - f32).abs().max()),
        "frac_ties": float(near_tie.double().mean()),
    }


def timeit(variants: dict, runs: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved round-robin so that load from other processes on a
    shared machine hits all variants alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def speed(batch: int, runs: int, engines: list[str]) -> list[dict]:
    case = make_case(batch, 64, 56, 15, 4, seed=batch)
    ops = 2 * batch * 56 * 56 * 64 * 64 * 9
    x = case["x"].float().contiguous(memory_format=torch.channels_last)
    w = case["w"].float().contiguous(memory_format=torch.channels_last)
    variants = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xd, wd = x.to(dt), w.to(dt)
        variants[f"{name} conv"] = lambda xd=xd, wd=wd: F.conv2d(xd, wd, None, 1, 1)
    for engine in engines:
        conv, xq = quantized_conv(case, engine)
        variants[f"int8 {engine}"] = lambda c=conv, q=xq: c(q)
    m, k = to_dyadic(case["s_x"] * case["s_w"] / case["s_out"])
    b = to_fixed(case["bias"] / case["s_out"], k)
    with torch.inference_mode():
        times = timeit(variants, runs)
        times["lowbit reference (exact)"] = timeit(
            {"ref": lambda: requantize(conv2d_int(case["x"], case["w"], 1, 1), m, k, b, lo=0, hi=15)},
            min(runs, 5), warmup=1)["ref"]
    rows = []
    for name, t in times.items():
        t = sorted(t)
        rows.append({"variant": name, "batch": batch, "shape": "64->64 3x3 56x56 pad 1", "runs": len(t),
                     "median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * t[0],
                     "p90_ms": 1e3 * t[(9 * len(t)) // 10]})
    fp32, bf16 = rows[0], rows[1]
    for r in rows:
        r.update(gops=ops / r["median_ms"] / 1e6, speedup_vs_fp32=fp32["median_ms"] / r["median_ms"],
                 speedup_vs_bf16=bf16["median_ms"] / r["median_ms"],
                 speedup_vs_fp32_min=fp32["min_ms"] / r["min_ms"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/fastpath_probe.json")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per variant (>= 30 for reports)")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes to time")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is steadier on a shared, loaded machine, "
                             "where OpenMP barriers of descheduled threads dominate multi-threaded timings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # torch.ao prints deprecation notices
    info = machine()
    engines = info["engines"]
    print(f"{info['cpu']} | capability {info['capability']} | flags {' '.join(info['flags'])} | "
          f"torch {info['torch']} | {info['threads']} threads")

    cases = {"4-bit codes (x 0..15, w -8..7)": make_case(2, 64, 28, 15, 4, seed=1),
             "4-bit codes, power-of-2 scales (ties)": make_case(2, 64, 28, 15, 4, seed=3, ties=True),
             "8-bit codes (x 0..255, w -128..127)": make_case(2, 64, 28, 255, 8, seed=2),
             "x 8-bit, w 4-bit (x 0..255, w -8..7)": make_case(2, 64, 28, 255, 4, seed=4),
             "x 7-bit, w 8-bit (x 0..127, w -128..127)": make_case(2, 64, 28, 127, 8, seed=5)}
    exact = [exactness(case, e, label) for label, case in cases.items() for e in engines]
    print("\n(a) exactness of output codes (uint8) vs lowbit requantize (dyadic, round half to even)")
    print(f"{'case':<41} {'engine':<8} {'diff':>7} {'max':>4} {'diff@4b':>8} {'vs f64 RNE':>10} "
          f"{'vs f32':>7} {'ties':>7}")
    for r in exact:
        print(f"{r['case']:<41} {r['engine']:<8} {r['frac_diff_vs_dyadic']:>7.2%} "
              f"{r['max_diff_vs_dyadic']:>4} {r['frac_diff_vs_dyadic_4bit']:>8.2%} "
              f"{r['frac_diff_vs_f64_half_even']:>10.2%} {r['frac_diff_vs_f32_model']:>7.2%} "
              f"{r['frac_ties']:>7.2%}")

    timing = [row for b in args.batches.split(",") for row in speed(int(b), args.runs, engines)]
    print("\n(b) conv 64->64 3x3 56x56 pad 1, channels-last, ms (runs interleaved)")
    print(f"{'batch':>5} {'variant':<24} {'median':>9} {'min':>9} {'p90':>9} {'GOP/s':>7} {'vs fp32':>8} "
          f"{'vs bf16':>8} {'min/fp32':>8}")
    for r in timing:
        print(f"{r['batch']:>5} {r['variant']:<24} {r['median_ms']:>9.2f} {r['min_ms']:>9.2f} "
              f"{r['p90_ms']:>9.2f} {r['gops']:>7.1f} {r['speedup_vs_fp32']:>7.2f}x "
              f"{r['speedup_vs_bf16']:>7.2f}x {r['speedup_vs_fp32_min']:>7.2f}x")
    path = save_json(args.out, {"args": vars(args), "machine": info, "exactness": exact, "timing": timing})
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
