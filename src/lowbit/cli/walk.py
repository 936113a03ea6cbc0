"""``lowbit walk``: neuromorphic random walks (Monte Carlo DTMCs as integer spiking circuits).

Same pattern as :mod:`lowbit.cli.main`: the factory returns ``(add(parser), run(args))`` and ``run`` calls one
public function, :func:`lowbit.neuro.walk`. :data:`COMMANDS` is merged into the CLI by ``main._stage_commands``.

    lowbit walk --problem diffusion --mesh 64x64 --walkers 32000 --steps 200 --out runs/walk
    lowbit walk --problem diffusion --mesh 128 --topology torus --prob-bits 8 --out runs/ring
    lowbit walk --problem jump-diffusion --mesh 256 --jump-rate 3 --jump-mean -0.3 --jump-std 0.5 --out runs/merton
    lowbit walk --problem heat --mesh 32x32 --out runs/heat
    lowbit walk --problem dtmc --matrix chain.npz --start 0 --steps 50 --out runs/chain
"""

from __future__ import annotations

import argparse

from lowbit.cli.main import add_common


def _walk():
    def add(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("problem")
        g.add_argument("--problem", default="diffusion", choices=["diffusion", "jump-diffusion", "heat", "dtmc"],
                       help="diffusion: lazy walk vs the exact lattice heat kernel; jump-diffusion: Merton process "
                            "vs its density; heat: steady heat equation by absorbing walkers vs finite differences; "
                            "dtmc: your --matrix vs its exact law")
        g.add_argument("--mesh", default=None,
                       help="N (a line) or NxM (a grid/torus); default 64x64 diffusion, 256 jump-diffusion, 32x32 heat")
        g.add_argument("--topology", default=None, choices=["line", "grid", "torus"],
                       help="diffusion mesh kind (default: line for N, grid for NxM; torus wraps around)")
        g.add_argument("--walkers", type=int, default=32000, help="walkers released at step 0")
        g.add_argument("--steps", type=int, default=None,
                       help="DTMC steps (default 200; heat: a cap, default 4*max(mesh)^2, the run ends once every "
                            "walker is absorbed)")
        g.add_argument("--prob-bits", type=int, default=16,
                       help="integer weight resolution of the probability neurons (transition probabilities in "
                            "units of 2^-bits; the report gives the exact bias)")
        g.add_argument("--matrix", default=None, metavar="FILE",
                       help="dtmc: sparse transition matrix, .npz (scipy.sparse.save_npz) or .safetensors "
                            "(indptr/indices/data, or a dense 'matrix')")
        g.add_argument("--start", type=int, default=None,
                       help="start node (flattened index) for diffusion and dtmc (default: mesh centre / node 0)")
        g.add_argument("--stay", type=float, default=0.5, help="probability that a diffusion step stays put")
        j = p.add_argument_group("jump-diffusion (Merton)")
        j.add_argument("--sigma", type=float, default=1.0, help="Brownian volatility")
        j.add_argument("--jump-rate", type=float, default=3.0, help="Poisson jump intensity per unit time")
        j.add_argument("--jump-mean", type=float, default=-0.3, help="mean jump size")
        j.add_argument("--jump-std", type=float, default=0.5, help="jump size standard deviation")
        j.add_argument("--horizon", type=float, default=1.0, help="time at which the density is compared")
        m = p.add_argument_group("measurement")
        m.add_argument("--sweep", default=None,
                       help="comma-separated walker counts for the error-vs-walkers fit (default walkers/2^k, k=0..5)")
        m.add_argument("--repeats", type=int, default=3, help="seeds per sweep point")
        m.add_argument("--no-baseline", dest="baseline", action="store_false",
                       help="skip the conventional Monte Carlo run (speed ratio and two-sample test)")
        m.add_argument("--cpu-watts", type=float, default=15.0,
                       help="assumed CPU power for the energy of the measured CPU runs (an assumption)")
        r = p.add_argument_group("run directory")
        r.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
        r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        r.add_argument("--checkpoint-every", type=int, default=0,
                       help="save the walker state every this many steps (0 = every 60 s)")
        add_common(p, out="runs/walk", data=False)

    def run(a: argparse.Namespace) -> int:
        import torch

        from lowbit.neuro import MertonParams, WalkConfig, walk

        if a.workers:
            torch.set_num_threads(max(1, a.workers))
        cfg = WalkConfig(problem=a.problem, mesh=a.mesh, topology=a.topology, walkers=a.walkers, steps=a.steps,
                         prob_bits=a.prob_bits, seed=a.seed, device=a.device, matrix=a.matrix, start=a.start,
                         stay=a.stay, jump=MertonParams(a.sigma, a.jump_rate, a.jump_mean, a.jump_std, a.horizon),
                         sweep=_walker_list(a.sweep), repeats=a.repeats, baseline=a.baseline,
                         cpu_watts=a.cpu_watts, checkpoint_every=a.checkpoint_every)
        s = walk(cfg, a.out, resume=a.resume, overwrite=a.overwrite, quiet=a.quiet)
        err = ", ".join(f"{k} {v:.3g}" for k, v in s["spiking"]["errors"].items())
        speed = f"{s['spiking']['walker_updates_per_s'] / 1e6:.2f}M walker updates/s"
        if s.get("baseline"):
            speed += f" (conventional {s['baseline']['walker_updates_per_s'] / 1e6:.2f}M)"
        print(f"{s['problem']} {s['mesh']}: {err} vs {s['reference'].split(' (')[0]}; error ~ walkers^"
              f"{s['sweep']['slope']:.2f}; {speed}  -> {a.out}/report.html")
        return 0

    return add, run


def _walker_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    from lowbit.errors import LowbitError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise LowbitError(f"--sweep {text!r}: expected comma-separated walker counts, e.g. 1000,4000,16000") from None


COMMANDS = {
    "walk": (_walk, "neuromorphic random walks: diffusion, jump-diffusion, heat or any DTMC as spiking circuits",
             "Simulate Monte Carlo random walks the way TrueNorth/Loihi run them (Smith, Aimone et al., Nature "
             "Electronics 2022): a walker count per mesh node and integer stochastic probability neurons that route "
             "each walker spike. Checks the result against a reference that shares nothing with the simulation, "
             "runs the conventional vectorized Monte Carlo of the same chain, fits error against walkers and "
             "estimates neurons, spikes, synaptic events and energy. Writes config.yaml, metrics.jsonl, "
             "summary.json, checkpoint.pt, density.png, error_vs_walkers.png, report.md and report.html."),
}

__all__ = ["COMMANDS"]
