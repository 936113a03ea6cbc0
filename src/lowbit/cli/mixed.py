"""Mixed-precision subcommands: ``lowbit sensitivity``, ``lowbit select`` and ``lowbit frontier``.

Same pattern as :mod:`lowbit.cli.main`: each factory returns ``(add(parser), run(args))`` and each ``run`` calls
one public function. :data:`COMMANDS` is merged into ``lowbit.cli.main.SUBCOMMANDS`` by the CLI.

    lowbit sensitivity --from runs/w4a4 --method eagl --out runs/sens-eagl
    lowbit select --from runs/w4a4 --sensitivity runs/sens-eagl --budget 0.5 --out plan.yaml
    lowbit frontier --from runs/w4a4 --methods eagl,alps,hessian,random --budgets 0.25,0.5,0.75,1.0 --out runs/fr

Both ``sensitivity --method alps`` and ``frontier`` spread their fine-tunes over the ranks under torchrun:
    torchrun --nproc-per-node 2 -m lowbit sensitivity --from runs/w4a4 --method alps --out runs/sens-alps
"""

from __future__ import annotations

import argparse

from lowbit.cli.main import add_common, add_data, add_fit, positive_float, positive_int
from lowbit.distributed import is_main


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    add_data(g, default_help="the run's own data: its factory, arguments and split")
    g.add_argument("--loss", default=None, metavar="PKG.MOD:FN",
                   help="loss fn(outputs, batch) of the fine-tunes and the Hessian (default: the run's own)")


def _data_options(a: argparse.Namespace) -> dict:
    from lowbit.plugins import parse_args_option

    return {"data": a.data, "data_dir": a.data_dir, "data_args": parse_args_option(a.data_args, "--data-args")}


def _candidate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("candidate layers")
    g.add_argument("--candidates", default=None,
                   help="comma-separated layer names (default: every quantized layer but the first, the last "
                        "and 8-bit ones)")
    g.add_argument("--include-first-last", action="store_true",
                   help="let the first/last (8-bit) layers drop to 2 bits too")


def _method_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Per-method options; ``prefix`` (``alps-``) keeps ALPS' epochs apart from the frontier's fine-tune."""
    g = p.add_argument_group("EAGL")
    g.add_argument("--variant", default=None, choices=["h4", "h4-h2", "h4-weighted"],
                   help="entropy score: H of the 4-bit codes (h4, default), H4-H2, or N_W·H4")
    g = p.add_argument_group("ALPS")
    g.add_argument(f"--{prefix}epochs", dest="alps_epochs", type=positive_float, default=None,
                   help="fine-tune epochs per candidate (default 1; fractions allowed)")
    g.add_argument(f"--{prefix}examples", dest="alps_examples", type=positive_int, default=None,
                   help="training examples per ALPS epoch (default: the whole training split)")
    g.add_argument(f"--{prefix}lr", dest="alps_lr", type=positive_float, default=None,
                   help="ALPS fine-tune learning rate (default: the LSQ 2-bit recipe's)")
    g.add_argument("--reference", default=None, choices=["finetuned", "checkpoint"],
                   help="accuracy the drops are measured from: the W4A4 net fine-tuned with the same budget "
                        "(finetuned, default, one extra job) or the checkpoint as is")
    g = p.add_argument_group("Hessian trace")
    g.add_argument("--tol", type=positive_float, default=None,
                   help="stop when the total trace estimate changes by less than this, relatively (default 0.01)")
    g.add_argument("--max-iter", type=positive_int, default=None, help="most Hutchinson iterations (default 100)")
    g.add_argument("--rse", type=positive_float, default=None,
                   help="stop when every layer's trace has a relative standard error below this (e.g. 0.1) "
                        "instead of on --tol; the table reports each layer's error")
    g.add_argument("--hessian-examples", type=positive_int, default=None,
                   help="validation examples for the Hessian (default 1024)")


def _options(a: argparse.Namespace, method: str, batch_size: int | None = None) -> dict:
    return {
        "eagl": {"variant": a.variant},
        "alps": {"epochs": a.alps_epochs, "examples_per_epoch": a.alps_examples, "lr": a.alps_lr,
                 "reference": a.reference, "batch_size": batch_size, "amp": getattr(a, "amp", None)},
        "hessian": {"tol": a.tol, "max_iter": a.max_iter, "examples": a.hessian_examples, "batch_size": batch_size,
                    "rse": a.rse},
        "random": {},
    }[method]


def _metric_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="top1",
                   help="validation metric that ALPS and the frontier measure (higher is better): top1, a "
                        "registered name, or package.module:function (see lowbit.metrics)")


def _amp_arg(p: argparse.ArgumentParser) -> None:
    """``--amp`` unless the shared fit flags (lowbit.cli.main.add_fit) already define it."""
    if not any("--amp" in a.option_strings for a in p._actions):
        p.add_argument("--amp", default=None, choices=["bf16"], help="bf16 autocast of the fine-tunes' forward")


def _run_dir_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("run directory")
    r.add_argument("--resume", action="store_true", help="reuse finished work (ALPS candidates) of a killed run")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


# --------------------------------------------------------------------------------------------- commands
def _sensitivity():
    def add(p):
        p.add_argument("--from", dest="source", required=True, help="W4A4 run directory (from `lowbit quantize`)")
        p.add_argument("--method", required=True, choices=["eagl", "alps", "hessian", "random"])
        p.add_argument("--batch-size", type=positive_int, default=None, help="batch size of ALPS and the Hessian (128)")
        _metric_args(p)
        _amp_arg(p)
        _method_args(p)
        _candidate_args(p)
        _run_dir_args(p)
        add_common(p, out="runs/sensitivity", data=False)
        _data_args(p)

    def run(a):
        from lowbit.sensitivity import sensitivity

        table = sensitivity(a.source, a.method, a.out, **_data_options(a), loss=a.loss, candidates=a.candidates,
                            include_first_last=a.include_first_last, seed=a.seed, workers=a.workers,
                            device=a.device, resume=a.resume, overwrite=a.overwrite, quiet=a.quiet,
                            options=_options(a, a.method, a.batch_size), metric=a.metric)
        if is_main():
            print(table.render())
            print(f"-> {a.out}/sensitivity.json")
        return 0

    return add, run


def _budget_args(p: argparse.ArgumentParser, many: bool) -> None:
    g = p.add_argument_group("budget and cost")
    if many:
        g.add_argument("--budgets", default="0.25,0.5,0.75,1.0",
                       help="comma-separated budgets: fractions of candidate MACs at 2 bits, or throughputs")
    else:
        g.add_argument("--budget", required=True,
                       help="fraction of candidate MACs at 2 bits (0..1), or a relative throughput")
    g.add_argument("--budget-kind", default="mac-fraction", choices=["mac-fraction", "throughput"],
                   help="mac-fraction: at least this share of candidate MACs at 2 bits; throughput: at least this "
                        "throughput relative to W4A4 (= 1.0) under --cost")
    g.add_argument("--cost", default="bits-proportional", choices=["bits-proportional", "bops", "size", "measured"],
                   help="throughput model (measured needs --latency-table)")
    g.add_argument("--latency-table", default=None, help="per-layer latency JSON for --cost measured")
    g.add_argument("--keep-negative", dest="clip_negative", action="store_false",
                   help="let negative scores force extra layers to 2 bits (default: floor scores at 0)")


def _select():
    def add(p):
        p.add_argument("--from", dest="source", required=True, help="W4A4 run directory")
        p.add_argument("--sensitivity", required=True, help="sensitivity run directory or sensitivity.json")
        p.add_argument("--out", default="plan.yaml",
                       help="plan file (.yaml/.json) for `lowbit quantize --plan`; costs go to <stem>.cost.json")
        _budget_args(p, many=False)

    def run(a):
        from lowbit.frontier import select

        r = select(a.source, a.sensitivity, a.budget, a.out, budget_kind=a.budget_kind, cost=a.cost,
                   latency_table=a.latency_table, clip_negative=a.clip_negative)
        c = r.cost
        print(f"{r.table.method}: {len(r.selection.chosen)} layer(s) at 2 bits: {', '.join(r.selection.chosen)}")
        print(f"2-bit share of candidate MACs {c.low_bit_mac_fraction:.3f}, relative throughput "
              f"{c.relative_throughput:.3f} ({c.profile}), BOPs {c.bops:,}, weight bytes {c.weight_bytes:,}; "
              f"time to plan {r.table.wall_seconds + r.solve_seconds:.3g} s  -> {a.out}")
        return 0

    return add, run


def _frontier():
    def add(p):
        p.add_argument("--from", dest="source", required=True, help="W4A4 run directory")
        p.add_argument("--methods", default="eagl,alps,hessian,random", help="comma-separated methods")
        p.add_argument("--sensitivity", nargs="+", default=None, metavar="RUN",
                       help="reuse tables from `lowbit sensitivity` runs instead of scoring again")
        p.add_argument("--no-endpoints", dest="endpoints", action="store_false",
                       help="skip the uniform W4A4 and W2A2 points")
        p.add_argument("--examples", type=positive_int, default=None,
                       help="training examples per fine-tune epoch of each point (default: the whole split)")
        p.add_argument("--distill", action="store_true",
                       help="fine-tune every point with distillation from the fp32 run the W4A4 run came from "
                            "(LSQ+KD)")
        _budget_args(p, many=True)
        _method_args(p, prefix="alps-")
        _candidate_args(p)
        add_fit(p, epochs=1.0, lr=None, wd=None, schedule=None)
        _amp_arg(p)
        _metric_args(p)
        add_common(p, out="runs/frontier", data=False)
        _data_args(p)

    def run(a):
        from lowbit.frontier import FrontierConfig, frontier
        from lowbit.sensitivity import METHODS, SensitivityTable
        from lowbit.train import recipe_fit_config

        over = dict(batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                    schedule=a.schedule, warmup_epochs=a.warmup_epochs, label_smoothing=a.label_smoothing,
                    lr_decay=a.lr_decay, seed=a.seed, device=a.device, channels_last=a.channels_last,
                    compile=a.compile, examples_per_epoch=a.examples, quiet=True,
                    augmentation=getattr(a, "augmentation", None), amp=a.amp, distill=a.distill or None)
        fit = recipe_fit_config("lsq", 2, epochs=a.epochs, **over)
        tables = {}
        for path in a.sensitivity or []:
            t = SensitivityTable.load(path)
            tables[t.method] = t
        methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
        options = {m: _options(a, m) for m in methods if m in METHODS}
        cfg = FrontierConfig(methods=methods, budgets=a.budgets, budget_kind=a.budget_kind, cost=a.cost,
                             latency_table=a.latency_table, fit=fit, seed=a.seed, workers=a.workers,
                             options=options, candidates=None if a.candidates is None else a.candidates.split(","),
                             include_first_last=a.include_first_last, clip_negative=a.clip_negative,
                             endpoints=a.endpoints, device=a.device, quiet=a.quiet, metric=a.metric, loss=a.loss)
        payload = frontier(a.source, a.out, cfg, **_data_options(a), tables=tables, resume=a.resume,
                           overwrite=a.overwrite)
        if not is_main():
            return 0
        val, test = ("val_acc", "test_acc") if a.metric == "top1" else ("val_metric", "test_metric")

        def pct(v):
            return "-" if v is None else f"{100 * v:.2f}" if a.metric == "top1" else f"{v:.4g}"

        print(f"{'method':14s} {'budget':>6s} {'2-bit':>5s} {'throughput':>10s} {'val':>7s} {'test':>7s}"
              + ("" if a.metric == "top1" else f"   ({a.metric})"))
        for pt in payload["points"]:
            budget = "-" if pt["budget"] is None else f"{pt['budget']:g}"
            print(f"{pt['method']:14s} {budget:>6s} {pt['n_low']:5d} {pt['relative_throughput']:10.3f} "
                  f"{pct(pt.get(val)):>7s} {pct(pt.get(test)):>7s}")
        print(f"-> {a.out}/report.html, frontier.json, frontier.csv, frontier.png")
        return 0

    return add, run


COMMANDS = {
    "sensitivity": (_sensitivity, "score a W4A4 run's layers for dropping to 2 bits (EAGL, ALPS, Hessian, random)",
                    "Score every candidate layer of a W4A4 run (all quantized layers but the first, the last and "
                    "8-bit ones): eagl = entropy of the 4-bit weight codes (data-free), alps = validation-accuracy "
                    "drop after dropping the layer to 2 bits and fine-tuning (one job per layer, --workers "
                    "processes, resumable), hessian = Hutchinson trace x 2-bit quantization error (HAWQ), random = "
                    "seeded control. Writes sensitivity.json and prints the table, most sensitive first."),
    "select": (_select, "choose the layers to drop to 2 bits under a budget; write a plan file",
               "Solve the exact knapsack over a sensitivity table: drop the least sensitive layers until at least "
               "--budget of the candidates' MACs run at 2 bits (or the relative throughput reaches it). The plan "
               "file is what `lowbit quantize --plan` reads."),
    "frontier": (_frontier, "accuracy-throughput frontier of layer-selection methods (commensurate fine-tunes)",
                 "For each method and budget, build the plan, fine-tune it from the W4A4 checkpoint with the same "
                 "recipe, epochs and seed for every method, and evaluate. Adds the uniform W4A4 and W2A2 points, "
                 "time to solution per method and the Spearman correlation of each method's scores with ALPS' "
                 "measured drops. Writes frontier.json/.csv/.png and report.md/.html; resumable."),
}

__all__ = ["COMMANDS"]
