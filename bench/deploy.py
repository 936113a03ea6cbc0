"""Integer deployment benchmark: exported lowbit models on the bit-exact fast backend against fp32, bf16 and
PyTorch's own int8 for the same float architecture.

One process, torch threads fixed (default 2), variants timed round-robin (median after warm-up; a variant that
would pass ``--budget`` seconds gets fewer runs, recorded). Variants per (model, batch): fp32 eager, fp32
channels-last, fp32 ``torch.compile`` (freezing), bf16 autocast (channels-last), PyTorch int8 (PT2E x86 Inductor
when torchao is importable, else eager ``torch.ao`` x86) and the lowbit fast path (compiled, bit-exact: checked
against the reference runtime on random images in every cell). Compile times of the compiled variants (first
call) are recorded. Writes docs/results/deploy.{json,md}.

* ResNet-18 at 224x224 (torchvision's when installed, else the same architecture in plain torch below), random
  weights (speed and size only): W4A4 (stem and classifier at 8 bits), quantized and calibrated on random data,
  exported; ``--mixed`` adds the mostly-2-bit plan (layer3/layer4 at 2 bits).
* The embedded resnet8 (registry, 28x28x1, random weights, W4A4), or ``--from runs/<quantized>``: exported,
  verified on the test set (runtime vs simulation bit for bit, vs the fake-quant model, fast path, ONNX) and
  timed.
* The lowbit fast path at batch 64 is profiled (torch.profiler, self CPU time by op): where its time goes.

``--isa avx2`` reruns the whole benchmark with oneDNN and ATen capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2``; every variant, the anchors included, loses VNNI/AMX/AVX-512), into
``deploy_avx2.{json,md}``: what a machine without VNNI reaches, measured on this one.

Resumable: each finished (model, batch) cell is saved in the JSON and skipped on a rerun (``--force`` redoes).
Usage: ``python bench/deploy.py [--from runs/w4a4] [--batches 1,64] [--runs 30] [--budget 20] [--threads 2]``
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, write_results  # noqa: E402
from lowbit.deploy.bench import (  # noqa: E402
    anchor_variants,
    compile_call,
    describe_paths,
    float_model,
    latency_table,
    machine_info,
    peak_memory,
    summarize,
    time_variants,
)
from lowbit.io import load_json, save_json  # noqa: E402
from lowbit.runtime.engine import IntegerModel  # noqa: E402
from lowbit.runtime.fastpath import FastModel  # noqa: E402

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
R18 = "ResNet-18 224x224 (random weights)"
TARGETS = {"speedup_vs_fp32": 6.0, "speedup_vs_bf16": 2.0, "vs_int8": 1.0, "compile_s": 60.0}
COMMAND = " ".join(["python", *sys.argv])
ISA_CAPS = {"avx2": ("AVX2", "avx2")}  # --isa: (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY)


# ------------------------------------------------------------------------------------- ResNet-18 in plain torch
class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice, strided conv + BN downsample."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's architecture (same module names, shapes and forward)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        widths, c = (64, 128, 256, 512), 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(c, w, stride), BasicBlock(w, w, 1)))
            c = w
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet18 when installed, else :class:`ResNet18` (the same network)."""
    try:
        import torchvision

        return torchvision.models.resnet18(weights=None, num_classes=num_classes)
    except ImportError:
        return ResNet18(num_classes)


def labels(args) -> list[str]:
    """The lowbit variants (``--variants``; with ``--mixed`` also the mostly-2-bit plan). A label's tokens after
    ``w4a4``: ``r<bits>`` quantizes the residual stream (exported as codes, :func:`_quantized`), ``e<steps>`` exports
    with that epilogue budget (:func:`_epilogue_error`)."""
    out = [v.strip() for v in args.variants.split(",") if v.strip()]
    return out + (["mixed 4/2"] if args.mixed else [])


def _token(label: str, prefix: str) -> str | None:
    return next((t[1:] for t in label.split()[1:] if t.startswith(prefix)), None)


def _quantized(model: nn.Module, plan, label: str) -> nn.Module:
    from lowbit.quant import QuantConfig, quantize_

    residual = _token(label, "r")
    return quantize_(model, plan, QuantConfig(residual_bits=None if residual is None else int(residual)))


def _epilogue_error(label: str) -> float | None:
    e = _token(label, "e")
    return None if e is None else float(e)


def resnet18_models(tmp: Path, args) -> tuple[dict[str, Path], nn.Module]:
    """W4A4 (float or quantized residual stream; and mostly-2-bit) resnet18, random weights, calibrated on random
    images, exported."""
    from lowbit.export import export_model
    from lowbit.quant import Plan, calibrate_

    out, fp = {}, None
    for label in labels(args):
        torch.manual_seed(0)
        model = resnet18().eval()
        fp = fp or copy.deepcopy(model)
        plan = Plan.preset("w4a4", model)
        if label.startswith("mixed"):
            plan = Plan({n: (2, 2) if n.startswith(("layer3", "layer4")) else b for n, b in plan.layers.items()})
        model = _quantized(model, plan, label)
        calibrate_(model, [torch.randn(4, 3, 224, 224)])
        path = tmp / f"resnet18_{label.replace(' ', '').replace('/', '')}.lowbit"
        export_model(model, path, input_shape=(3, 224, 224), pixels=IMAGENET, epilogue_error=_epilogue_error(label),
                     metadata={"model": {"name": "tv:resnet18", "kwargs": {}, "num_classes": 1000}})
        out[label] = path
    return out, fp


def resnet8_model(tmp: Path, args) -> tuple[dict[str, Path], nn.Module]:
    """The embedded resnet8 (registry, full width, 28x28x1) at W4A4, random weights, calibrated, exported."""
    from lowbit.export import export_model
    from lowbit.models import create_model
    from lowbit.quant import Plan, calibrate_

    out, fp = {}, None
    for label in (x for x in labels(args) if not x.startswith("mixed")):
        torch.manual_seed(0)
        model = create_model("resnet8", 10).eval()
        fp = fp or copy.deepcopy(model)
        model = _quantized(model, Plan.preset("w4a4", model), label)
        calibrate_(model, [torch.randn(32, 1, 28, 28)])
        out[label] = export_model(model.eval(), tmp / f"resnet8_{label.replace(' ', '')}.lowbit",
                                  input_shape=(1, 28, 28), pixels={"mean": 0.2860, "std": 0.3530},
                                  epilogue_error=_epilogue_error(label),
                                  metadata={"model": {"name": "resnet8", "kwargs": {}, "num_classes": 10}}).path
    return out, fp


# ------------------------------------------------------------------------------------------------ timing
def time_cell(group: str, batch: int, lowbit: dict[str, IntegerModel], fast: dict[str, FastModel],
              fp: nn.Module | None, args) -> tuple[list[dict], dict[str, float | None], dict[str, int]]:
    """Every variant at one batch size: rows, first-call compile seconds, differing integers vs the reference."""
    first = next(iter(lowbit.values()))
    shape = (batch, *first.input_spec["shape"])
    g = torch.Generator().manual_seed(batch)
    pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    xf = torch.randn(shape, generator=g)
    xcl = xf.contiguous(memory_format=torch.channels_last)
    variants, compile_s = {}, {}
    if fp is not None:
        fp_cl = copy.deepcopy(fp).to(memory_format=torch.channels_last)

        def bf16(m=fp_cl, x=xcl):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(x)

        variants.update({"fp32 eager": lambda: fp(xf), "fp32 channels-last": lambda: fp_cl(xcl), "bf16 autocast": bf16})
        print(f"[{group} batch {batch}] compiling fp32 and PyTorch int8 anchors", flush=True)
        variants.update(anchor_variants(fp, xf, compile_s, lambda s: print(s, flush=True)))
    exact = {}
    for label, f in fast.items():
        name = f"lowbit {label} fast path (exact)"
        compile_s[name] = compile_call(lambda f=f: f(pixels))
        variants[name] = lambda f=f: f(pixels)
        n = min(batch, 8)
        exact[label] = int((f.run_int(pixels[:n]) != lowbit[label].run_int(pixels[:n])).sum())
    print(f"[{group} batch {batch}] timing {len(variants)} variants, budget {args.budget:.0f} s each; compile "
          + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items() if v is not None), flush=True)
    with torch.inference_mode():
        times = time_variants(variants, args.runs, args.warmup, args.budget)
        rows = summarize(batch, times, {})
        for row in rows:
            if not row["cold_only"] and args.memory:
                peak = peak_memory(variants[row["variant"]])
                row["peak_mib"] = None if peak is None else peak / 2**20
    int8 = next((r for r in rows if r["variant"].startswith("PyTorch int8")), None)
    for r in rows:
        r["group"] = group
        r["vs_int8"] = int8["median_ms"] / r["median_ms"] if int8 else None
    return rows, compile_s, exact


def profile_fast(f: FastModel, x: torch.Tensor, top: int = 8) -> list[dict]:
    """Self CPU time by op of one compiled call (after warm-up): oneDNN int8 kernels vs the compiled glue."""
    from torch.profiler import ProfilerActivity, profile

    f(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        f(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key[:80], "ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def verify_run(run: str, tmp: Path, limit: int | None) -> tuple[Path, dict]:
    from lowbit.cli.deploy import _test_set
    from lowbit.deploy.verify import verify
    from lowbit.export import Simulation, export_run
    from lowbit.export.onnx_export import OnnxModel, export_onnx

    result = export_run(run, tmp / "embedded.lowbit")
    runtime = IntegerModel.load(result.path)
    ns = argparse.Namespace(data_dir=None)
    if limit == 0:  # checks already done: export only
        return result.path, {}
    images, labels = _test_set(ns, runtime.manifest, limit)
    onnx = OnnxModel(export_onnx(runtime, tmp / "embedded.onnx"))
    t0 = time.perf_counter()
    report = verify(runtime, images, labels, simulation=Simulation(result.lowered), fake_quant=result.lowered.model,
                    fast=FastModel(runtime, compile=True), onnx=onnx, batch_size=500)
    report["seconds"] = time.perf_counter() - t0
    report["sizes"] = {"lowbit_bytes": result.file_bytes, "fp32_weight_bytes": result.fp32_bytes,
                       "ratio": result.ratio, **result.info}
    report["model"] = runtime.manifest.get("model", {}).get("name")
    return result.path, report


# ----------------------------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Integer deployment: latency, size and exactness", "",
             f"Command: `{res.get('command', 'python bench/deploy.py')}`", "",
             f"Machine: {machine_line(res['machine_common'])}; torch threads {res.get('threads')}; torchao "
             f"{m.get('torchao', 'not installed (eager torch.ao anchor)')}; load average "
             f"{' / '.join(f'{v:.1f}' for v in m.get('loadavg', []))} at the last start"
             + (f"; **capped at {res['isa_cap']}** (`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`): every variant "
                "runs the kernels an AVX2-only machine has" if res.get("isa_cap") else "")
             + (" (**shared, loaded machine: timings are noisy; with 2 threads PyTorch's OpenMP barriers stall "
                "when the other core is busy, which dominates small-batch timings**)" if res.get("loaded") else ""),
             "", "Variants were timed round-robin in one process; median of the runs shown. Speed-ups are against "
             "fp32 eager (NCHW), bf16 autocast and PyTorch's own int8 of the same architecture (random weights; "
             "the int8 anchor calibrated on random inputs: speed only). The lowbit rows are the bit-exact fast "
             "backend (oneDNN int8 convs that requantize in the kernel and write uint8 codes where a float32 "
             "epilogue is provably exact, the others returning exact int32 accumulators; requantization/adds/pools "
             "compiled into one Inductor graph on uint8 codes and int32 values); every cell checks it against the "
             "reference runtime. Variant labels: `r<bits>` = the residual stream quantized at that width in the "
             "model (`--residual-bits`: a QuantAct after each residual add and on each shortcut into one), exported "
             "as codes, so each add runs inside its conv's kernel (oneDNN sum post-op) where exactness is proved; "
             "`e<steps>` = exported with that epilogue budget (`lowbit export --epilogue-error`: how far a "
             "multiplier narrowed for the kernel's float32 epilogue may move a value; default 2^-10 steps).", ""]
    for group, cell in res["groups"].items():
        load = " / ".join(f"{v:.1f}" for v in cell.get("loadavg") or [])
        lines += [f"## {group}", "", f"torch threads {cell.get('threads')}, load average {load} when timed.", "",
                  "| batch | variant | runs | median ms | img/s | vs fp32 | vs bf16 | vs PT int8 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in cell["rows"]:
            runs = f"{r['runs']}" + (" (cold)" if r.get("cold_only") else "")
            vs = [("-" if r.get(k) is None else f"{r[k]:.2f}x") for k in ("speedup_vs_fp32", "speedup_vs_bf16",
                                                                           "vs_int8")]
            lines.append(f"| {r['batch']} | {r['variant']} | {runs} | {r['median_ms']:.1f} | {r['images_per_s']:.1f}"
                         f" | {vs[0]} | {vs[1]} | {vs[2]} |")
        lines.append("")
        for batch, cs in sorted(cell.get("compile_s", {}).items()):
            lines.append(f"- first-call compile at batch {batch}: " + ", ".join(
                f"{k} {'failed' if v is None else format(v, '.1f') + ' s'}" for k, v in cs.items()))
        for batch, ex in sorted(cell.get("exact", {}).items()):
            lines.append(f"- batch {batch}: integers differing from the reference runtime: "
                         + ", ".join(f"{k} {v}" for k, v in ex.items()))
        for key, val in cell.get("sizes", {}).items():
            lines.append(f"- size {key}: {val / 2**20:.3f} MiB" if isinstance(val, int) else f"- {key}: {val}")
        for label, p in cell.get("paths", {}).items():
            lines.append(f"- {label}: {describe_paths(p)}")
        for label, prof in cell.get("profiles", {}).items():
            lines += ["", f"Profile of the lowbit {label} fast path at batch {prof['batch']} (self CPU time, one "
                      "compiled call):", "", "| op | ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{e['op']}` | {e['ms']:.1f} | {100 * e['share']:.0f}% | {e['calls']} |"
                      for e in prof["ops"]]
        lines.append("")
    if res.get("targets"):
        lines += ["## Targets (issue #13)", ""] + [f"- {t}" for t in res["targets"]] + [""]
        lines += [f"- why ({g}): {w}" for g, w in why(res)] + [""]
    if res.get("note"):
        lines += [res["note"], ""]
    if res.get("embedded"):
        e = res["embedded"]
        from lowbit.deploy.verify import format_report

        lines += ["## Embedded ResNet: exactness on the test set", "", "```", format_report(e), "```", "",
                  f"File: {e['sizes']['lowbit_bytes'] / 1024:.1f} KiB vs fp32 weights "
                  f"{e['sizes']['fp32_weight_bytes'] / 1024:.1f} KiB ({e['sizes']['ratio']:.1f}x smaller).", ""]
    return "\n".join(lines)


def targets(res: dict) -> list[str]:
    out = []
    for group, cell in res["groups"].items():
        for r in cell["rows"]:
            if not (r["variant"].startswith("lowbit w4a4") and r["batch"] == 64):
                continue
            label = r["variant"].removeprefix("lowbit ").removesuffix(" fast path (exact)").upper()
            for key, name in (("vs_int8", "PyTorch int8"), ("speedup_vs_fp32", "fp32"), ("speedup_vs_bf16", "bf16")):
                if r.get(key) is not None:
                    ok, t = r[key] >= TARGETS[key], TARGETS[key]
                    out.append(f"{group}, {label} at batch 64: {r[key]:.2f}x {name} (target >= {t}x): "
                               + ("met" if ok else f"MISSED by {100 * (1 - r[key] / t):.0f}%"))
        for batch, cs in cell.get("compile_s", {}).items():
            for k, v in cs.items():
                if k.startswith("lowbit") and v is not None:
                    out.append(f"{group}, {k} compile at batch {batch}: {v:.1f} s (target <= 60 s): "
                               + ("met" if v <= TARGETS["compile_s"] else "MISSED"))
        for batch, ex in cell.get("exact", {}).items():
            out.append(f"{group}, batch {batch}: bit-exact: " + ("met" if not any(ex.values()) else "MISSED"))
    return out


def why(res: dict) -> list[tuple[str, str]]:
    """From each batch-64 profile: the int8 kernels alone against PyTorch int8's whole model, and the compiled
    glue, per lowbit variant."""
    out = []
    for group, cell in res["groups"].items():
        rows = {r["variant"]: r for r in cell["rows"] if r["batch"] == 64}
        int8 = next((r for v, r in rows.items() if v.startswith("PyTorch int8")), None)
        for label, prof in (cell.get("profiles") or {}).items():
            if not (int8 and f"lowbit {label} fast path (exact)" in rows):
                continue
            conv = sum(e["ms"] for e in prof["ops"] if e["op"].startswith(("onednn::", "lowbit::")))
            glue = sum(e["ms"] for e in prof["ops"] if "CompiledFxGraph" in e["op"])
            total = sum(e["ms"] for e in prof["ops"]) or 1
            paths = (cell.get("paths") or {}).get(label) or {}
            fused = sum(p.startswith("int8 fused") for p in paths.get("paths", {}).values())
            n = len(paths.get("paths", {}))
            split = f" ({fused} of {n} writing uint8 codes, the others exact float32 accumulators)" if n else ""
            stream = ("the residual stream is uint8 codes" if " r" in label else
                      "it reads the float32 accumulators of every conv that feeds the wide (int32, 16 bits below "
                      "the code step) residual stream and reads and writes that stream, about 4x PyTorch int8's "
                      "bytes per residual block")
            out.append((f"{group}, {label}",
                        f"the oneDNN int8 kernels{split} take {conv:.0f} ms ({100 * conv / total:.0f}% of the "
                        f"profiled call), against {int8['median_ms']:.0f} ms for PyTorch int8's whole model, whose "
                        f"kernels requantize in the kernel, add the residual in a sum post-op and write uint8; the "
                        f"compiled requantization/add/pool glue takes {glue:.0f} ms ({100 * glue / total:.0f}%): "
                        f"{stream}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", default=None, help="a quantized run directory (embedded ResNet)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget", type=float, default=15.0, help="seconds per variant and batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verify-limit", type=int, default=None, help="test images for the embedded ResNet checks")
    ap.add_argument("--skip-resnet18", action="store_true")
    ap.add_argument("--skip-resnet8", action="store_true")
    ap.add_argument("--mixed", action="store_true", help="also the mostly-2-bit resnet18")
    ap.add_argument("--variants", default="w4a4,w4a4 r8,w4a4 r4,w4a4 r4 e0.03125",
                    help="lowbit variants, comma-separated: w4a4, then r<bits> for a quantized residual stream "
                         "(residual_bits) and e<steps> for the export's epilogue budget (epilogue_error)")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (one profiled call each)")
    ap.add_argument("--force", action="store_true", help="redo cells already in docs/results/deploy.json")
    ap.add_argument("--note", default=None, help="a paragraph to add to the report (kept in the JSON)")
    ap.add_argument("--render", action="store_true", help="only rewrite the report from the JSON")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: cap oneDNN and ATen at AVX2 (an AVX2-only machine), results in deploy_avx2.*")
    args = ap.parse_args()
    if args.isa != "native" and os.environ.get("ONEDNN_MAX_CPU_ISA") != ISA_CAPS[args.isa][0]:
        onednn, aten = ISA_CAPS[args.isa]
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": onednn, "ATEN_CPU_CAPABILITY": aten}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # the caps must be set before torch loads
    report = "deploy" if args.isa == "native" else f"deploy_{args.isa}"
    if args.render:
        res = load_json(RESULTS / f"{report}.json")
        res["note"] = args.note or res.get("note")
        res["targets"] = targets(res)
        write_results(report, res, markdown(res))
        return
    torch.set_num_threads(args.threads)
    out_json = RESULTS / f"{report}.json"
    res = load_json(out_json) if out_json.exists() and not args.force else {}
    res.setdefault("groups", {})
    if args.note:
        res["note"] = args.note
    res.update(machine=machine_info(), machine_common=machine(), threads=args.threads, args=vars(args),
               command=COMMAND, isa_cap=os.environ.get("ONEDNN_MAX_CPU_ISA") if args.isa != "native" else None)
    res["loaded"] = res["machine"].get("loadavg", [0])[0] > 0.5 * (res["machine"].get("logical_cpus") or 1)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        jobs = []
        if not args.skip_resnet18:
            jobs.append((R18, *resnet18_models(tmp, args)))
        if args.source:
            done = res.get("embedded", {}).get("args") == [args.source, args.verify_limit]
            path, report = verify_run(args.source, tmp, 0 if done else args.verify_limit)
            if not done:  # resumable: the test-set checks of this run and limit are already in the JSON
                res["embedded"] = {**report, "args": [args.source, args.verify_limit]}
                save_json(out_json, res)
            m = IntegerModel.load(path)
            jobs.append((f"embedded ResNet ({args.source})", {"w4a4": path}, float_model(m.manifest)))
            name = (res["embedded"].get("model") or Path(args.source).name).replace(":", "_")
            save_json(RESULTS / f"latency_{name}.json", latency_table(path, batch=8, runs=20))
            print(f"per-layer latency table -> {RESULTS / f'latency_{name}.json'}")
        elif not args.skip_resnet8:
            jobs.append(("embedded resnet8 28x28 (registry, random weights)", *resnet8_model(tmp, args)))
        for group, paths, fp in jobs:
            cell = res["groups"].setdefault(group, {"rows": []})
            models = {label: IntegerModel.load(p) for label, p in paths.items()}
            fast = {label: FastModel(m, compile=True) for label, m in models.items()}
            sizes = {f"{label} lowbit_bytes": p.stat().st_size for label, p in paths.items()}
            sizes["fp32_weight_bytes"] = next(iter(models.values())).manifest["fp32_weight_bytes"]
            cell["sizes"] = sizes
            cell["paths"] = {label: {"paths": f.paths, "requant": f.requant, "fallbacks": f.fallbacks,
                                     "capability": f.capability} for label, f in fast.items()}
            cell.setdefault("compile_s", {})
            cell.setdefault("exact", {})
            for batch in batches:
                if not args.force and any(r["batch"] == batch for r in cell["rows"]):
                    continue  # resumable: this cell is done
                cell["threads"], cell["loadavg"] = args.threads, machine_info().get("loadavg")
                rows, compile_s, exact = time_cell(group, batch, models, fast, fp, args)
                cell["rows"] = [r for r in cell["rows"] if r["batch"] != batch] + rows
                cell["compile_s"][str(batch)], cell["exact"][str(batch)] = compile_s, exact
                save_json(out_json, res)
            cell.pop("profile", None)  # one profile per lowbit variant now
            profiles = cell.setdefault("profiles", {})
            for label, f in fast.items():
                if 64 in batches and (args.force or label not in profiles):
                    x = torch.randint(0, 256, (64, *f.model.input_spec["shape"]), dtype=torch.uint8)
                    profiles[label] = {"batch": 64, "ops": profile_fast(f, x)}
                    save_json(out_json, res)
            cell["rows"].sort(key=lambda r: r["batch"])
    res["targets"] = targets(res)
    write_results(report, res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
