"""``walk``: one problem end to end into a run directory (what ``lowbit walk`` calls).

Order of work: the spiking run (checkpointed, resumable), the conventional baseline on the same chain and seed,
the error-vs-walkers sweep, the exact quantization bias, the cost model, then figures and reports. Everything
is validated before the run directory is created, so a bad option leaves nothing behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.io import atomic_write_bytes, atomic_write_text, load_checkpoint, save_checkpoint
from lowbit.neuro.bias import quantization_bias
from lowbit.neuro.circuit import compile_circuit
from lowbit.neuro.config import WalkConfig, build_problem
from lowbit.neuro.cost import PLATFORMS, cpu_energy, walk_cost
from lowbit.neuro.problems import Problem, errors, estimate, start_counts
from lowbit.neuro.report import plot_density, plot_error, summary_blocks
from lowbit.neuro.simulate import WalkState, _bar, resolve_device, simulate, simulate_baseline
from lowbit.neuro.stats import chi2_goodness_of_fit, chi2_two_sample, fit_slope, ks_two_sample
from lowbit.reports import render_html, render_markdown
from lowbit.runs import RunDir

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_SECONDS = 60.0


def walk(config: WalkConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
         quiet: bool = False) -> dict[str, Any]:
    """Run ``config`` into ``out`` (config.yaml, metrics.jsonl, summary.json, figures, report.md/html).

    ``resume`` continues a killed run from its last checkpoint (the walker state, saved atomically); the result
    is bit-identical to an uninterrupted run.
    """
    problem = build_problem(config)
    device = resolve_device(config.device)
    run = RunDir(out, resume=resume, overwrite=overwrite)
    if run.resume:
        _check_same_config(run, config)
        if run.file("summary.json").exists():
            from lowbit.io import load_json

            return load_json(run.file("summary.json"))
    run.write_config(config.to_dict())
    circuit = compile_circuit(problem.chain, config.prob_bits, device)
    _warm_up(problem, circuit, device, config.baseline)
    state, seconds, rows = _spiking_run(run, config, problem, circuit, device, quiet)
    summary = _summarise(config, problem, circuit, state, seconds, rows, run, device, quiet)
    run.write_summary(summary)
    return summary


def _warm_up(problem: Problem, circuit, device, baseline: bool) -> None:
    """A few steps of each simulator first, so that one-off costs (kernel dispatch, allocator) stay out of the
    timed runs."""
    start = start_counts(problem, 64)
    simulate(circuit, start, min(problem.steps, 3), seed=0, device=device)
    if baseline:
        simulate_baseline(problem.chain, start, min(problem.steps, 3), seed=0, device=device)


def _check_same_config(run: RunDir, config: WalkConfig) -> None:
    from lowbit.io import load_yaml

    saved = load_yaml(run.file("config.yaml")) or {}
    now = config.to_dict()
    diff = [k for k in now if k != "checkpoint_every" and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise LowbitError(f"{run.path} was run with {k}={saved.get(k)!r}, not {now[k]!r}; resume with the same "
                          f"options, or pass --overwrite / another --out")


def _spiking_run(run: RunDir, config: WalkConfig, problem: Problem, circuit, device, quiet: bool):
    """The main run, saved every ``checkpoint_every`` steps (or minute) and continued from the last save."""
    state, seconds, rows = None, 0.0, []
    if run.resume and run.file(CHECKPOINT).exists():
        ckpt = load_checkpoint(run.file(CHECKPOINT), kind="walk")
        state = WalkState.from_payload(ckpt["state"], device)
        seconds = float(ckpt["seconds"])
        rows = run.read_metrics()
    clock = {"start": time.perf_counter(), "saved": time.perf_counter(), "io": 0.0}

    def save(s: WalkState) -> None:
        now = time.perf_counter()
        due = (config.checkpoint_every and s.step % config.checkpoint_every == 0) or \
            (not config.checkpoint_every and now - clock["saved"] >= CHECKPOINT_SECONDS)
        if not (due or s.step >= problem.steps or s.alive == 0) or (rows and rows[-1].get("step") == s.step):
            return
        elapsed = seconds + now - clock["start"] - clock["io"]
        rows.append({"phase": "spiking", "step": s.step, "alive": s.alive, "absorbed": int(s.absorbed.sum()),
                     "walker_steps": s.walker_steps, "seconds": round(elapsed, 4)})
        save_checkpoint(run.file(CHECKPOINT), {"kind": "walk", "state": s.to_payload(), "seconds": elapsed})
        run.write_metrics(rows)
        clock["saved"] = time.perf_counter()
        clock["io"] += clock["saved"] - now

    start = start_counts(problem, config.walkers)
    state = simulate(circuit, start, problem.steps, seed=config.seed, device=device, state=state,
                     checkpoint=save, checkpoint_every=config.checkpoint_every or 1, progress=not quiet)
    return state, rows[-1]["seconds"] if rows else seconds, rows


def _observe(problem: Problem, state: WalkState, walkers: int) -> np.ndarray:
    occ = state.visits.cpu().numpy() if state.visits is not None else None
    return estimate(problem, state.counts.cpu().numpy(), occ, walkers)


def _summarise(config: WalkConfig, problem: Problem, circuit, state: WalkState, seconds: float, rows: list,
               run: RunDir, device, quiet: bool) -> dict[str, Any]:
    field = problem.observable == "field"
    w = config.walkers
    spiking_est = _observe(problem, state, w)
    spiking = _side(problem, state, seconds, spiking_est)
    summary: dict[str, Any] = {
        "problem": problem.name, "mesh": "x".join(map(str, problem.shape)), "topology": problem.topology,
        "nodes": problem.chain.n_nodes, "edges": problem.chain.n_edges, "reference": problem.reference_name,
        "config": config.to_dict(), "spiking": spiking, "notes": _notes(problem),
    }
    baseline_est = None
    if config.baseline:
        start = start_counts(problem, w)
        t0 = time.perf_counter()
        base = simulate_baseline(problem.chain, start, problem.steps, seed=config.seed, device=device,
                                 visits=field)
        if device.type == "cuda":
            torch.cuda.synchronize()
        base_seconds = time.perf_counter() - t0
        baseline_est = _observe(problem, base, w)
        summary["baseline"] = _side(problem, base, base_seconds, baseline_est)
        summary["speed_ratio"] = summary["baseline"]["walker_updates_per_s"] / max(spiking["walker_updates_per_s"],
                                                                                   1e-12)
        summary["agreement"] = _agreement(problem, state, base)
    sweep = _sweep(config, problem, circuit, device, quiet)
    rows += [{"phase": "sweep", "walkers": wk, "repeat": i, sweep["metric"]: e}
             for wk, errs in zip(sweep["walkers"], sweep["errors"]) for i, e in enumerate(errs)]
    run.write_metrics(rows)
    summary["sweep"] = sweep
    summary["bias"] = quantization_bias(problem, config.prob_bits)
    summary["cost"] = walk_cost(circuit, state)
    summary["cpu"] = {"assumed_watts": config.cpu_watts, "spiking_energy_j": cpu_energy(seconds, config.cpu_watts),
                      "baseline_energy_j": cpu_energy(summary["baseline"]["seconds"], config.cpu_watts)
                      if config.baseline else None, "threads": torch.get_num_threads()}
    summary["energy_sources"] = [p.source + "." for p in PLATFORMS.values()] + [
        f"CPU energy = measured seconds x an assumed {config.cpu_watts:g} W. All neuromorphic figures are "
        "estimates from our event counts, not measurements."]
    title = f"{problem.name} {summary['mesh']}, {w:,} walkers"
    images = {"density.png": plot_density(problem, spiking_est, baseline_est, title),
              "error_vs_walkers.png": plot_error(sweep["walkers"], sweep["errors"], sweep["slope"],
                                                 sweep["intercept"], sweep["metric"], problem.name)}
    for name, png in images.items():
        atomic_write_bytes(run.file(name), png)
    blocks = summary_blocks(summary)
    atomic_write_text(run.file("report.md"), render_markdown(blocks))
    atomic_write_text(run.file("report.html"), render_html(blocks, images, title))
    return summary


def _side(problem: Problem, state: WalkState, seconds: float, est: np.ndarray) -> dict[str, Any]:
    out = {"steps": state.step, "alive": state.alive, "absorbed": int(state.absorbed.sum()),
           "walker_steps": state.walker_steps, "seconds": seconds,
           "walker_updates_per_s": state.walker_steps / max(seconds, 1e-9),
           "errors": errors(problem, est)}
    if problem.observable == "density":
        out["gof"] = chi2_goodness_of_fit(state.counts.cpu().numpy(), problem.reference)
    return out


def _agreement(problem: Problem, a: WalkState, b: WalkState) -> dict[str, Any]:
    """Two-sample test of the spiking and conventional runs: final positions, or exit points for heat."""
    if problem.observable == "field":
        test = chi2_two_sample(a.absorbed.cpu().numpy(), b.absorbed.cpu().numpy())
        return {"test": "chi-square two-sample on the exit node of every walker", **test}
    ca, cb = a.counts.cpu().numpy(), b.counts.cpu().numpy()
    out = {"test": "chi-square two-sample on the final node of every walker", **chi2_two_sample(ca, cb)}
    if len(problem.shape) == 1:
        out["ks_p_value"] = ks_two_sample(ca, cb)["p_value"]
    return out


def _sweep(config: WalkConfig, problem: Problem, circuit, device, quiet: bool) -> dict[str, Any]:
    """Error of independent spiking runs at each walker count (``repeats`` seeds each), and the log-log fit."""
    metric = "l2"
    sizes = config.sweep_walkers
    errs = []
    bar = _bar(not quiet, len(sizes) * config.repeats, 0, "error sweep")
    for wk in sizes:
        errs.append([])
        for rep in range(config.repeats):
            seed = config.seed + 1_000_003 * (rep + 1) + wk
            s = simulate(circuit, start_counts(problem, wk), problem.steps, seed=seed, device=device)
            errs[-1].append(errors(problem, _observe(problem, s, wk))[metric])
            bar.update(1)
    bar.close()
    means = [float(np.mean(e)) for e in errs]
    fit = fit_slope(sizes, means) if len(sizes) > 1 else {"slope": float("nan"), "intercept": float("nan"),
                                                          "slope_stderr": float("nan")}
    return {"metric": metric, "walkers": list(sizes), "errors": errs, "mean": means, **fit}


def _notes(problem: Problem) -> list[str]:
    info = problem.info
    if problem.name == "diffusion":
        return [f"The Gaussian limit (variance {info['variance_per_axis']:.4g} per axis, images at the edges) is "
                f"{info['gaussian_tv']:.2g} in total variation from the exact lattice law: the lattice correction "
                f"at this many steps."]
    if problem.name == "jump-diffusion":
        p = info["params"]
        return [f"Merton parameters: sigma {p['sigma']}, jump rate {p['jump_rate']}, jump mean {p['jump_mean']}, "
                f"jump std {p['jump_std']}, horizon {p['horizon']}; mesh spacing h = {info['h']:.4g}, "
                f"dt = {info['dt']:.4g}; density outside the mesh {info['edge_mass']:.2g}."]
    if problem.name == "heat":
        return [f"Walkers are released next to the hot edge and absorbed at the boundary; each visit counts "
                f"towards the field (the adjoint of Feynman-Kac). The finite-difference solution is "
                f"{info['fd_vs_continuum_max']:.2g} (max) from the continuum PDE's."]
    return []
