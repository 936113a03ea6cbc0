"""``WalkConfig``: every choice of a ``lowbit walk`` run, checked before anything is written."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lowbit.errors import LowbitError
from lowbit.neuro.chain import TOPOLOGIES, load_matrix
from lowbit.neuro.circuit import MAX_PROB_BITS
from lowbit.neuro.problems import PROBLEMS, MertonParams, Problem, diffusion, dtmc, heat, jump_diffusion, parse_mesh

CONFIG_VERSION = 1
DEFAULT_MESH = {"diffusion": (64, 64), "jump-diffusion": (256,), "heat": (32, 32)}
DEFAULT_STEPS = {"diffusion": 200, "jump-diffusion": 200, "heat": 0, "dtmc": 200}


@dataclass(frozen=True)
class WalkConfig:
    """One walk run. ``None`` fields take the problem's default and are resolved on construction.

    Args:
        problem: ``diffusion``, ``jump-diffusion``, ``heat`` or ``dtmc``.
        mesh: nodes per axis, e.g. ``(64, 64)`` or ``"64x64"`` (``dtmc``: from the matrix).
        topology: ``line``, ``grid`` or ``torus`` (diffusion only; default line for 1-D, grid for 2-D).
        walkers: walkers released at step 0.
        steps: DTMC steps; for ``heat`` a cap, ``0`` = ``4 * max(mesh)**2`` (runs end once all are absorbed).
        prob_bits: resolution of the probability neurons' integer weights (transition probabilities in units of
            ``2**-prob_bits``).
        seed: seeds the circuit's thresholds (and the baseline's generator).
        device: ``cpu`` or ``cuda``.
        matrix: ``.npz`` / ``.safetensors`` transition matrix (``dtmc`` only).
        start: start node (diffusion, dtmc; default the mesh centre, node 0 for dtmc).
        stay: probability of staying put in a diffusion or jump-diffusion step.
        jump: the Merton parameters (jump-diffusion only).
        sweep: walker counts of the error-vs-walkers fit; ``None`` = ``walkers / 2**k`` for k = 0..5.
        repeats: seeds per sweep point.
        baseline: also run the conventional Monte Carlo (speed ratio and two-sample test).
        cpu_watts: assumed CPU power for the energy of the measured CPU runs.
        checkpoint_every: save the walker state every this many steps (``0`` = every 60 s of run time).
    """

    problem: str = "diffusion"
    mesh: tuple[int, ...] | None = None
    topology: str | None = None
    walkers: int = 32000
    steps: int | None = None
    prob_bits: int = 16
    seed: int = 0
    device: str = "cpu"
    matrix: str | None = None
    start: int | None = None
    stay: float = 0.5
    jump: MertonParams = field(default_factory=MertonParams)
    sweep: tuple[int, ...] | None = None
    repeats: int = 3
    baseline: bool = True
    cpu_watts: float = 15.0
    checkpoint_every: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if self.problem not in PROBLEMS:
            raise LowbitError(f"problem {self.problem!r}: expected one of {', '.join(PROBLEMS)}")
        _positive_int("walkers", self.walkers)
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise LowbitError(f"steps must be a positive integer (or 0 for heat: until every walker is "
                              f"absorbed), got {self.steps!r}")
        if self.steps == 0 and self.problem != "heat":
            raise LowbitError(f"steps 0 is only meaningful for heat; {self.problem} needs steps >= 1")
        if not isinstance(self.prob_bits, int) or not 1 <= self.prob_bits <= MAX_PROB_BITS:
            raise LowbitError(f"prob_bits must be an integer in [1, {MAX_PROB_BITS}], got {self.prob_bits!r}")
        if self.problem == "dtmc":
            if not self.matrix:
                raise LowbitError("problem dtmc needs a transition matrix: pass --matrix FILE (.npz or .safetensors)")
            if self.mesh is not None:
                raise LowbitError("problem dtmc takes its size from --matrix; drop --mesh")
        elif self.matrix:
            raise LowbitError(f"--matrix is for problem dtmc; problem {self.problem} builds its own chain")
        if self.topology is not None:
            if self.topology not in TOPOLOGIES:
                raise LowbitError(f"topology {self.topology!r}: expected one of {', '.join(TOPOLOGIES)}")
            if self.problem != "diffusion":
                raise LowbitError(f"--topology is for problem diffusion; {self.problem} has a fixed mesh kind")
        if self.start is not None and self.problem not in ("diffusion", "dtmc"):
            raise LowbitError(f"--start is for problems diffusion and dtmc; {self.problem} fixes where walkers start")
        if not isinstance(self.jump, MertonParams):
            object.__setattr__(self, "jump", MertonParams(**dict(self.jump)))
        if self.sweep is not None:
            object.__setattr__(self, "sweep", tuple(_positive_int("sweep walkers", int(w)) for w in self.sweep))
        _positive_int("repeats", self.repeats)
        if self.checkpoint_every < 0:
            raise LowbitError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not self.cpu_watts > 0:
            raise LowbitError(f"cpu_watts must be > 0, got {self.cpu_watts}")
        if self.device not in ("cpu", "cuda"):
            raise LowbitError(f"device {self.device!r}: expected cpu or cuda")
        if self.problem != "dtmc":
            object.__setattr__(self, "mesh", parse_mesh(self.mesh or DEFAULT_MESH[self.problem]))
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.problem])

    @property
    def sweep_walkers(self) -> tuple[int, ...]:
        return self.sweep or tuple(sorted({max(1, self.walkers >> k) for k in range(6)}))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mesh"] = "x".join(map(str, self.mesh)) if self.mesh else None
        d["sweep"] = list(self.sweep) if self.sweep else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WalkConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LowbitError(f"unknown walk option(s): {', '.join(unknown)}")
        return cls(**d)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LowbitError(f"{name} must be a positive integer, got {value!r}")
    return value


def build_problem(config: WalkConfig) -> Problem:
    """The :class:`Problem` a config describes (loads and validates the matrix for ``dtmc``)."""
    if config.problem == "diffusion":
        return diffusion(config.mesh, config.topology, steps=config.steps, stay=config.stay, start=config.start)
    if config.problem == "jump-diffusion":
        return jump_diffusion(config.mesh, steps=config.steps, params=config.jump, stay=config.stay)
    if config.problem == "heat":
        return heat(config.mesh, steps=config.steps)
    return dtmc(load_matrix(config.matrix), steps=config.steps, start=config.start or 0)
