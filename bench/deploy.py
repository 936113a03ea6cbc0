"""Integer deployment benchmark: exported lowbit models against fp32 / channels-last / bf16 / onnxruntime.

One process, torch threads fixed (default 2), variants timed round-robin (median after warm-up; a variant that
would pass ``--budget`` seconds gets fewer runs, recorded). Writes docs/results/deploy.{json,md}.

* torchvision resnet18 at 224x224, random weights (speed and size only): a W4A4 plan and a mostly-2-bit plan
  (layer3/layer4 at 2 bits, layer1/layer2 at 4, stem and classifier at 8), quantized and calibrated on random
  data, exported; fp32 baselines shared. Needs torchvision (``.venv-vision``); skipped without it.
* ``--from runs/<quantized>`` (the embedded ResNet): exported, verified on the test set (runtime vs
  simulation bit for bit, vs the fake-quant model, fast path and ONNX disagreement) and timed.

Resumable: each finished (model, batch) cell is saved in the JSON and skipped on a rerun (``--force`` redoes).
Usage: ``python bench/deploy.py [--from runs/w4a4] [--batches 1,64] [--runs 30] [--budget 20] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, write_results  # noqa: E402
from lowbit.io import load_json, save_json  # noqa: E402
from lowbit.runtime.bench import (  # noqa: E402
    float_model,
    latency_table,
    machine_info,
    peak_memory,
    summarize,
    time_variants,
)
from lowbit.runtime.engine import IntegerModel  # noqa: E402
from lowbit.runtime.fastpath import FastModel, compare  # noqa: E402

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
TARGETS = {"speedup_vs_fp32": 6.0, "speedup_vs_bf16": 1.5, "w4a4_size": 1 / 6, "mostly2_size": 1 / 10}


def resnet18_models(tmp: Path) -> dict[str, Path]:
    """W4A4 and mostly-2-bit resnet18 (random weights), calibrated on random images, exported."""
    import torchvision

    from lowbit.export import export_model
    from lowbit.quant import Plan, calibrate_, quantize_

    out = {}
    for label in ("w4a4", "mixed 4/2"):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()
        plan = Plan.preset("w4a4", model)
        if label != "w4a4":
            plan = Plan({n: (2, 2) if n.startswith(("layer3", "layer4")) else b for n, b in plan.layers.items()})
        quantize_(model, plan)
        calibrate_(model, [torch.randn(4, 3, 224, 224)])
        path = tmp / f"resnet18_{label.replace(' ', '').replace('/', '')}.lowbit"
        export_model(model, path, input_shape=(3, 224, 224), pixels=IMAGENET,
                     metadata={"model": {"name": "tv:resnet18", "kwargs": {}, "num_classes": 1000}})
        out[label] = path
    return out


def onnx_session(model: IntegerModel, tmp: Path, label: str, sizes: dict):
    try:
        from lowbit.export.onnx_export import OnnxModel, export_onnx
    except ImportError:
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    path = export_onnx(model, tmp / f"{label.replace(' ', '').replace('/', '')}.onnx")
    sizes[f"{label} onnx_bytes"] = path.stat().st_size
    return OnnxModel(path, threads=torch.get_num_threads())


def time_cell(group: str, batch: int, lowbit: dict[str, IntegerModel], fast: dict[str, FastModel], onnx: dict,
              args) -> list[dict]:
    """fp32 eager, fp32 channels-last, bf16 autocast and every exported model at one batch size."""
    first = next(iter(lowbit.values()))
    shape = (batch, *first.input_spec["shape"])
    g = torch.Generator().manual_seed(batch)
    pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    xf = torch.randn(shape, generator=g)
    xcl = xf.contiguous(memory_format=torch.channels_last)
    fp = float_model(first.manifest)
    variants = {}
    if fp is not None:
        import copy

        fp_cl = copy.deepcopy(fp).to(memory_format=torch.channels_last)

        def bf16(m=fp_cl, x=xcl):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(x)

        variants.update({"fp32 eager": lambda: fp(xf), "fp32 channels-last": lambda: fp_cl(xcl), "bf16 autocast": bf16})
    for label, f in fast.items():
        variants[f"lowbit {label} fast path"] = lambda f=f: f(pixels)
    for label, o in onnx.items():
        if o is not None:
            variants[f"onnxruntime {label}"] = lambda o=o: o(pixels)
    print(f"[{group} batch {batch}] timing {len(variants)} variants, budget {args.budget:.0f} s each", flush=True)
    with torch.inference_mode():
        times = time_variants(variants, args.runs, args.warmup, args.budget)
        rows = summarize(batch, times, {})
        for row in rows:
            if row["variant"].startswith("onnxruntime") or row["cold_only"]:
                continue
            peak = peak_memory(variants[row["variant"]])
            row["peak_mib"] = None if peak is None else peak / 2**20
    for r in rows:
        r["group"] = group
    return rows


def layer_disagreement(model: IntegerModel, fast: FastModel, n: int = 1) -> dict:
    """Fast path vs reference on ``n`` random images: worst layer's fraction of differing codes."""
    x = torch.randint(0, 256, (n, *model.input_spec["shape"]), generator=torch.Generator().manual_seed(7),
                      dtype=torch.uint8)
    layers = compare(fast, model, x)
    narrow = {k: v for k, v in layers.items() if v["narrow"]}
    ref, got = model.run_int(x).to(torch.int64), fast.run_int(x)
    rel = float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    return {"images": n, "max_frac_codes_differing": max(v["frac_diff"] for v in narrow.values()),
            "mean_frac_codes_differing": statistics.mean(v["frac_diff"] for v in narrow.values()),
            "max_code_diff": max(v["max_diff"] for v in narrow.values()), "max_logit_diff_relative": rel,
            "top1_agree": bool((got.argmax(1) == ref.argmax(1)).all())}


def verify_run(run: str, tmp: Path, limit: int | None) -> tuple[Path, dict]:
    from lowbit.cli.deploy import _test_set
    from lowbit.export import Simulation, export_run, verify
    from lowbit.export.onnx_export import OnnxModel, export_onnx

    result = export_run(run, tmp / "embedded.lowbit")
    runtime = IntegerModel.load(result.path)
    ns = argparse.Namespace(data_dir=None)
    if limit == 0:  # checks already done: export only
        return result.path, {}
    images, labels = _test_set(ns, runtime.manifest.get("data") or "fashion-mnist", limit)
    onnx = OnnxModel(export_onnx(runtime, tmp / "embedded.onnx"))
    t0 = time.perf_counter()
    report = verify(runtime, images, labels, simulation=Simulation(result.lowered), fake_quant=result.lowered.model,
                    fast=FastModel(runtime), onnx=onnx, batch_size=500)
    report["seconds"] = time.perf_counter() - t0
    report["sizes"] = {"lowbit_bytes": result.file_bytes, "fp32_weight_bytes": result.fp32_bytes,
                       "ratio": result.ratio, **result.info}
    report["model"] = runtime.manifest.get("model", {}).get("name")
    return result.path, report


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Integer deployment: latency, size and exactness", "",
             f"Machine: {machine_line(res['machine_common'])}; load average "
             f"{' / '.join(f'{v:.1f}' for v in m.get('loadavg', []))} at the last start"
             + (" (**shared, loaded machine: timings are noisy; with 2 threads PyTorch's OpenMP barriers stall "
                "when the other core is busy, which dominates small-batch timings**)" if res.get("loaded") else ""),
             "", "Variants were timed round-robin in one process; median of the runs shown. Speed-ups are against "
             "fp32 eager (NCHW) and bf16 autocast of the same architecture. Peak = bytes PyTorch's CPU allocator "
             "held during one forward (torch profiler; not measured for onnxruntime).", ""]
    for group, cell in res["groups"].items():
        load = " / ".join(f"{v:.1f}" for v in cell.get("loadavg") or [])
        lines += [f"## {group}", "", f"torch threads {cell.get('threads')}, load average {load} when timed.", "",
                  "| batch | variant | runs | median ms | img/s | vs fp32 | vs bf16 | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in cell["rows"]:
            runs = f"{r['runs']}" + (" (cold)" if r.get("cold_only") else "")
            vs = [("-" if r[k] is None else f"{r[k]:.2f}x") for k in ("speedup_vs_fp32", "speedup_vs_bf16")]
            peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
            lines.append(f"| {r['batch']} | {r['variant']} | {runs} | {r['median_ms']:.1f} | {r['images_per_s']:.1f}"
                         f" | {vs[0]} | {vs[1]} | {peak} |")
        lines.append("")
        for key, val in cell.get("sizes", {}).items():
            lines.append(f"- size {key}: {val / 2**20:.3f} MiB" if isinstance(val, int) else f"- {key}: {val}")
        for label, d in cell.get("disagreement", {}).items():
            lines.append(f"- fast path vs reference ({label}, {d['images']} random image): worst layer "
                         f"{100 * d['max_frac_codes_differing']:.4f}% of codes differ (mean "
                         f"{100 * d['mean_frac_codes_differing']:.4f}%, max difference {d['max_code_diff']}), "
                         f"logits max relative difference {d['max_logit_diff_relative']:.2e}")
        for label, p in cell.get("paths", {}).items():
            exact = [k for k, v in p.items() if v.startswith("exact")]
            lines.append(f"- {label}: {len(p) - len(exact)} conv/linear layers on oneDNN int8 kernels"
                         + (f"; exact fp32 path (int16 saturation) for {', '.join(exact)}" if exact else ""))
        lines.append("")
    if res.get("targets"):
        lines += ["## Targets", ""] + [f"- {t}" for t in res["targets"]] + [""]
    if res.get("embedded"):
        e = res["embedded"]
        from lowbit.export.verify import format_report

        lines += ["## Embedded ResNet: exactness on the test set", "", "```", format_report(e), "```", "",
                  f"File: {e['sizes']['lowbit_bytes'] / 1024:.1f} KiB vs fp32 weights "
                  f"{e['sizes']['fp32_weight_bytes'] / 1024:.1f} KiB ({e['sizes']['ratio']:.1f}x smaller).", ""]
    return "\n".join(lines)


def targets(res: dict) -> list[str]:
    cell = res["groups"].get("torchvision resnet18 224x224 (random weights)")
    if not cell:
        return []
    out = []
    for label in ("w4a4", "mixed 4/2"):
        for r in cell["rows"]:
            if r["variant"] == f"lowbit {label} fast path" and r["batch"] == 64:
                for key, name in (("speedup_vs_fp32", "fp32"), ("speedup_vs_bf16", "bf16")):
                    if r[key] is not None:
                        ok = r[key] >= TARGETS[key]
                        out.append(f"{label} at batch 64: {r[key]:.2f}x {name} (target >= {TARGETS[key]}x): "
                                   f"{'met' if ok else 'MISSED'}")
    s = cell["sizes"]
    for label, key in (("w4a4", "w4a4_size"), ("mixed 4/2", "mostly2_size")):
        ratio = s[f"{label} lowbit_bytes"] / s["fp32_weight_bytes"]
        out.append(f"{label} file: {ratio:.3f} of fp32 (target <= {TARGETS[key]:.3f}): "
                   f"{'met' if ratio <= TARGETS[key] else 'MISSED'}")
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
    ap.add_argument("--force", action="store_true", help="redo cells already in docs/results/deploy.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_json = RESULTS / "deploy.json"
    res = load_json(out_json) if out_json.exists() and not args.force else {}
    res.setdefault("groups", {})
    res.update(machine=machine_info(), machine_common=machine(), threads=args.threads, args=vars(args))
    res["loaded"] = res["machine"].get("loadavg", [0])[0] > 0.5 * (res["machine"].get("logical_cpus") or 1)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        jobs = []
        if not args.skip_resnet18:
            try:
                jobs.append(("torchvision resnet18 224x224 (random weights)", resnet18_models(tmp)))
            except ImportError:
                res["groups"].pop("torchvision resnet18 224x224 (random weights)", None)
                print("torchvision is not installed: resnet18 skipped (use .venv-vision)")
        if args.source:
            done = res.get("embedded", {}).get("args") == [args.source, args.verify_limit]
            path, report = verify_run(args.source, tmp, 0 if done else args.verify_limit)
            if not done:  # resumable: the test-set checks of this run and limit are already in the JSON
                res["embedded"] = {**report, "args": [args.source, args.verify_limit]}
                save_json(out_json, res)
            jobs.append((f"embedded ResNet ({args.source})", {"model": path}))
            name = (res["embedded"].get("model") or Path(args.source).name).replace(":", "_")
            table = latency_table(path, batch=8, runs=20)
            save_json(RESULTS / f"latency_{name}.json", table)
            print(f"per-layer latency table -> {RESULTS / f'latency_{name}.json'}")
        for group, paths in jobs:
            cell = res["groups"].setdefault(group, {"rows": []})
            models = {label: IntegerModel.load(p) for label, p in paths.items()}
            fast = {label: FastModel(m) for label, m in models.items()}
            sizes = {f"{label} lowbit_bytes": p.stat().st_size for label, p in paths.items()}
            sizes["fp32_weight_bytes"] = next(iter(models.values())).manifest["fp32_weight_bytes"]
            onnx = {label: onnx_session(m, tmp, label, sizes) for label, m in models.items()}
            cell["sizes"], cell["paths"] = sizes, {label: f.paths for label, f in fast.items()}
            cell["threads"], cell["loadavg"] = args.threads, machine_info().get("loadavg")
            cell["disagreement"] = {label: layer_disagreement(models[label], f) for label, f in fast.items()}
            for batch in batches:
                if not args.force and any(r["batch"] == batch for r in cell["rows"]):
                    continue  # resumable: this cell is done
                rows = time_cell(group, batch, models, fast, onnx, args)
                cell["rows"] = [r for r in cell["rows"] if r["batch"] != batch] + rows
                save_json(out_json, res)
            cell["rows"].sort(key=lambda r: r["batch"])
    res["targets"] = targets(res)
    write_results("deploy", res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
