"""Frontier benchmark: EAGL vs ALPS vs Hessian trace vs random layer selection on the embedded default.

Fashion-MNIST, resnet8: the fp32 baseline (10 epochs) and its W4A4 LSQ run (the recipe's 5 epochs) are built
here unless --from names a W4A4 run. Then, per seed, ``lowbit.frontier.frontier`` scores the candidate layers
with every method in this one process (so the time-to-solution table compares like with like), picks a plan
per budget, fine-tunes every plan with the same LSQ 2-bit recipe for --epochs, and evaluates. Seeds change the
fine-tunes' data order and the random / Hessian / ALPS draws; the base W4A4 run stays the same.

Writes docs/results/frontier.{md,json,png}: the frontier averaged over seeds, time to solution, Spearman vs
ALPS and the issue's targets with whether each was met. Every stage is resumable (rerun the same command).

    python bench/frontier.py --seeds 0,1 --budgets 0.1,0.25,0.5,0.75,1.0 --epochs 1 --workers 2
    python bench/frontier.py --model resnet20 --fp32-weights bench/state/resnet20-fp32 --w4a4-epochs 5 \
        --seeds 0,1,2 --budgets 0.25,0.5,0.75 --epochs 5 --distill --alps-epochs 1 --hessian-rse 0.1 \
        --runs runs/bench-frontier-r20 --state bench/state/frontier-r20   # issue #12 scale, across sessions
    python bench/frontier.py --data synthetic --tiny      # smoke test (a minute); writes under --runs only

With several seeds the file also gives, per budget, the paired difference (same seed, same data order) of
EAGL and ALPS against random and against the Hessian trace with a 95% t interval, and the plan overlap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, write_results  # noqa: E402
from lowbit.data import get_data  # noqa: E402
from lowbit.frontier import FrontierConfig, frontier, plot_frontier  # noqa: E402
from lowbit.frontier.report import fmt_rho  # noqa: E402
from lowbit.frontier.stats import compare_methods  # noqa: E402
from lowbit.io import atomic_write_bytes, atomic_write_text, load_json, save_json  # noqa: E402
from lowbit.train import FitConfig, QuantizeConfig, TrainConfig, quantize_run, recipe_fit_config, train  # noqa: E402
from mirror import mirror  # noqa: E402

METHODS = ("eagl", "alps", "hessian", "random")
TARGET_BUDGET, TARGET_GAP_PT, TARGET_SPEEDUP = 0.5, 0.3, 1000.0


def _complete(run: Path) -> bool:
    p = run / "summary.json"
    return p.exists() and bool(load_json(p).get("complete"))


def build_base(runs: Path, data, tiny: bool, seed: int, model: str = "resnet8", fp32_epochs: float = 10,
               w4a4_epochs: float | None = None, fp32_weights: str | None = None, device: str = "cpu") -> Path:
    """fp32 ``model`` (trained here, or from ``fp32_weights`` that an earlier run trained), then W4A4 LSQ from it;
    a finished stage is reused (resumable)."""
    fp, w4 = runs / "fp32", runs / "w4a4"
    if not _complete(fp):
        resume = (fp / "checkpoint.pt").exists() and not fp32_weights
        epochs = 0 if fp32_weights else 2 if tiny else fp32_epochs
        fit = FitConfig(epochs=epochs, batch_size=64 if tiny else 128, seed=seed, quiet=True, device=device)
        train(TrainConfig(model=model, width=0.5 if tiny else None, data=data.name, out=str(fp), fit=fit,
                          weights=fp32_weights), data=data, resume=resume, overwrite=not resume)
    if not _complete(w4):
        resume = (w4 / "checkpoint.pt").exists()
        over = {"epochs": 1, "batch_size": 64} if tiny else ({"epochs": w4a4_epochs} if w4a4_epochs else {})
        quantize_run(QuantizeConfig(source=str(fp), out=str(w4), data=data.name), data=data, resume=resume,
                     overwrite=not resume, fit_overrides={"seed": seed, "quiet": True, "device": device, **over})
    return w4


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each (method, budget) point."""
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for payload in runs:
        for p in payload["points"]:
            groups.setdefault((p["method"], p["budget"]), []).append(p)
    out = []
    for (method, budget), ps in groups.items():
        row = {"method": method, "budget": budget, "seeds": len(ps)}
        for k in ("test_acc", "val_acc", "relative_throughput", "low_bit_mac_fraction", "n_low"):
            row[k] = _mean([p[k] for p in ps])
            row[f"{k}_std"] = _std([p[k] for p in ps])
        out.append(row)
    return out


def time_to_solution(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for m in runs[0]["time_to_solution"]:
        ts = [r["time_to_solution"][m] for r in runs]
        out[m] = {k: statistics.median([t[k] for t in ts]) for k in ("sensitivity_seconds", "compute_seconds",
                                                         "solve_seconds_mean", "time_to_plan_seconds",
                                                         "finetune_seconds")}
        out[m].update({f"{k}_passes": _mean([t["passes"][k] for t in ts]) for k in ("forward", "backward", "hvp",
                                                                                   "epochs")})
    return out


def hessian_convergence(runs: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """Per seed: Hutchinson iterations and the largest per-layer relative standard error of the trace."""
    out = []
    for seed in seeds:
        path = runs / f"frontier-seed{seed}" / "sensitivity" / "hessian.json"
        if path.exists():
            c = load_json(path)["config"]
            out.append({"seed": seed, **{k: c.get(k) for k in ("iterations", "max_relative_se", "rse", "converged",
                                                               "examples")}})
    return out


def compute_hours(payloads: list[dict[str, Any]], runs: Path) -> dict[str, float]:
    """Wall-clock hours: the base runs, every method's scoring once per seed, every point's fine-tune."""
    base = sum(load_json(p)["train_seconds"] for p in (runs / "fp32" / "summary.json", runs / "w4a4" / "summary.json")
               if p.exists())
    scoring = sum(t["compute_seconds"] for pl in payloads for t in pl["time_to_solution"].values())
    tune = sum(p.get("finetune_seconds", 0.0) for pl in payloads for p in pl["points"])
    return {"base": base / 3600, "scoring": scoring / 3600, "finetune": tune / 3600,
            "total": (base + scoring + tune) / 3600}


def targets(points: list[dict[str, Any]], fp32: float | None, tts: dict[str, dict[str, float]],
            paired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three targets, each with its measured value and whether it was met.

    The best mix at the target budget is chosen on validation accuracy; its test accuracy is what the target
    is measured on (choosing on test would bias the reported number upwards).
    """
    out = []
    at = [p for p in points if p["budget"] == TARGET_BUDGET and not p["method"].startswith("uniform")]
    if fp32 is None or not at:
        out.append({"target": f"a 4/2 mix at {TARGET_BUDGET:g} of candidate MACs within {TARGET_GAP_PT} pt of fp32",
                    "value": "n/a (no fp32 reference or budget not run)", "met": None})
    else:
        best = max(at, key=lambda p: p["val_acc"])
        gap = 100 * (fp32 - best["test_acc"])
        out.append({"target": f"a 4/2 mix at {TARGET_BUDGET:g} of candidate MACs within {TARGET_GAP_PT} pt of fp32",
                    "value": f"best on validation {best['method']} (val {100 * best['val_acc']:.2f}%): test "
                             f"{100 * best['test_acc']:.2f}% vs fp32 {100 * fp32:.2f}% (gap {gap:+.2f} pt)",
                    "met": gap <= TARGET_GAP_PT})
    for m in ("eagl", "alps"):
        rows = [r for r in paired if r["method"] == m and r["baseline"] == "random"]
        if not rows:
            continue
        above = [r["budget"] for r in rows if r["excludes_zero"] and r["mean"] > 0]
        means = ", ".join(f"{r['budget']:g}: {100 * r['mean']:+.2f}" for r in rows)
        out.append({"target": f"{m} above random with the paired 95% interval excluding 0 at two budgets or more",
                    "value": f"at {', '.join(f'{b:g}' for b in above) or 'no budget'}; mean differences (pt) {means}",
                    "met": len(above) >= 2})
    if "eagl" in tts and "hessian" in tts:
        ratio = tts["hessian"]["sensitivity_seconds"] / max(tts["eagl"]["sensitivity_seconds"], 1e-12)
        plan_ratio = tts["hessian"]["time_to_plan_seconds"] / max(tts["eagl"]["time_to_plan_seconds"], 1e-12)
        out.append({"target": f"EAGL's selection at least {TARGET_SPEEDUP:g}x faster than the Hessian trace",
                    "value": f"scoring {ratio:,.0f}x faster; including the knapsack solve {plan_ratio:,.0f}x",
                    "met": ratio >= TARGET_SPEEDUP})
    return out


def render(payload: dict[str, Any]) -> str:
    a = payload["args"]
    pts = payload["points"]
    fp32 = payload["fp32_test_acc"]
    kd = " with distillation from the fp32 model" if a.get("distill") else ""
    lines = [
        "# Mixed-precision frontier: EAGL vs ALPS vs Hessian trace vs random", "",
        f"Model {a.get('model', 'resnet8')} on {payload['data']}, base W4A4 LSQ run `{payload['base']}` (first "
        f"conv and last FC at 8 bits). Budget = fraction of the candidate layers' MACs at 2 bits (weights and "
        f"input activations); "
        f"every plan, the uniform W4A4 and W2A2 end points included, fine-tuned from the W4A4 checkpoint with the "
        f"same LSQ 2-bit recipe ({a['epochs']:g} epoch(s){kd}); test accuracy, mean ± std over seeds "
        f"{', '.join(map(str, a['seeds']))}. Relative throughput: bits-proportional model (W4A4 = 1.0).", "",
        f"Machine: {machine_line(payload['machine'])}.", "",
        f"fp32 reference: {'n/a' if fp32 is None else f'{100 * fp32:.2f}%'} test accuracy.", "",
        "![frontier](frontier.png)", "",
        "| method | budget | 2-bit MAC share | rel. throughput | test acc (%) | val acc (%) |",
        "|---|---|---|---|---|---|"]
    for p in pts:
        b = "-" if p["budget"] is None else f"{p['budget']:g}"
        lines.append(f"| {p['method']} | {b} | {p['low_bit_mac_fraction']:.3f} | {p['relative_throughput']:.3f} | "
                     f"{100 * p['test_acc']:.2f} ± {100 * p['test_acc_std']:.2f} | "
                     f"{100 * p['val_acc']:.2f} ± {100 * p['val_acc_std']:.2f} |")
    lines += ["", "## Time to solution (same process, same model, median over seeds)", "",
              "Scoring = the method's sensitivity wall time; ALPS' compute seconds add up its per-layer jobs "
              f"(run with {a['workers']} worker(s)). Time to plan = scoring + knapsack solve. Passes are "
              "mini-batches through the whole network (they do not depend on the machine's load; the seconds "
              "are wall clock on a shared machine, hence the median).", "",
              "| method | scoring s | compute s | time to plan s | forward | backward | HVP | epochs |",
              "|---|---|---|---|---|---|---|---|"]
    for m, t in payload["time_to_solution"].items():
        lines.append(f"| {m} | {t['sensitivity_seconds']:.4g} | {t['compute_seconds']:.4g} | "
                     f"{t['time_to_plan_seconds']:.4g} | {t['forward_passes']:.0f} | {t['backward_passes']:.0f} | "
                     f"{t['hvp_passes']:.0f} | {t['epochs_passes']:.3g} |")
    if payload.get("paired"):
        lines += ["", "## Paired differences over seeds (test accuracy, points)", "",
                  "Same W4A4 start, recipe and data order per seed: the difference is paired by seed; 95% "
                  "Student-t interval over the seeds. Plan overlap = Jaccard index of the layers dropped to 2 bits "
                  "(1 = the same plan). Seeds for 80% power: how many seeds a 5% test would need to detect the "
                  "observed mean difference, were it and the observed spread the true ones.", "",
                  "| budget | method − baseline | seeds | mean (pt) | 95% interval (pt) | excludes 0 | plan overlap | "
                  "seeds for 80% power |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in payload["paired"]:
            ci = "n/a" if r["n"] < 2 else f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]"
            lines.append(f"| {r['budget']:g} | {r['method']} − {r['baseline']} | {r['n']} | {100 * r['mean']:+.2f} | "
                         f"{ci} | {'yes' if r['excludes_zero'] else 'no'} | {r['plan_overlap']:.2f} | "
                         f"{r.get('seeds_for_power') or '-'} |")
    if payload.get("hessian_convergence"):
        lines += ["", "## Hessian trace: Hutchinson convergence per seed", "",
                  "Run until every candidate layer's trace estimate has a relative standard error below the bound.",
                  "", "| seed | iterations | largest per-layer relative SE | bound | examples |",
                  "|---|---|---|---|---|"]
        for c in payload["hessian_convergence"]:
            bound = "-" if c["rse"] is None else f"{c['rse']:g}"
            lines.append(f"| {c['seed']} | {c['iterations']} | {c['max_relative_se']:.3f} | {bound} | "
                         f"{c['examples']} |")
    if payload["spearman_vs_alps"]:
        lines += ["", "## Proxy vs measured: Spearman ρ of each method's scores with ALPS' drops", "",
                  "| method | " + " | ".join(f"seed {s}" for s in a["seeds"]) + " |",
                  "|---|" + "---|" * len(a["seeds"])]
        for m, rhos in payload["spearman_vs_alps"].items():
            lines.append(f"| {m} | " + " | ".join(fmt_rho(r) for r in rhos) + " |")
    lines += ["", "## Targets", "",
              "Measured on test accuracy (mean over seeds). Where a target needs the best method, the best is "
              "chosen on validation accuracy; test accuracy is only reported, never used to choose.", "",
              "| target | measured | met |", "|---|---|---|"]
    for t in payload["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {t['value']} | {met} |")
    if c := payload.get("compute_hours"):
        lines += ["", f"Total compute: {c['total']:.1f} h wall clock (base fp32/W4A4 runs {c['base']:.1f} h, scoring "
                  f"{c['scoring']:.1f} h, fine-tuning the points {c['finetune']:.1f} h; seconds counted while the "
                  "machine was shared or the run paused are included)."]
    lines += ["", f"Reproduce: `{payload['command']}` (resumable: finished stages and points are reused).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", default=None, help="W4A4 run (default: build fp32 + W4A4 here)")
    ap.add_argument("--runs", default="runs/bench-frontier", help="where the runs go")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budgets", default="0.1,0.25,0.5,0.75,1.0")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tune epochs of every frontier point")
    ap.add_argument("--alps-epochs", type=float, default=1.0, help="fine-tune epochs per ALPS candidate")
    ap.add_argument("--workers", type=int, default=1, help="processes for ALPS candidates and frontier points")
    ap.add_argument("--model", default="resnet8", help="registry model of the base run (resnet8/14/20)")
    ap.add_argument("--fp32-epochs", type=float, default=10, help="epochs of the fp32 base run")
    ap.add_argument("--fp32-weights", default=None,
                    help="start from these fp32 weights instead of training (e.g. bench/state/resnet20-fp32)")
    ap.add_argument("--w4a4-epochs", type=float, default=None, help="epochs of the W4A4 base run (recipe: 5)")
    ap.add_argument("--distill", action="store_true", help="fine-tune every point with LSQ+KD from the fp32 run")
    ap.add_argument("--hessian-rse", type=float, default=None,
                    help="run Hutchinson until every layer's relative standard error is below this (e.g. 0.1)")
    ap.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "synthetic"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--tiny", action="store_true",
                    help="smoke test: tiny model, a fraction of an epoch everywhere; results under --runs only")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process (1 avoids OpenMP spin-waits on a busy 2-core machine)")
    ap.add_argument("--state", default=None,
                    help="committed mirror of the resumable state (e.g. bench/state/frontier-r20): restored into "
                         "--runs first, kept up to date while running (see bench/mirror.py)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every stage runs there)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    runs = Path(a.runs)
    if a.state:
        mirror(runs, Path(a.state))
    data = get_data(a.data, a.data_dir)
    weights = a.fp32_weights
    if weights and Path(weights).is_dir():
        weights = str(Path(weights) / "weights.safetensors")
    base = Path(a.source) if a.source else build_base(runs, data, a.tiny, seeds[0], a.model, a.fp32_epochs,
                                                      a.w4a4_epochs, weights, a.device)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    small = {"examples_per_epoch": 64, "batch_size": 32} if a.tiny else {}
    options = {"alps": {"epochs": a.alps_epochs, **({"examples_per_epoch": 64, "batch_size": 32} if a.tiny else {})},
               "hessian": {"max_iter": 5, "examples": 64} if a.tiny else
               ({"rse": a.hessian_rse, "max_iter": 400} if a.hessian_rse else {})}
    payloads = []
    for seed in seeds:
        out = runs / f"frontier-seed{seed}"
        fit = recipe_fit_config("lsq", 2, epochs=a.epochs, seed=seed, quiet=True, distill=a.distill or None,
                                device=a.device, **small)
        cfg = FrontierConfig(methods=methods, budgets=a.budgets, fit=fit, seed=seed, workers=a.workers,
                             device=a.device,
                             options={m: o for m, o in options.items() if m in methods}, quiet=a.quiet)
        payloads.append(frontier(base, out, cfg, data=data, resume=(out / "config.yaml").exists()))
        print(f"seed {seed}: {len(payloads[-1]['points'])} points -> {out}")

    points = aggregate(payloads)
    paired = compare_methods(payloads, [(m, b) for m in ("eagl", "alps") for b in ("random", "hessian")
                                        if m in methods and b in methods])
    fp32 = (payloads[0]["references"].get("fp32") or {}).get("test_acc")
    tts = time_to_solution(payloads)
    payload = {
        "command": "python bench/frontier.py " + " ".join(sys.argv[1:]),
        "args": {"model": a.model, "distill": a.distill, "hessian_rse": a.hessian_rse, "seeds": seeds,
                 "budgets": list(payloads[0]["config"]["budgets"]), "epochs": a.epochs,
                 "alps_epochs": a.alps_epochs, "workers": a.workers, "tiny": a.tiny, "methods": list(methods)},
        "machine": machine(), "data": data.name, "base": str(base), "fp32_test_acc": fp32,
        "points": points, "time_to_solution": tts,
        "spearman_vs_alps": {m: [p["spearman_vs_alps"].get(m) for p in payloads]
                             for m in payloads[0]["spearman_vs_alps"]},
        "paired": paired, "targets": targets(points, fp32, tts, paired),
        "hessian_convergence": hessian_convergence(runs, seeds), "compute_hours": compute_hours(payloads, runs),
        "runs": [str(runs / f"frontier-seed{s}") for s in seeds],
    }
    png = plot_frontier(points, fp32, title=f"{a.model} on {data.name}: mean over {len(seeds)} seed(s)")
    md = render(payload)
    if a.tiny:  # a smoke run never overwrites the published results
        results = runs / "results"
        save_json(results / "frontier.json", payload)
        atomic_write_text(results / "frontier.md", md)
    else:
        results = RESULTS
        write_results("frontier", payload, md)
    atomic_write_bytes(results / "frontier.png", png)
    print(md)
    print(f"-> {results}/frontier.md")


if __name__ == "__main__":
    main()
