"""Frontier outputs: ``frontier.csv``, ``frontier.png``, ``report.md`` and a self-contained ``report.html``.

Both reports are rendered from one list of blocks (headings, paragraphs, tables, the figure), so they always
say the same thing; the HTML embeds the PNG as base64 and can be mailed as one file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lowbit.io import atomic_write_bytes, atomic_write_text, save_json
from lowbit.reports import Block, render_html, render_markdown
from lowbit.sensitivity.table import SensitivityTable

CSV_COLUMNS = ("method", "budget", "budget_kind", "plan", "low_layers", "n_low", "low_bit_mac_fraction", "bops",
               "weight_bytes", "relative_throughput", "val_acc", "test_acc", "finetune_seconds",
               "time_to_plan_seconds", "reused_from")
METRIC_COLUMNS = ("val_metric", "test_metric")  # added when the frontier measured a task metric other than top1


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float | None:
    """Spearman rank correlation over the layers both score; None when undefined (constant scores, < 2 layers)."""
    from scipy.stats import spearmanr

    common = [n for n in a if n in b]
    if len(common) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN
        rho = spearmanr([a[n] for n in common], [b[n] for n in common]).statistic
    rho = float(rho)
    return None if math.isnan(rho) else rho


def spearman_vs(tables: Mapping[str, SensitivityTable], measured: str = "alps") -> dict[str, float | None]:
    """Each method's rank correlation with the measured ALPS drops (empty when ALPS was not run)."""
    if measured not in tables:
        return {}
    ref = tables[measured].scores
    return {m: spearman(t.scores, ref) for m, t in tables.items() if m != measured}


def fmt_rho(rho: float | None) -> str:
    return "n/a" if rho is None else f"{rho:+.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _budget(p: Mapping[str, Any]) -> str:
    return "-" if p.get("budget") is None else f"{p['budget']:g}"


# --- figure ----------------------------------------------------------------------------------------
def plot_frontier(points: Sequence[Mapping[str, Any]], fp32_acc: float | None = None, title: str = "",
                  metric: str = "test_acc", label: str | None = None) -> bytes:
    """PNG bytes: ``metric`` (%) against relative throughput, one line per method, end points as black squares,
    fp32 as a dashed reference line. A point's ``<metric>_std`` (if any) becomes an error bar. ``label`` names
    the y axis (default: test or validation accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(p["method"] for p in points))
    for m in methods:
        mine = sorted((p for p in points if p["method"] == m), key=lambda p: p["relative_throughput"])
        xs = [p["relative_throughput"] for p in mine]
        ys = [100 * (p.get(metric) if p.get(metric) is not None else float("nan")) for p in mine]
        err = [100 * p.get(f"{metric}_std", 0.0) for p in mine]
        if m.startswith("uniform"):
            ax.errorbar(xs, ys, yerr=err if any(err) else None, fmt="s", color="black", zorder=3)
            for x, y in zip(xs, ys):
                ax.annotate(m.split("-", 1)[1].upper(), (x, y), textcoords="offset points", xytext=(5, 5),
                            fontsize=8)
        else:
            ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", capsize=2, label=m)
    if fp32_acc is not None:
        ax.axhline(100 * fp32_acc, color="gray", linestyle="--", label="fp32")
    ax.set_xlabel("relative throughput (W4A4 = 1.0)")
    ax.set_ylabel(label or f"{'test' if metric.startswith('test') else 'validation'} accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --- rendering -------------------------------------------------------------------------------------
def report_blocks(payload: Mapping[str, Any], figure: str = "frontier.png") -> list[Block]:
    """The frontier report of one run as blocks (see :func:`render_markdown`, :func:`render_html`)."""
    cfg = payload["config"]
    fit = cfg["fit"]
    refs = payload["references"]
    points = payload["points"]
    methods = list(payload["methods"])
    name, val, test = _measured(payload)
    blocks: list[Block] = [
        ("h1", f"Mixed-precision frontier: {', '.join(methods)}"),
        ("p", f"Source W4A4 run: `{payload['source']}`; data: {payload['data']}; {len(payload['candidates'])} "
              f"candidate layers (first, last and 8-bit layers stay at 8 bits). Budgets: {cfg['budget_kind']} "
              f"{', '.join(f'{b:g}' for b in cfg['budgets'])}; throughput model: {payload['profile']} "
              "(relative to the W4A4 network)."),
        ("p", f"Every plan, end points included, is fine-tuned from the W4A4 checkpoint with the same recipe: "
              f"{fit['epochs']:g} epoch(s), lr {fit['lr']:g} ({fit['schedule']}), weight decay "
              f"{fit['weight_decay']:g}, batch {fit['batch_size']}, seed {fit['seed']}. Only the choice of "
              f"layers differs between methods. {'Accuracies' if name == 'acc' else name} in %; test is for "
              "reporting, selection uses validation."),
    ]
    ref_rows = []
    if refs.get("fp32"):
        ref_rows.append(["fp32 (source run)", _pct(refs["fp32"].get(val)), _pct(refs["fp32"].get(test))])
    ref_rows.append(["W4A4 checkpoint (no further fine-tune)", _pct(refs["w4a4_checkpoint"].get(val)),
                     _pct(refs["w4a4_checkpoint"].get(test))])
    blocks += [("h2", "References"), ("table", ["model", f"val {name}", f"test {name}"], ref_rows)]
    blocks += [("h2", "Frontier"), ("img", figure, f"{name} vs relative throughput"),
               ("table", ["method", "budget", "2-bit layers", "2-bit MAC share", "rel. throughput", "BOPs",
                          "weight bytes", f"val {name}", f"test {name}", "fine-tune s"],
                [[p["method"], _budget(p), p["n_low"], f"{p['low_bit_mac_fraction']:.3f}",
                  f"{p['relative_throughput']:.3f}", f"{p['bops']:,}", f"{p['weight_bytes']:,}", _pct(p.get(val)),
                  _pct(p.get(test)), f"{p['finetune_seconds']:.1f}" + (" (shared)" if p.get("reused_from") else "")]
                 for p in points])]
    tts = payload["time_to_solution"]
    blocks += [("h2", "Time to solution"),
                ("p", "Seconds to reach a plan: the method's sensitivity scoring (wall clock of this run; ALPS' "
                      "compute seconds add up its jobs, whatever the number of workers) plus the knapsack solve "
                      "(mean over budgets). Passes are mini-batches through the whole network; fine-tuning the "
                      "chosen plans is reported apart."),
                ("table", ["method", "scoring s", "compute s", "solve s", "time to plan s", "forward", "backward",
                           "HVP", "epochs", "fine-tune s"],
                 [[m, f"{t['sensitivity_seconds']:.4g}", f"{t['compute_seconds']:.4g}",
                   f"{t['solve_seconds_mean']:.3g}", f"{t['time_to_plan_seconds']:.4g}", t["passes"]["forward"],
                   t["passes"]["backward"], t["passes"]["hvp"], f"{t['passes']['epochs']:.3g}",
                   f"{t['finetune_seconds']:.1f}"] for m, t in tts.items()])]
    rho = payload["spearman_vs_alps"]
    if rho:
        blocks += [("h2", "Proxy vs measured"),
                   ("p", "Spearman rank correlation of each method's layer scores with ALPS' measured accuracy "
                         "drops (1 = same ranking; n/a = undefined, e.g. constant scores)."),
                   ("table", ["method", "Spearman ρ vs ALPS"], [[m, fmt_rho(r)] for m, r in rho.items()])]
    else:
        blocks += [("p", "Spearman vs ALPS: n/a (ALPS was not among the methods).")]
    blocks += [("h2", "Per layer"), ("p", _per_layer_note(cfg)), ("table", *_per_layer(payload))]
    return blocks


def _measured(payload: Mapping[str, Any]) -> tuple[str, str, str]:
    """(label, val key, test key): accuracy for top1 (and files from before metrics), else the task metric."""
    metric = payload.get("metric", "top1")
    label, val, test = ("acc", "val_acc", "test_acc") if metric == "top1" else (metric, "val_metric", "test_metric")
    if not any(p.get(test) is not None for p in payload.get("points", ())):  # data without a test split
        test = val
    return label, val, test


def _per_layer_note(cfg: Mapping[str, Any]) -> str:
    return ("Scores (higher = keep at 4 bits) and, per method, the layer's bits at each budget "
            f"({', '.join(f'{b:g}' for b in cfg['budgets'])}), left to right.")


def _per_layer(payload: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    methods = list(payload["methods"])
    scores = {m: {r["layer"]: r["score"] for r in t["rows"]} for m, t in payload["methods"].items()}
    bits = {}
    for m in methods:
        mine = [p for p in payload["points"] if p["method"] == m]
        bits[m] = {n: "·".join(str(p["plan"][n][0]) for p in mine) for n in payload["candidates"]}
    header = ["layer", "MACs", "MAC share", "params"] + [f"{m} score" for m in methods] + [f"{m} bits" for m in methods]
    rows = [[li["layer"], f"{li['macs']:,}", f"{100 * li['mac_share']:.1f}%", f"{li['params']:,}"]
            + [f"{scores[m][li['layer']]:.4g}" for m in methods] + [bits[m][li["layer"]] for m in methods]
            for li in payload["layers"]]
    return header, rows


def frontier_csv(points: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    columns = CSV_COLUMNS + tuple(c for c in METRIC_COLUMNS if any(c in p for p in points))
    w.writerow(columns)
    for p in points:
        row = {**p, "plan": json.dumps(p["plan"], separators=(",", ":")), "low_layers": ";".join(p["low_layers"]),
               "budget": "" if p.get("budget") is None else p["budget"], "reused_from": p.get("reused_from") or ""}
        w.writerow([row.get(c, "") for c in columns])
    return buf.getvalue()


def write_outputs(folder: str | Path, payload: Mapping[str, Any]) -> None:
    """``frontier.json``, ``frontier.csv``, ``frontier.png``, ``report.md`` and ``report.html`` into ``folder``."""
    folder = Path(folder)
    name, _, test = _measured(payload)
    fp32 = (payload["references"].get("fp32") or {}).get(test)
    png = plot_frontier(payload["points"], fp32, title=f"{payload['data']}: {', '.join(payload['methods'])}",
                        metric=test, label=None if test == "test_acc" else f"test {name} (%)")
    save_json(folder / "frontier.json", payload)
    atomic_write_text(folder / "frontier.csv", frontier_csv(payload["points"]))
    atomic_write_bytes(folder / "frontier.png", png)
    blocks = report_blocks(payload)
    atomic_write_text(folder / "report.md", render_markdown(blocks))
    atomic_write_text(folder / "report.html", render_html(blocks, {"frontier.png": png}, title="lowbit frontier"))


__all__ = ["CSV_COLUMNS", "fmt_rho", "frontier_csv", "plot_frontier", "render_html", "render_markdown",
           "report_blocks", "spearman", "spearman_vs", "write_outputs"]
