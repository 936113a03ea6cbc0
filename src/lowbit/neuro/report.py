"""Figures and reports of a walk run: ``density.png``, ``error_vs_walkers.png``, ``report.md``, ``report.html``.

Both reports render one list of blocks, so they always say the same thing; the HTML embeds the figures and can be
mailed as one file.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from lowbit.neuro.problems import Problem
from lowbit.reports import Block


def _figure(width: float, height: float, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height))
    return plt, fig, axes


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_density(problem: Problem, spiking: np.ndarray, baseline: np.ndarray | None = None, title: str = "") -> bytes:
    """PNG: the spiking estimate (and the baseline's) against the reference; images plus a centre slice in 2-D."""
    ref = problem.reference
    if len(problem.shape) == 1:
        plt, fig, ax = _figure(7.0, 3.8)
        x = np.arange(problem.shape[0])
        xlabel = "node"
        if "h" in problem.info:
            x = problem.info["x0"] + problem.info["h"] * x
            xlabel = "x"
        ax.plot(x, ref, color="black", lw=1.5, label="reference")
        ax.plot(x, spiking, ".", ms=3, color="tab:red", label="spiking circuit")
        if baseline is not None:
            ax.plot(x, baseline, ".", ms=2, color="tab:blue", alpha=0.6, label="conventional MC")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("probability per node")
        ax.legend(fontsize=8)
        ax.set_title(title)
        return _png(plt, fig)
    plt, fig, axes = _figure(12.0, 3.8, 3)
    est2, ref2 = spiking.reshape(problem.shape), ref.reshape(problem.shape)
    vmax = max(float(ref2.max()), float(est2.max()))
    for ax, img, name in ((axes[0], est2, "spiking circuit"), (axes[1], ref2, "reference")):
        im = ax.imshow(img, origin="lower", vmin=0, vmax=vmax, cmap="viridis")
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.046)
    row = problem.shape[0] // 2 if problem.observable == "density" else (3 * problem.shape[0]) // 4
    axes[2].plot(ref2[row], color="black", label="reference")
    axes[2].plot(est2[row], ".", ms=4, color="tab:red", label="spiking circuit")
    if baseline is not None:
        axes[2].plot(baseline.reshape(problem.shape)[row], ".", ms=3, color="tab:blue", alpha=0.6,
                     label="conventional MC")
    axes[2].set_title(f"row {row}")
    axes[2].set_xlabel("column")
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    return _png(plt, fig)


def plot_error(walkers: Sequence[int], errors: Sequence[Sequence[float]], slope: float, intercept: float,
               metric: str, title: str = "") -> bytes:
    """PNG: error against walkers on log-log axes, each repeat a dot, the fit and a 1/sqrt(walkers) guide."""
    plt, fig, ax = _figure(5.6, 4.0)
    for w, errs in zip(walkers, errors):
        ax.plot([w] * len(errs), errs, "o", color="tab:red", ms=4, alpha=0.7)
    w = np.array(walkers, dtype=np.float64)
    ax.plot(w, np.exp(intercept) * w**slope, color="black", label=f"fit: slope {slope:.3f}")
    mid = np.exp(np.mean([np.log(np.mean(e)) for e in errors]))
    guide = mid * (w / np.exp(np.mean(np.log(w)))) ** -0.5
    ax.plot(w, guide, "--", color="gray", label="1/sqrt(walkers)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("walkers")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _png(plt, fig)


def fmt(x, digits: int = 3) -> str:
    """Compact number for tables: integers with separators, floats with ``digits`` significant digits."""
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{int(x):,}"
    return f"{float(x):.{digits}g}"


def summary_blocks(s: Mapping) -> list[Block]:
    """The report of one run, from its ``summary.json``."""
    c = s["config"]
    sp, cost = s["spiking"], s["cost"]
    blocks: list[Block] = [
        ("h1", f"lowbit walk: {s['problem']} on {s['mesh']} ({s['topology']})"),
        ("p", f"{fmt(c['walkers'])} walkers, {fmt(sp['steps'])} steps, {c['prob_bits']}-bit probability neurons, "
              f"seed {c['seed']}, device {c['device']}. Reference: {s['reference']}."),
        ("h2", "Accuracy"),
    ]
    rows = [["spiking circuit", *[fmt(v) for v in sp["errors"].values()], fmt(sp.get("gof", {}).get("p_value"))]]
    if s.get("baseline"):
        b = s["baseline"]
        rows.append(["conventional MC", *[fmt(v) for v in b["errors"].values()], fmt(b.get("gof", {}).get("p_value"))])
    blocks.append(("table", ["simulator", *sp["errors"].keys(), "chi-square p vs reference"], rows))
    if s.get("agreement"):
        a = s["agreement"]
        blocks.append(("p", f"Spiking vs conventional ({a['test']}): p = {fmt(a['p_value'])}"
                            + (f"; KS p = {fmt(a['ks_p_value'])}" if "ks_p_value" in a else "") + "."))
    for note in s.get("notes", []):
        blocks.append(("p", note))
    sw = s["sweep"]
    blocks += [("img", "density.png", "density against the reference"),
               ("h2", "Error against walkers"),
               ("p", f"{sw['metric']} averaged over {c['repeats']} seed(s) per size; least-squares slope of log "
                     f"error on log walkers {sw['slope']:.3f} ± {sw['slope_stderr']:.3f} (Monte Carlo: -0.5)."),
               ("table", ["walkers", f"mean {sw['metric']}"],
                [[fmt(w), fmt(e)] for w, e in zip(sw["walkers"], sw["mean"])]),
               ("img", "error_vs_walkers.png", "error against walkers")]
    q = s["bias"]
    bias = (f"law TV {fmt(q['law_tv'])} (bound steps x row TV = {fmt(q['law_tv_bound'])})" if "law_tv" in q
            else f"largest field change {fmt(q['field_max_abs'])}")
    blocks += [("h2", f"Quantization bias at {q['bits']} bits (exact, no sampling)"),
               ("p", f"Largest edge error {fmt(q['max_edge_error'])}, largest per-step row TV "
                     f"{fmt(q['max_row_tv'])}, {q['dropped_edges']} edge(s) rounded to zero; {bias}.")]
    blocks += [("h2", "Speed and cost (estimates are marked)"),
               ("table", ["quantity", "value"], [
                   ["spiking walker updates/s (measured)", fmt(sp["walker_updates_per_s"])],
                   ["conventional walker updates/s (measured)",
                    fmt(s["baseline"]["walker_updates_per_s"]) if s.get("baseline") else "-"],
                   ["conventional / spiking speed", fmt(s.get("speed_ratio"))],
                   ["neurons / synapses", f"{fmt(cost['neurons'])} / {fmt(cost['synapses'])}"],
                   ["spikes per walker step", fmt(cost["spikes_per_walker_step"])],
                   ["synaptic events per walker step", fmt(cost["events_per_walker_step"])],
                   ["TrueNorth energy, per-event estimate (J)", fmt(cost["truenorth_energy_j"])],
                   ["Loihi energy, per-event estimate (J)", fmt(cost["loihi_energy_j"])],
                   ["TrueNorth modelled time (s) / whole-chip energy (J)",
                    f"{fmt(cost['truenorth_seconds'])} / {fmt(cost['truenorth_chip_energy_j'])}"],
                   [f"CPU energy at an assumed {c['cpu_watts']:g} W: spiking / conventional (J)",
                    f"{fmt(s['cpu']['spiking_energy_j'])} / {fmt(s['cpu'].get('baseline_energy_j'))}"],
               ]),
               ("p", "Energy sources: " + " ".join(s["energy_sources"]))]
    return blocks
