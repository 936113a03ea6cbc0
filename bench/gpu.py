"""GPU benchmark (issue #6): QAT step cost, and exported W4A4 models on tensor cores against bf16.

One process, one GPU, CUDA-event timing (median after warm-up), everything under a wall-clock budget
(default 240 s; cells that would start after it are listed as skipped, never silently dropped):

(b) first, the deliverable: torchvision resnet18 / resnet50 (random weights) quantized W4A4 (LSQ, first/last
    layers 8-bit), calibrated on random images, exported to ``.lowbit`` and run by ``lowbit.runtime.GpuModel``
    (fp8 ``_scaled_mm`` for 4-bit layers, ``_int_mm`` for 8-bit ones), eager and with its requantization epilogue
    compiled, against the float model in bf16 (cuDNN, channels-last) at batch 1, 64, 256. Exactness: every
    integer value of the graph vs ``IntegerModel.run_trace`` on the CPU, for random, all-white, all-black and
    checkerboard images. Target: W4A4 >= 1.4x bf16 at batch 256.
(a) QAT step (forward + backward + SGD) at 224x224, batch 64, synthetic data: fp32, bf16 autocast and LSQ W4A4
    fake quantization (``quantize_`` + ``calibrate_`` with ``Plan.preset("w4a4", model)``), eager and
    ``torch.compile``; the fake-quant overhead is the LSQ step over the fp32 step.

Writes ``gpu.json`` and ``gpu.md`` into ``--out`` (default ``$OUT``, else docs/results) and the Markdown into
docs/results/gpu.md. Without CUDA it exits with status 2; ``--dry-run`` runs the same code on the CPU with
emulated GEMMs and tiny sizes (resnet8 at 28x28 without torchvision) to check the plumbing, writing only into
``--out`` (default ``$OUT``, else a temporary directory).

Usage: ``python bench/gpu.py [--out DIR] [--budget 270] [--models resnet18,resnet50] [--batches 1,64,256]``
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from lowbit.io import atomic_write_text, save_json  # noqa: E402

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
TARGET_VS_BF16 = 1.4  # W4A4 GpuModel over bf16 at batch 256


class Budget:
    """Wall-clock budget shared by all cells; a cell starts only while time is left."""

    def __init__(self, seconds: float):
        self.t0, self.seconds, self.skipped = time.perf_counter(), seconds, []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, what: str, need_s: float = 0.0) -> bool:
        if self.left() > need_s:
            return True
        self.skipped.append(what)
        print(f"[skip] {what}: time budget spent", flush=True)
        return False


def environment(device: torch.device) -> dict:
    """GPU, driver, CUDA and torch versions: attach to every result."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(device)}
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(),
                   tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32})
    else:
        env["gpu"] = "none (CPU dry run, emulated GEMMs)"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            env["nvidia_smi"] = out.strip().splitlines()
            env["driver"] = out.split(",")[1].strip() if "," in out else None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def timer(device: torch.device, runs: int, warmup: int, budget_s: float):
    """``measure(fn) -> (median ms, runs)``: CUDA events on a GPU, perf_counter on the CPU."""

    def measure(fn) -> tuple[float, int]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
            if sum(times) > 1000 * budget_s:
                break
        return statistics.median(times), len(times)

    return measure


def make_model(name: str, dry: bool):
    """(float model with random weights, input shape, pixel normalisation) for a model name."""
    if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in (18, 34, 50, 101, 152):
        import torchvision

        size = 32 if dry else 224
        return getattr(torchvision.models, name)(weights=None).eval(), (3, size, size), IMAGENET
    from lowbit.models import create_model

    return create_model(name).eval(), (1, 28, 28), {"mean": 0.5, "std": 0.25}


def model_names(args) -> list[str]:
    names = args.models.split(",")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        if not args.dry_run:
            print("[info] torchvision is missing: the torchvision resnet parts are skipped", flush=True)
            args.notes.append("torchvision is missing: the torchvision resnet parts were skipped.")
            return [n for n in names if not n.startswith("resnet") or not n[6:].isdigit() or int(n[6:]) < 18]
        return ["resnet8"]
    return names


def check_images(n_random: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Random pixels plus the worst cases: all white, all black and a checkerboard (saturated input codes)."""
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 256, (n_random, *shape), generator=g, dtype=torch.uint8)
    h, w = shape[-2:]
    checker = ((torch.arange(h).reshape(-1, 1) + torch.arange(w)) % 2 * 255).expand(shape)
    worst = torch.stack([torch.full(shape, 255), torch.zeros(shape, dtype=torch.int64), checker]).to(torch.uint8)
    return torch.cat([rand, worst])


# ------------------------------------------------------------------------------- (b) exported W4A4 models
def exported_cell(name: str, args, device, budget: Budget, measure, tmp: Path) -> dict:
    from lowbit.export import export_model
    from lowbit.quant import Plan, calibrate_, quantize_
    from lowbit.runtime import GpuModel, IntegerModel

    torch.manual_seed(0)
    fp, shape, pixels = make_model(name, args.dry_run)
    qmodel = copy.deepcopy(fp)
    t0 = time.perf_counter()
    quantize_(qmodel, Plan.preset("w4a4", qmodel))
    calibrate_(qmodel, [torch.randn(4, *shape)])
    path = export_model(qmodel.eval(), tmp / f"{name}_w4a4.lowbit", input_shape=shape, pixels=pixels).path
    ref = IntegerModel.load(path)
    cell = {"model": name, "input_shape": list(shape), "export_s": time.perf_counter() - t0,
            "file_bytes": path.stat().st_size}
    emulate = device.type != "cuda"
    gpu = GpuModel(ref, device=device, emulate=emulate)
    paths = gpu.layer_paths()
    cell["paths"] = {n: str(p) for n, p in paths.items()}
    cell["path_counts"] = {k: sum(p.path == k for p in paths.values()) for k in ("fp8", "int8", "reference")}
    print(f"[{name}] exported in {cell['export_s']:.1f} s; layer paths {cell['path_counts']}", flush=True)

    # exactness: every integer value of the graph, GPU vs the reference runtime on the CPU
    x = check_images(args.check_random, shape)
    t0 = time.perf_counter()
    want = ref.run_trace(x)
    got = gpu.run_trace(x)
    diff = {k: int((got[k].cpu().to(torch.int64) != want[k].to(torch.int64)).sum()) for k in want}
    cell["exactness"] = {"images": int(x.shape[0]), "worst_case_images": ["all 255", "all 0", "checkerboard"],
                         "values_compared": len(want), "elements_compared": sum(v.numel() for v in want.values()),
                         "values_differing": [k for k, v in diff.items() if v],
                         "elements_differing": sum(diff.values()),
                         "logits_equal": bool(torch.equal(got["logits"].cpu(), want["logits"])),
                         "seconds": time.perf_counter() - t0}
    print(f"[{name}] exactness: {cell['exactness']['elements_differing']} of "
          f"{cell['exactness']['elements_compared']} integers differ", flush=True)

    variants = {"GpuModel W4A4": gpu}
    if not args.no_compile and device.type == "cuda":
        variants["GpuModel W4A4, compiled epilogue"] = GpuModel(ref, device=device, compile=True)
    bf16 = copy.deepcopy(fp).to(device, torch.bfloat16).to(memory_format=torch.channels_last)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        if not budget.allows(f"{name} exported, batch {batch}", 5):
            continue
        g = torch.Generator().manual_seed(batch)
        pix = torch.randint(0, 256, (batch, *shape), generator=g, dtype=torch.uint8).to(device)
        xb = (torch.randn((batch, *shape), generator=g).to(device, torch.bfloat16)
              .contiguous(memory_format=torch.channels_last))
        fns = {"bf16 (channels-last)": lambda m=bf16, x=xb: m(x)}
        fns.update({label: lambda m=m, x=pix: m.run_int(x) for label, m in variants.items()})
        with torch.inference_mode():
            for label, fn in fns.items():
                t0 = time.perf_counter()
                try:
                    ms, runs = measure(fn)
                except Exception as e:  # a variant that fails (e.g. compile) is reported, not fatal
                    rows.append({"batch": batch, "variant": label, "error": f"{type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''}"})
                    print(f"[{name} b{batch}] {label}: {rows[-1]['error']}", flush=True)
                    continue
                rows.append({"batch": batch, "variant": label, "median_ms": ms, "runs": runs,
                             "images_per_s": 1000 * batch / ms, "wall_s": time.perf_counter() - t0})
                print(f"[{name} b{batch}] {label}: {ms:.3f} ms ({runs} runs)", flush=True)
        base = next((r for r in rows if r["batch"] == batch and r["variant"].startswith("bf16") and "median_ms" in r),
                    None)
        for r in rows:
            if r["batch"] == batch and base and "median_ms" in r:
                r["speedup_vs_bf16"] = base["median_ms"] / r["median_ms"]
    cell["rows"] = rows
    if device.type == "cuda":
        cell["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return cell


# ------------------------------------------------------------------------------------------ (a) QAT steps
def qat_cells(name: str, args, device, budget: Budget, measure, compiled: bool) -> list[dict]:
    from lowbit.quant import Plan, calibrate_, quantize_

    torch.manual_seed(0)
    fp, shape, _ = make_model(name, args.dry_run)
    batch = args.qat_batch
    x = torch.randn(batch, *shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []
    for variant in ("fp32", "bf16 autocast", "LSQ W4A4 fake-quant"):
        label = f"{variant}{', compiled' if compiled else ''}"
        if not budget.allows(f"QAT {name} {label}", 15 if not compiled else 45):
            continue
        m = copy.deepcopy(fp).to(device).to(memory_format=torch.channels_last)
        if variant.startswith("LSQ"):
            quantize_(m, Plan.preset("w4a4", m))
            calibrate_(m, [x])
        m.train()
        if compiled:
            torch._dynamo.reset()  # a fresh cache per model: no recompile limits across variants
        net = torch.compile(m) if compiled else m
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        amp = variant.startswith("bf16")

        def step(net=net, opt=opt, amp=amp):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        try:
            step()  # first step: compilation
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            ms, runs = measure(step)
        except Exception as e:
            rows.append({"model": name, "variant": label, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(f"[QAT {name}] {label}: {rows[-1]['error']}", flush=True)
            continue
        rows.append({"model": name, "variant": label, "batch": batch, "median_ms": ms, "runs": runs,
                     "first_step_s": first})
        print(f"[QAT {name}] {label}: {ms:.2f} ms/step (first step {first:.1f} s)", flush=True)
        del net, m, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fp32 = next((r["median_ms"] for r in rows if r["variant"].startswith("fp32") and "median_ms" in r), None)
    for r in rows:
        if fp32 and "median_ms" in r:
            r["x_fp32"] = r["median_ms"] / fp32
    return rows


# --------------------------------------------------------------------------------------------- reporting
def markdown(res: dict) -> str:
    env = res["environment"]
    lines = ["# GPU path: exported W4A4 models on tensor cores, and QAT step cost", ""]
    if res["dry_run"]:
        lines += ["**Dry run on the CPU** (emulated fp8/int8 GEMMs, tiny sizes): checks the script and the "
                  "exactness, not speed. Timings below are CPU timings and mean nothing for a GPU.", ""]
    gpu = env.get("gpu") + (f" (compute capability {env['capability']}, {env['gpu_memory_gib']} GiB)"
                            if env.get("capability") else "")
    lines += [f"GPU: {gpu}; driver {env.get('driver') or 'unknown'}; CUDA {env.get('cuda')}; torch {env['torch']}; "
              f"torchvision {env.get('torchvision') or 'missing'}.", ""]
    if env.get("tf32"):
        lines += [f"TF32: matmul {env['tf32']['matmul']}, cuDNN {env['tf32']['cudnn']} (PyTorch defaults).", ""]
    for cell in res["exported"]:
        ex = cell["exactness"]
        lines += [f"## Exported W4A4 {cell['model']} ({'x'.join(map(str, cell['input_shape']))})", "",
                  f"Layer paths: {cell['path_counts']['fp8']} fp8, {cell['path_counts']['int8']} int8, "
                  f"{cell['path_counts']['reference']} reference. Exactness vs the reference runtime "
                  f"(CPU) on {ex['images']} images incl. all-255, all-0 and checkerboard: "
                  f"**{ex['elements_differing']} of {ex['elements_compared']} integers differ** over "
                  f"{ex['values_compared']} graph values; logits equal: {ex['logits_equal']}.", "",
                  "| batch | variant | median ms | img/s | vs bf16 |", "|---|---|---|---|---|"]
        for r in cell["rows"]:
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['variant']} | failed: {r['error']} | | |")
                continue
            vs = f"{r['speedup_vs_bf16']:.2f}x" if r.get("speedup_vs_bf16") else "-"
            lines.append(f"| {r['batch']} | {r['variant']} | {r['median_ms']:.3f} | {r['images_per_s']:.0f} | {vs} |")
        lines.append("")
    if res["qat"]:
        lines += ["## QAT step (forward + backward + SGD), synthetic data", "",
                  "| model | variant | batch | median ms | x fp32 (same mode) | first step s |",
                  "|---|---|---|---|---|---|"]
        for r in res["qat"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['variant']} | | failed: {r['error']} | | |")
                continue
            lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['median_ms']:.2f} | "
                         f"{r.get('x_fp32', float('nan')):.2f} | {r['first_step_s']:.1f} |")
        lines.append("")
    if res["targets"]:
        lines += ["## Target", ""] + [f"- {t}" for t in res["targets"]] + [""]
    lines += [f"Note: {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
    if res["skipped"]:
        lines += ["Skipped (time budget): " + "; ".join(res["skipped"]) + ".", ""]
    lines += [f"Total wall time {res['wall_s']:.0f} s. Command: `{res['command']}`.", ""]
    return "\n".join(lines)


def targets(res: dict) -> list[str]:
    out = []
    for cell in res["exported"]:
        rows = [r for r in cell["rows"] if r["batch"] == 256 and r.get("speedup_vs_bf16")
                and r["variant"].startswith("GpuModel")]
        if rows:
            best = max(rows, key=lambda r: r["speedup_vs_bf16"])
            ok = best["speedup_vs_bf16"] >= TARGET_VS_BF16
            out.append(f"{cell['model']} W4A4 at batch 256: {best['speedup_vs_bf16']:.2f}x bf16 ({best['variant']}; "
                       f"target >= {TARGET_VS_BF16}x): {'met' if ok else 'MISSED'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for gpu.json / gpu.md (default $OUT, else docs/results)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, emulated GEMMs, tiny sizes: check the plumbing")
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--qat-batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds: no cell starts after this")
    ap.add_argument("--check-random", type=int, default=1, help="random images in the exactness check")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    args.notes = []
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: CUDA is not available (torch.cuda.is_available() is False); "
              "run with --dry-run to check the script on the CPU", file=sys.stderr)
        sys.exit(2)
    if args.dry_run:
        torch.set_num_threads(1)
        args.batches, args.qat_batch, args.runs, args.warmup, args.no_compile = "1,4", 4, 3, 1, True
    device = torch.device("cuda" if not args.dry_run else "cpu")
    default = Path(tempfile.gettempdir()) / "lowbit-gpu-dryrun" if args.dry_run else RESULTS  # keep docs intact
    out_dir = Path(args.out or os.environ.get("OUT") or default)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    measure = timer(device, args.runs, args.warmup, budget_s=10.0)
    res = {"environment": environment(device), "dry_run": args.dry_run, "args": vars(args),
           "command": " ".join(["python", "bench/gpu.py", *sys.argv[1:]]), "exported": [], "qat": []}
    names = model_names(args)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if budget.allows(f"exported {name}", 20):
                res["exported"].append(exported_cell(name, args, device, budget, measure, Path(tmp)))
    for compiled in (False, True) if not args.no_compile else (False,):
        for name in names:
            res["qat"] += qat_cells(name, args, device, budget, measure, compiled)
    res["skipped"], res["targets"], res["notes"] = budget.skipped, targets(res), args.notes
    res["wall_s"] = time.perf_counter() - budget.t0
    text = markdown(res)
    save_json(out_dir / "gpu.json", res)
    atomic_write_text(out_dir / "gpu.md", text)
    if not args.dry_run:
        atomic_write_text(RESULTS / "gpu.md", text)
    also = "" if args.dry_run else f" and {RESULTS / 'gpu.md'}"
    print(f"wrote {out_dir / 'gpu.json'}, {out_dir / 'gpu.md'}{also}")


if __name__ == "__main__":
    main()
