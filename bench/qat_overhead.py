"""Where a QAT fine-tuning step goes, eager and under torch.compile, and what compiling costs.

For each model (resnet8, resnet20) and thread count (1, 2), one worker process trains on Fashion-MNIST batches
from lowbit's own pipeline (batch 128, flip augmentation, channels-last, lowbit's SGD): fp32, LSQ W4A4 and FAQ
W4A4, each eager and compiled, steps interleaved round-robin so load changes on the shared machine hit every
variant alike (medians). Each step is split into data, forward, backward and optimizer. The worker also times:

* the first compile (a fresh Inductor cache, made by this script), and a second, different plan (mixed 4/2
  bits) compiled in the same process: the quantizers' bits are buffers, so it should reuse the graph;
* the same two plans with the bits baked in as Python constants, as before they were buffers ("baked");
* in a fresh process with the cache now warm, the compile of the mixed plan (a plan that process never saw);
* the augmentation and the optimizer alone (lowbit's SGD: for-loop vs foreach).

``--epoch`` adds one epoch of W4A4 LSQ fine-tuning through ``lowbit.train.fit`` from the shipped fp32 resnet8,
eager and compiled (wall time including compile, and the accuracies). Writes docs/results/qat_overhead.{json,md}
with the total compute of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, write_results  # noqa: E402
from lowbit.data import get_data, iterate  # noqa: E402
from lowbit.models import create_model  # noqa: E402
from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_  # noqa: E402
from lowbit.train import FitConfig, make_optimizer  # noqa: E402

BATCH = 128
FIT = FitConfig(lr=0.01, weight_decay=5e-4, nesterov=False)  # the LSQ recipe's optimizer at 4 bits


def mixed_plan(model) -> Plan:
    """W4A4 with every other body layer at 2 bits: a plan of the kind a frontier point or ALPS candidate has."""
    w4 = Plan.preset("w4a4", model)
    return Plan({n: b if i % 2 or b[0] == 8 else (2, 2) for i, (n, b) in enumerate(w4.layers.items())})


def build(name: str, method: str | None, x, plan: str = "w4a4"):
    torch.manual_seed(0)
    m = create_model(name).to(memory_format=torch.channels_last)
    if method:
        quantize_(m, mixed_plan(m) if plan == "mixed" else Plan.preset(plan, m), QuantConfig(method=method))
        calibrate_(m, [x])
    return m.train()


def bake_bits() -> None:
    """Make the quantizers read their bits as Python constants, as they did before ``q_min``/``q_max``."""
    import math

    from lowbit.quant import quantizers as q
    from lowbit.quant.ste import clamp_min_ste, grad_scale

    eager = q._Quantizer.forward

    def forward(self, x):
        if self.observing or not self._ready:
            return eager(self, x)
        s = q._broadcast(self._forward_step(x), x, self.channel_axis)
        return q.fake_quant(x, s, self.q_n, self.q_p)

    def lsq_step(self, x):
        if self.role == "activation":
            n = x[0].numel() if x.dim() > 1 else x.numel()
        else:
            n = x.numel() // self.step.numel()
        return grad_scale(clamp_min_ste(self.step, self._eps()), 1.0 / math.sqrt(n * self.q_p))

    q._Quantizer.forward = forward
    q.LsqQuantizer._forward_step = lsq_step


class Variant:
    """One model + optimizer + data stream, stepped with per-phase timings."""

    def __init__(self, label, model, compiled, data, epoch):
        self.label, self.model = label, model
        self.net = torch.compile(model) if compiled else model
        self.opt = make_optimizer(model, FIT)
        self.batches = iterate(data.train, BATCH, train=True, seed=0, epoch=epoch)
        self.times = {k: [] for k in ("data", "forward", "backward", "optimizer", "step")}

    def step(self, record=True) -> float:
        t0 = time.perf_counter()
        x, y = next(self.batches)
        x = x.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        loss = F.cross_entropy(self.net(x), y)
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        t4 = time.perf_counter()
        if record:
            for k, dt in zip(self.times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                self.times[k].append(1000 * dt)
        return t4 - t0


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def first_steps(v: Variant, n: int = 2) -> float:
    """Seconds of the first ``n`` steps (the first includes tracing and compiling)."""
    return sum(v.step(record=False) for _ in range(n))


def worker_steps(args) -> dict:
    torch.set_num_threads(args.threads)
    data = get_data("fashion-mnist")
    x0 = next(iterate(data.train, BATCH))[0].contiguous(memory_format=torch.channels_last)
    out = {"model": args.model, "threads": args.threads}
    variants, warm = [], {}
    methods = (("fp32", None), ("lsq-w4a4", "lsq"), ("faq-w4a4", "faq"))
    for label, method in methods:
        for compiled in (False, True):
            v = Variant(f"{label}{' compiled' if compiled else ''}", build(args.model, method, x0), compiled, data, 0)
            warm[v.label] = first_steps(v)
            variants.append(v)
    for _ in range(args.reps):
        for v in variants:
            v.step()
    rows = []
    for v in variants:
        med = {k: statistics.median(t) for k, t in v.times.items()}
        # compile = the first two steps minus two steady steps
        rows.append({"variant": v.label, **{f"{k}_ms": m for k, m in med.items()},
                     "compile_s": warm[v.label] - 2 * med["step"] / 1000 if "compiled" in v.label else None})
    out["rows"] = rows
    # a second plan in this process: same graph?
    g0 = graphs()
    v = Variant("lsq-mixed compiled", build(args.model, "lsq", x0, "mixed"), True, data, 1)
    t = first_steps(v)
    steady = statistics.median(v.step(record=False) for _ in range(3))
    out["second_plan"] = {"compile_s": t - 2 * steady, "new_graphs": graphs() - g0}
    # augmentation and optimizer alone
    aug = {}
    for a in ("flip", "none"):
        it = iterate(data.train, BATCH, train=True, seed=0, epoch=2, augmentation=a, limit=BATCH * 40)
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        aug[a] = 1000 * (time.perf_counter() - t0) / n
    out["data_ms_per_batch"] = aug
    m = build(args.model, "lsq", x0)
    F.cross_entropy(m(x0), torch.zeros(len(x0), dtype=torch.long)).backward()
    opt_ms = {}
    for foreach in (False, True):
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, foreach=foreach)
        opt.step()
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t0)
        opt_ms["foreach" if foreach else "for-loop"] = 1000 * statistics.median(ts)
    out["optimizer_ms"] = opt_ms
    return out


def worker_baked(args) -> dict:
    """Compile W4A4, then the mixed plan, with the bits baked in (the code before this change)."""
    torch.set_num_threads(args.threads)
    bake_bits()
    data = get_data("fashion-mnist")
    x0 = next(iterate(data.train, BATCH))[0].contiguous(memory_format=torch.channels_last)
    res = {}
    for plan in ("w4a4", "mixed"):
        g0 = graphs()
        v = Variant(plan, build(args.model, "lsq", x0, plan), True, data, 0)
        t = first_steps(v)
        steady = statistics.median(v.step(record=False) for _ in range(3))
        res[plan] = {"compile_s": t - 2 * steady, "new_graphs": graphs() - g0}
    return res


def worker_warm(args) -> dict:
    """A fresh process, warm cache, a plan it never saw: how long until the compiled graph runs."""
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = get_data("fashion-mnist")
    x0 = next(iterate(data.train, BATCH))[0].contiguous(memory_format=torch.channels_last)
    v = Variant("mixed", build(args.model, "lsq", x0, "mixed"), True, data, 0)
    t = first_steps(v)
    steady = statistics.median(v.step(record=False) for _ in range(3))
    return {"compile_s": t - 2 * steady, "new_graphs": graphs(), "process_s": time.perf_counter() - t_start}


def worker_epoch(args) -> dict:
    """One epoch of LSQ W4A4 (+KD off) through ``fit`` from the shipped fp32 resnet8, eager vs compiled."""
    from lowbit.models.weights import load_weights_
    from lowbit.train import evaluate, fit
    from lowbit.train.quantize import prepare_quantized, recipe_fit_config

    torch.set_num_threads(args.threads)
    data = get_data("fashion-mnist")
    fp = create_model("resnet8")
    load_weights_(fp, Path(__file__).resolve().parent.parent / "src/lowbit/assets/resnet8-fashion-mnist.safetensors")
    torch.manual_seed(0)
    model = prepare_quantized(fp, Plan.preset("w4a4", fp), QuantConfig(method="lsq"), data)
    cfg = recipe_fit_config("lsq", 4, epochs=1, compile=args.compile_mode, quiet=True)
    t0 = time.perf_counter()
    state = fit(model, data, cfg)
    wall = time.perf_counter() - t0
    _, test_acc = evaluate(model, data.test)
    row = state.rows[-1]
    return {"compile": args.compile_mode, "wall_s": wall, "train_s": row["seconds"], "val_acc": row["val_acc"],
            "test_acc": test_acc, "compiled_steps": row.get("compiled_steps", 0), "steps": -(-row["examples"] // 128),
            "compile_s": row.get("compile_seconds")}


def run_worker(kind: str, env: dict, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    print("$", " ".join(cmd[1:]), flush=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"worker {kind} failed")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(json.dumps(res)[:400], flush=True)
    return res


def fmt(v, spec=".1f", none="–"):
    return none if v is None else format(v, spec)


def markdown(res: dict, args, m: dict, total: dict) -> str:
    order = {name: i for i, name in enumerate(args.models.split(","))}
    res = {**res, "steps": dict(sorted(res["steps"].items(),
                                       key=lambda kv: (order.get(kv[1]["model"], 99), kv[1]["threads"])))}
    md = ["# QAT step overhead and torch.compile", "",
          f"One training step of lowbit's fine-tuning loop, batch {BATCH}, Fashion-MNIST batches from lowbit's own "
          "pipeline (flip augmentation), channels-last, lowbit's SGD (momentum 0.9); W4A4 has the first and last "
          f"layers at 8 bits. Medians of {args.reps} interleaved steps after 2 warm-up steps, all variants of a "
          "(model, threads) pair in one process. The machine is shared with a niced background benchmark that keeps "
          "both cores busy, so absolute times (and 2 threads most) are inflated; compare within a table.", "",
          f"Machine: {machine_line(m)}.", ""]
    for r in res["steps"].values():
        md += [f"## {r['model']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''}", "",
               "| variant | step (ms) | data | forward | backward | optimizer | × fp32 eager | first compile (s) |",
               "|---|---|---|---|---|---|---|---|"]
        ref = next(x["step_ms"] for x in r["rows"] if x["variant"] == "fp32")
        for x in r["rows"]:
            md.append(f"| {x['variant']} | {x['step_ms']:.0f} | {x['data_ms']:.1f} | {x['forward_ms']:.0f} | "
                      f"{x['backward_ms']:.0f} | {x['optimizer_ms']:.1f} | {x['step_ms'] / ref:.2f}× | "
                      f"{fmt(x['compile_s'])} |")
        by = {x["variant"]: x for x in r["rows"]}
        lsq, lsqc = by["lsq-w4a4"]["step_ms"], by["lsq-w4a4 compiled"]["step_ms"]
        fq = 1 - by["fp32"]["step_ms"] / lsq
        sp = r["second_plan"]
        md += ["", f"LSQ W4A4: compiled **{lsq / lsqc:.2f}×** faster per step; fake quantization is {100 * fq:.0f}% "
               f"of the eager step (LSQ minus fp32). A second plan (mixed 4/2) in the same process: "
               f"**{max(0.0, sp['compile_s']):.1f} s** to its first compiled step, {sp['new_graphs']} new graphs. "
               f"Augmentation (flip): {r['data_ms_per_batch']['flip']:.1f} ms per batch vs "
               f"{r['data_ms_per_batch']['none']:.1f} ms without; lowbit's SGD: "
               f"{r['optimizer_ms']['for-loop']:.2f} ms (for-loop) vs {r['optimizer_ms']['foreach']:.2f} ms (foreach).",
               ""]
    md += ["## Compile time per plan", "",
           "Seconds from the first step to a steady compiled step (the first two steps minus two steady steps).", "",
           "| model | threads | first plan, cold cache | second plan, same process | other plan, fresh process, warm "
           "cache | baked bits (before): first plan | baked bits: second plan |", "|---|---|---|---|---|---|---|"]
    for key, r in res["steps"].items():
        lsqc = next(x for x in r["rows"] if x["variant"] == "lsq-w4a4 compiled")
        warm, baked = res["warm"].get(key), res["baked"].get(key)
        md.append(f"| {r['model']} | {r['threads']} | {lsqc['compile_s']:.1f} | "
                  f"{max(0.0, r['second_plan']['compile_s']):.1f} "
                  f"({r['second_plan']['new_graphs']} new graphs) | "
                  f"{fmt(warm and warm['compile_s'])} | {fmt(baked and baked['w4a4']['compile_s'])} | "
                  f"{fmt(baked and baked['mixed']['compile_s'])}"
                  f"{'' if not baked else ' ({} new graphs)'.format(baked['mixed']['new_graphs'])} |")
    md += ["", "## When compiling pays (the rule of `FitConfig(compile=\"auto\")`)", "",
           "Break-even = compile seconds / (eager − compiled step) for LSQ W4A4; an epoch is 430 steps.", "",
           "| model | threads | saved per step (ms) | break-even, cold cache (steps) | warm cache | same process |",
           "|---|---|---|---|---|---|"]
    for key, r in res["steps"].items():
        by = {x["variant"]: x for x in r["rows"]}
        saved = by["lsq-w4a4"]["step_ms"] - by["lsq-w4a4 compiled"]["step_ms"]
        warm = res["warm"].get(key)
        md.append(f"| {r['model']} | {r['threads']} | {saved:.0f} | "
                  f"{1000 * by['lsq-w4a4 compiled']['compile_s'] / saved:.0f} | "
                  f"{fmt(warm and 1000 * warm['compile_s'] / saved, '.0f')} | "
                  f"{max(0.0, 1000 * r['second_plan']['compile_s'] / saved):.0f} |")
    md += ["", "lowbit's rule (`lowbit.train.loop.AutoCompile`): time 3 eager steps after a warm-up, compile if "
           "`steps left × step × (1 − 1/speed-up) >` the expected compile: 0 s for a network this process compiled "
           "(any plan), 20 s when the machine's Inductor cache holds it (lowbit leaves a marker there), else 120 s; "
           "speed-up 1.8 with LSQ, 1.15 with FAQ/MinMax, 1.05 for float models (the smallest measured above, "
           "rounded down)."]
    if res.get("epoch"):
        md += ["", "## One epoch through `fit` (resnet8 W4A4 LSQ, from the shipped fp32 weights)", "",
               "The compiled run found its graph in the Inductor cache that the step measurements had filled (its "
               "first compiled step is the warm-cache compile); with a cold cache add the first compile above.", "",
               "| compile | threads | wall (s), incl. compile | first compiled step (s) | compiled steps | val acc | "
               "test acc |", "|---|---|---|---|---|---|---|"]
        for key, e in res["epoch"].items():
            md.append(f"| {e['compile']} | {key.split('/')[1]} | {e['wall_s']:.0f} | {fmt(e['compile_s'])} | "
                      f"{e['compiled_steps']}/{e['steps']} | {100 * e['val_acc']:.2f}% | {100 * e['test_acc']:.2f}% |")
    md += ["", f"Total compute of this run: {total['wall_s'] / 60:.1f} min wall, {total['cpu_s'] / 60:.1f} CPU-min "
           "(all processes).", "",
           "Reproduce: `python bench/qat_overhead.py` (`--epoch` adds the fit comparison; `--models`, `--threads`).",
           ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet8,resnet20")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--epoch", action="store_true", help="also one epoch through fit, eager vs compiled")
    ap.add_argument("--baked", default="resnet8", help="models whose baked-bits compile is measured ('' for none)")
    ap.add_argument("--state", default=str(Path(tempfile.gettempdir()) / "lowbit-qat-overhead.json"),
                    help="finished measurements; a rerun skips them (delete the file to start over)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="resnet8", help=argparse.SUPPRESS)
    ap.add_argument("--compile-mode", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        if args.compile_mode in ("True", "False"):
            args.compile_mode = args.compile_mode == "True"
        fn = {"steps": worker_steps, "baked": worker_baked, "warm": worker_warm, "epoch": worker_epoch}[args.worker]
        print(json.dumps(fn(args)))
        return
    t0 = time.perf_counter()
    state = Path(args.state)  # finished workers, so an interrupted run continues where it stopped
    res = json.loads(state.read_text()) if state.exists() else {}
    res.setdefault("cache", tempfile.mkdtemp(prefix="lowbit-inductor-"))  # cold at first, shared by the workers
    for key in ("steps", "warm", "baked", "epoch"):
        res.setdefault(key, {})
    res.setdefault("spent", {"wall_s": 0.0, "cpu_s": 0.0})
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": res["cache"]}

    def once(kind: str, key: str, **kw) -> None:
        if key not in res[kind]:
            res[kind][key] = run_worker(kind, env, **kw)
            state.write_text(json.dumps(res))

    models = [s for s in args.models.split(",") if s]
    threads = [int(t) for t in args.threads.split(",")]
    for model in models:
        for th in threads:
            key = f"{model}/{th}"
            once("steps", key, model=model, threads=th, reps=args.reps)
            once("warm", key, model=model, threads=th)
            if model in args.baked.split(","):
                once("baked", key, model=model, threads=th)
    if args.epoch:
        for mode in (False, True):
            once("epoch", f"{mode}/{min(threads)}", threads=min(threads), compile_mode=mode)
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    total = {"wall_s": res["spent"]["wall_s"] + time.perf_counter() - t0,
             "cpu_s": res["spent"]["cpu_s"] + sum(u.ru_utime + u.ru_stime for u in usage)}
    res["spent"] = total
    state.write_text(json.dumps(res))
    m = machine()
    write_results("qat_overhead", {"machine": m, "args": vars(args), **res, "total": total},
                  markdown(res, args, m, total))


if __name__ == "__main__":
    main()
