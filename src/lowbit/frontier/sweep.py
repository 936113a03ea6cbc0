"""``lowbit frontier``: the accuracy-throughput frontier of several layer-selection methods, commensurately.

For each method (EAGL, ALPS, Hessian, random) the W4A4 run's candidate layers are scored once; for each budget
the exact knapsack picks the layers to drop to 2 bits (:mod:`lowbit.frontier.select`); then every plan is
fine-tuned from the W4A4 checkpoint with the *same* recipe, epochs and seed, and evaluated on validation and
test. Only the choice of layers differs between methods (EAGL/ALPS' "commensurate comparison"). The uniform
W4A4 (no layer dropped) and W2A2 (every candidate dropped) end points are fine-tuned the same way.

A point's fine-tune: rebuild the W4A4 model from its checkpoint, set the chosen layers to 2/2 bits with
``reset_layer_`` (weight steps from the weights, input steps from 5 calibration batches run through the model,
in module order), build the optimizer, ``fit``. Identical plans (every method's plan at mac-fraction 1.0 is
W2A2) are fine-tuned once and shared, which is exact: same plan, recipe and seed give the same model.

Time to solution per method = its sensitivity wall time + the solver's time, reported apart from fine-tuning.
Resumable: each sensitivity table and each finished point is written at once under ``<out>/sensitivity/`` and
``<out>/points/<method>-<budget>.json``; ``resume`` reuses them and refuses files made with other settings.

``metric`` (:mod:`lowbit.metrics`) is what the points and ALPS measure; ``val_acc``/``test_acc`` stay top-1 and a
metric other than top1 adds ``val_metric``/``test_metric``, which the report and figure then show.

Under ``torchrun`` the distinct plans are spread over the ranks (plan i of those still to do on rank i % world),
each fine-tuned alone on its rank, so every point equals a one-process run's; ALPS spreads its candidates the
same way. Rank 0 writes the shared files (tables, end results, reports); each rank writes the points it ran.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from lowbit import distributed as dist
from lowbit.cost import HardwareProfile, LayerInfo, plan_cost, profile_layers
from lowbit.data import DataSplits, num_examples, to_device
from lowbit.errors import LowbitError
from lowbit.frontier.select import BUDGET_KINDS, parse_budgets, resolve_profile, select_layers
from lowbit.io import load_json, save_json
from lowbit.metrics import DEFAULT as TOP1
from lowbit.metrics import get_metric, measure
from lowbit.quant import Plan, plan_of
from lowbit.runs import RunDir
from lowbit.sensitivity.alps import check_top1
from lowbit.sensitivity.api import METHODS, load_data, load_w4a4_run, method_options, score_layers
from lowbit.sensitivity.candidates import candidate_layers, example_input
from lowbit.sensitivity.jobs import FinetuneJob, finetune_dropped, fingerprint, gather_results, my_share, run_jobs
from lowbit.sensitivity.table import SensitivityTable
from lowbit.train import FitConfig, evaluate, load_run_model, recipe_fit_config
from lowbit.train.checkpoint import resolve_loss
from lowbit.train.loop import check_batch

FRONTIER_VERSION = 1
LOW_BITS = 2
ENDPOINTS = ("uniform-w4a4", "uniform-w2a2")


@dataclass(frozen=True)
class FrontierConfig:
    """Settings of one frontier run.

    Args:
        methods: sensitivity methods to compare (``eagl``, ``alps``, ``hessian``, ``random``).
        budgets: mac-fractions in [0, 1] or relative throughputs > 0, by ``budget_kind``.
        cost: throughput model (``bits-proportional``, ``bops``, ``size``, ``measured`` + ``latency_table``).
        fit: the fine-tune of every point; None = the LSQ recipe at 2 bits for ``epochs`` with ``seed``.
        epochs: fine-tune epochs of the default recipe (fractions allowed).
        seed: seeds the random / Hessian / ALPS sensitivity and the default recipe's fine-tunes (a given
            ``fit`` keeps its own ``fit.seed``).
        workers: parallel processes for ALPS candidates and for frontier points.
        options: per-method sensitivity options, e.g. ``{"eagl": {"variant": "h4-h2"}, "alps": {"epochs": 0.5}}``.
        candidates, include_first_last: which layers may drop (default: all but first, last and 8-bit).
        clip_negative: floor scores at 0 for selection (see :mod:`lowbit.frontier.select`).
        endpoints: also fine-tune the uniform W4A4 and W2A2 plans.
        metric: what points and ALPS measure (:mod:`lowbit.metrics`: a registered name or "module:function").
        loss: what points and ALPS fine-tune on and the Hessian differentiates (``fn(outputs, batch)``).
    """

    methods: tuple[str, ...] = METHODS
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    budget_kind: str = "mac-fraction"
    cost: str = "bits-proportional"
    latency_table: str | None = None
    fit: FitConfig | None = None
    epochs: float = 1.0
    seed: int = 0
    workers: int = 1
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    candidates: tuple[str, ...] | None = None
    include_first_last: bool = False
    clip_negative: bool = True
    endpoints: bool = True
    device: str = "cpu"
    quiet: bool = True
    metric: str = TOP1
    loss: str | None = None  # "package.module:function"; None = the W4A4 run's loss (cross-entropy by default)

    def __post_init__(self):
        methods = self.methods.split(",") if isinstance(self.methods, str) else self.methods
        methods = tuple(dict.fromkeys(m.strip() for m in methods if m.strip()))
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise LowbitError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                              f"{', '.join(METHODS)}")
        if self.budget_kind not in BUDGET_KINDS:
            raise LowbitError(f"unknown budget kind {self.budget_kind!r}; choose one of {', '.join(BUDGET_KINDS)}")
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "budgets", parse_budgets(self.budgets, self.budget_kind))
        for m, opts in self.options.items():
            if m not in methods:
                raise LowbitError(f"options given for {m!r}, which is not among the methods {', '.join(methods)}")
            method_options(m, opts)
        if self.candidates is not None:
            object.__setattr__(self, "candidates", tuple(self.candidates))
        if not isinstance(self.metric, str):
            raise LowbitError("FrontierConfig.metric must be a name or 'package.module:function' (it is saved in "
                              "frontier.json); register a function with lowbit.metrics.register_metric")
        get_metric(self.metric)

    def resolved_fit(self) -> FitConfig:
        return self.fit or recipe_fit_config("lsq", LOW_BITS, epochs=self.epochs, seed=self.seed, device=self.device,
                                             quiet=True)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(fit=self.resolved_fit().to_dict(), methods=list(self.methods), budgets=list(self.budgets),
                 candidates=None if self.candidates is None else list(self.candidates))
        if d["loss"] is None:
            del d["loss"]
        return d


def _label(method: str, budget: float | None) -> str:
    return method if budget is None else f"{method}-{budget:g}"


def _reference_accuracy(model: nn.Module, data: DataSplits, fit: FitConfig, metric: str = TOP1, loss: Any = None,
                        ) -> dict[str, float]:
    out = {}
    for split in ("val", "test"):
        if getattr(data, split) is None:
            continue
        out[f"{split}_loss"], acc = evaluate(model, getattr(data, split), fit.eval_batch_size, fit.device,
                                             fit.channels_last, loss_fn=resolve_loss(loss))
        out[f"{split}_acc"] = None if acc != acc else acc
        if metric != TOP1:
            out[f"{split}_metric"] = measure(metric, model, getattr(data, split), batch_size=fit.eval_batch_size,
                                             device=fit.device)
    return out


def _fp32_reference(ckpt: dict[str, Any], data: DataSplits, fit: FitConfig, metric: str = TOP1, loss: Any = None,
                    ) -> dict[str, float] | None:
    """Accuracy of the fp32 run the W4A4 run came from, if its checkpoint is still there."""
    source = ckpt.get("source")
    if not source:
        return None
    try:
        fp32, fp_ckpt = load_run_model(source)
    except LowbitError:
        return None
    if fp_ckpt.get("kind") != "fp32":
        return None
    return {"run": str(source), **_reference_accuracy(fp32.to(fit.device), data, fit, metric, loss)}


def _table(method: str, cfg: FrontierConfig, model: nn.Module, data: DataSplits, names: list[str],
           folder: Path, resume: bool, key: str, given: SensitivityTable | None) -> SensitivityTable:
    """The method's table: given, resumed from ``<folder>/<method>.json``, or computed (and saved at once)."""
    path = folder / f"{method}.json"
    resumed = given is None and resume and path.exists()
    if given is not None:
        table = given
    elif resumed:
        table = SensitivityTable.load(path)
        if table.config.get("frontier_key") != key:
            raise LowbitError(f"{path}: computed with other settings or another model; resume with the same "
                              "options, or start over with --overwrite / another --out")
    else:
        table = score_layers(method, model, data, candidates=names, seed=cfg.seed, workers=cfg.workers,
                             out=folder, resume=resume, quiet=cfg.quiet, device=cfg.device,
                             options=cfg.options.get(method), metric=cfg.metric, loss=cfg.loss)
        table = dataclasses.replace(table, config={**table.config, "frontier_key": key})
    missing = sorted(set(names) - set(table.layers))
    extra = sorted(set(table.layers) - set(names))
    if missing or extra:
        raise LowbitError(f"the {method} table does not score this run's candidates "
                          f"(missing {missing[:3]}, unknown {extra[:3]})")
    if not resumed and dist.is_main():
        table.save(path)
    return table


class _Space(NamedTuple):
    """What the plans are made of: the model's layers, its W4A4 plan, the candidates and the cost profile."""

    layers: list[LayerInfo]
    base: dict[str, tuple[int, int]]
    names: list[str]
    profile: HardwareProfile


def frontier(run: str | Path, out: str | Path, config: FrontierConfig | None = None, *,
             data: DataSplits | str | None = None, data_dir: str | None = None, data_args: dict | None = None,
             tables: dict[str, SensitivityTable] | None = None, resume: bool = False,
             overwrite: bool = False) -> dict[str, Any]:
    """Build the frontier of the W4A4 run ``run`` into ``out`` (module docstring); returns frontier.json's dict.

    ``tables`` supplies precomputed sensitivity tables by method (e.g. from ``lowbit sensitivity``).
    Writes ``frontier.json``, ``frontier.csv``, ``frontier.png``, ``report.md`` and ``report.html``.
    """
    from lowbit.frontier.report import write_outputs

    cfg = config or FrontierConfig()
    tables = dict(tables or {})
    stray = [m for m in tables if m not in cfg.methods]
    if stray:
        raise LowbitError(f"sensitivity table(s) for {', '.join(stray)} given, but the methods are "
                          f"{', '.join(cfg.methods)}")
    dist.init_from_env(cfg.device)
    model, ckpt = load_w4a4_run(run)
    if cfg.loss is None and ckpt.get("spec", {}).get("loss"):  # the run's own loss unless one is given
        cfg = dataclasses.replace(cfg, loss=ckpt["spec"]["loss"])
    loss_fn = resolve_loss(cfg.loss)
    splits = load_data(ckpt, data, data_dir, data_args)
    check_batch(model, splits, loss_fn, device=cfg.device, amp=cfg.resolved_fit().amp,
                what=f"the model of {run}")
    space = _space(cfg, model, splits)
    check_top1(model, splits, cfg.metric)  # the points measure it too
    run_dir = RunDir(out, resume=resume, overwrite=overwrite, command="frontier")
    if overwrite and not run_dir.resume and dist.is_main():
        for sub in ("points", "sensitivity"):
            shutil.rmtree(run_dir.file(sub), ignore_errors=True)
    dist.barrier()  # old files are gone before any rank writes new ones
    run_dir.write_config({"command": "frontier", "source": str(run), **cfg.to_dict(), "data": splits.name})
    source_key = fingerprint(model)

    with run_dir.removed_on_error():
        result_tables = _sensitivity_tables(cfg, model, splits, space.names, run_dir, tables, source_key)
        points = _plan_points(cfg, space, result_tables)
        _finetune_points(points, cfg, model, ckpt, str(run), splits, run_dir, source_key)
    if not dist.is_main():  # rank 0 measures the references and writes the reports; everyone returns its payload
        return dist.broadcast_object(None)
    payload = _payload(cfg, model, ckpt, str(run), splits, space, result_tables, points)
    write_outputs(run_dir.path, payload)
    return dist.broadcast_object(payload)


def _space(cfg: FrontierConfig, model: nn.Module, splits: DataSplits) -> _Space:
    profile = resolve_profile(cfg.cost, cfg.latency_table)
    model.to(cfg.device)
    layers = profile_layers(model, to_device(example_input(data=splits), cfg.device))
    base = plan_of(model).layers
    names = candidate_layers(model, cfg.candidates, cfg.include_first_last)
    for b in cfg.budgets:  # an unreachable budget fails now, before any scoring or fine-tuning
        select_layers(layers, base, dict.fromkeys(names, 0.0), b, cfg.budget_kind, profile)
    return _Space(layers, base, names, profile)


def _sensitivity_tables(cfg: FrontierConfig, model: nn.Module, splits: DataSplits, names: list[str], run_dir: RunDir,
                        given: dict[str, SensitivityTable], source_key: str) -> dict[str, SensitivityTable]:
    """Step 1, the expensive part of ALPS and the Hessian: each method's table, saved as soon as it exists."""
    out = {}
    for method in cfg.methods:
        settings = {"method": method, "options": method_options(method, cfg.options.get(method)),
                    "seed": cfg.seed, "candidates": names, "model": source_key}
        if method == "alps" and cfg.metric != TOP1:
            settings["metric"] = cfg.metric
        out[method] = _table(method, cfg, model, splits, names, run_dir.file("sensitivity"), run_dir.resume,
                             fingerprint(settings), given.get(method))
    return out


def _plan_points(cfg: FrontierConfig, space: _Space, tables: dict[str, SensitivityTable]) -> list[dict[str, Any]]:
    """Step 2: the end points, then every (method, budget) through the solver."""
    layers, base, names, profile = space
    points: list[dict[str, Any]] = []

    def add_point(method: str, budget: float | None, plan: Plan, chosen: list[str], seconds: dict[str, float],
                  solver: str | None) -> None:
        cost = plan_cost(layers, plan.layers, profile, base, candidates=names, low_bits=LOW_BITS)
        points.append({"method": method, "budget": budget, "budget_kind": cfg.budget_kind,
                       "label": _label(method, budget), "plan": plan.to_dict()["layers"], "low_layers": chosen,
                       "n_low": len(chosen), **cost.to_dict(), "solver": solver, **seconds})

    if cfg.endpoints:
        add_point(ENDPOINTS[0], None, Plan(base), [], {}, None)
        add_point(ENDPOINTS[1], None, Plan({**base, **{n: (LOW_BITS, LOW_BITS) for n in names}}), list(names), {},
                  None)
    for method in cfg.methods:
        table = tables[method]
        for b in cfg.budgets:
            t0 = time.perf_counter()
            plan, _, selection = select_layers(layers, base, table.scores, b, cfg.budget_kind, profile,
                                               low_bits=LOW_BITS, clip_negative=cfg.clip_negative)
            solve_s = time.perf_counter() - t0
            add_point(method, b, plan, list(selection.chosen),
                      {"sensitivity_seconds": table.wall_seconds, "solve_seconds": solve_s,
                       "time_to_plan_seconds": table.wall_seconds + solve_s}, selection.solver)
    return points


def _finetune_points(points: list[dict[str, Any]], cfg: FrontierConfig, model: nn.Module, ckpt: dict[str, Any],
                     run: str, splits: DataSplits, run_dir: RunDir, source_key: str) -> None:
    """Step 3: fine-tune each distinct plan once; every point is saved (in place and to disk) as soon as it is done."""
    fit = cfg.resolved_fit()
    fit_settings = {"fit": fit.to_dict(), "model": source_key, "data": [splits.name, num_examples(splits.train)]}
    if cfg.metric != TOP1:
        fit_settings["metric"] = cfg.metric
    if cfg.loss is not None:
        fit_settings["loss"] = cfg.loss
    fit_key = fingerprint(fit_settings)
    folder = run_dir.file("points")
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for p in points:
        p["key"] = fingerprint({"fit": fit_key, "plan": p["plan"]})
        groups.setdefault(tuple(p["low_layers"]), []).append(p)
    results = _finished_points(groups, folder) if run_dir.resume else {}

    def save_point(p: dict[str, Any], trained: dict[str, Any], write: bool = True) -> None:
        source = trained["label"]
        p.update({k: v for k, v in trained.items() if k != "label"})
        p["reused_from"] = None if source == p["label"] else source
        if write:
            save_json(folder / f"{p['label']}.json", p)

    dist.barrier()  # every rank has read the finished points before any rank writes a new one
    todo = [low for low in groups if low not in results]
    teacher = _teacher(ckpt) if fit.distill else None
    job = FinetuneJob(model.cpu() if cfg.workers > 1 else model, splits, fit, LOW_BITS, test=True, metric=cfg.metric,
                      loss=cfg.loss, teacher=teacher)
    header = {"spec": ckpt["spec"], "quant_config": ckpt["quant_config"], "source": ckpt.get("source"),
              "w4a4_run": run}
    files = {low: str(folder / f"{members[0]['label']}.pt") for low, members in groups.items()}
    mine = {}
    for low, result in run_jobs(_point_job, (job, header, files), my_share(todo), workers=cfg.workers,
                                desc="frontier", quiet=cfg.quiet or not dist.is_main()):
        first = groups[low][0]
        keys = ("val_acc", "val_loss", "test_acc", "test_loss", "val_metric", "test_metric")
        mine[low] = {**{k: result[k] for k in keys if k in result}, "finetune_seconds": result["seconds"],
                     "finetune_passes": result["passes"], "label": first["label"],
                     "checkpoint": f"points/{first['label']}.pt"}
        for p in groups[low]:
            save_point(p, mine[low])  # at once, by the rank that fine-tuned it
    for low, trained in gather_results(mine).items():
        results[low] = trained
        for p in groups[low]:
            if low not in mine:
                save_point(p, trained, write=False)  # another rank ran and saved it
    for low, members in groups.items():
        for p in members:
            if "val_acc" not in p:
                save_point(p, results[low], write=dist.is_main())


def _finished_points(groups: dict[tuple[str, ...], list[dict[str, Any]]], folder: Path
                     ) -> dict[tuple[str, ...], dict[str, Any]]:
    """Points a resumed frontier finished earlier: their records (and timings) replace the new ones as they are."""
    results: dict[tuple[str, ...], dict[str, Any]] = {}
    for low, members in groups.items():
        for p in members:
            f = folder / f"{p['label']}.json"
            if not f.exists():
                continue
            record = load_json(f)
            if record.get("key") != p["key"]:
                raise LowbitError(f"{f}: finished with other settings or another plan; resume with the same "
                                  "options, or start over with --overwrite / another --out")
            p.clear()
            p.update(record)
            results.setdefault(low, {**_trained(record), "label": record.get("reused_from") or p["label"]})
    return results


def _payload(cfg: FrontierConfig, model: nn.Module, ckpt: dict[str, Any], run: str, splits: DataSplits,
             space: _Space, tables: dict[str, SensitivityTable], points: list[dict[str, Any]]) -> dict[str, Any]:
    """Step 4 (rank 0): references, rank correlations, time to solution: frontier.json's dict."""
    from lowbit.frontier.report import spearman_vs

    fit = cfg.resolved_fit()
    model.to(fit.device)
    references = {"fp32": _fp32_reference(ckpt, splits, fit, cfg.metric, cfg.loss),
                  "w4a4_checkpoint": _reference_accuracy(model, splits, fit, cfg.metric, cfg.loss)}
    infos = {li.name: li for li in space.layers}
    names = space.names
    total_macs = sum(infos[n].macs for n in names) or 1
    return {
        "version": FRONTIER_VERSION, "source": run, "data": splits.name, "metric": cfg.metric,
        "config": cfg.to_dict(),
        "profile": space.profile.name, "candidates": names,
        "layers": [{"layer": n, "macs": infos[n].macs, "params": infos[n].params,
                    "mac_share": infos[n].macs / total_macs} for n in names],
        "references": references,
        "methods": {m: tables[m].to_dict() for m in cfg.methods},
        "spearman_vs_alps": spearman_vs(tables, "alps"),
        "time_to_solution": _time_to_solution(tables, points),
        "points": points,
    }


def _teacher(ckpt: dict[str, Any]) -> nn.Module:
    """The fp32 model the W4A4 run came from: the teacher of LSQ+KD fine-tunes."""
    source = ckpt.get("source")
    if not source:
        raise LowbitError("distillation needs the fp32 run the W4A4 run came from; its checkpoint names none")
    fp32, fp_ckpt = load_run_model(source)
    if fp_ckpt.get("kind") != "fp32":
        raise LowbitError(f"{source}: the W4A4 run's source is not an fp32 run; cannot distil from it")
    return fp32.eval()


def _point_job(shared: tuple[FinetuneJob, dict[str, Any], dict[tuple[str, ...], str]], low: tuple[str, ...]
               ) -> dict[str, Any]:
    """One frontier point (module level so spawned workers can run it): fine-tune, evaluate, keep the model."""
    job, header, files = shared
    return finetune_dropped(job, list(low), save={"path": files[low], "header": header})


def _trained(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("val_acc", "val_loss", "test_acc", "test_loss", "finetune_seconds", "finetune_passes")
    optional = ("val_metric", "test_metric", "checkpoint")
    return {**{k: record.get(k) for k in keys}, **{k: record[k] for k in optional if k in record}}


def point_checkpoint(out: str | Path, point: str | None = None, *, best: bool = False,
                     min_throughput: float | None = None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint of one fine-tuned frontier point, and its record: the model that was measured.

    ``point`` is a label (``eagl-0.5``, ``uniform-w4a4``) or ``method@budget`` (``eagl@0.5``). ``best`` takes
    the point with the highest validation accuracy (or metric) among those with a relative throughput of at
    least ``min_throughput``; the test split never chooses.
    """
    points = load_points(out)
    if not points:
        raise LowbitError(f"{out}: no finished frontier points (is it a `lowbit frontier` run directory?)")
    if (point is None) == (not best):
        raise LowbitError("choose one frontier point: --point METHOD@BUDGET (or its label), or --best")
    if best:
        floor = -math.inf if min_throughput is None else min_throughput - 1e-9
        fits = [p for p in points if p["relative_throughput"] >= floor]
        if not fits:
            top = max(p["relative_throughput"] for p in points)
            raise LowbitError(f"no frontier point reaches a relative throughput of {min_throughput:g} (the "
                              f"fastest reaches {top:.3f})")
        key = "val_metric" if all(p.get("val_metric") is not None for p in fits) else "val_acc"
        chosen = max(fits, key=lambda p: (p.get(key) if p.get(key) is not None else -math.inf,
                                          p["relative_throughput"]))
    else:
        label = point.replace("@", "-") if "@" in point else point
        if "@" in point:
            method, _, budget = point.partition("@")
            try:
                label = _label(method, float(budget))
            except ValueError:
                raise LowbitError(f"--point {point!r}: expected METHOD@BUDGET, e.g. eagl@0.5") from None
        chosen = next((p for p in points if p["label"] == label), None)
        if chosen is None:
            raise LowbitError(f"{out}: no frontier point {point!r}; points: "
                              f"{', '.join(p['label'] for p in points)}")
    if not chosen.get("checkpoint"):
        raise LowbitError(f"{out}: point {chosen['label']} kept no checkpoint (made by an older lowbit); rerun the "
                          "frontier with --overwrite to keep every point's fine-tuned model")
    path = Path(out) / chosen["checkpoint"]
    if not path.is_file():
        raise LowbitError(f"{path}: the checkpoint of point {chosen['label']} is missing")
    return path, chosen


def _time_to_solution(tables: dict[str, SensitivityTable], points: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for m, t in tables.items():
        mine = [p for p in points if p["method"] == m]
        solve = [p["solve_seconds"] for p in mine]
        fine = [p["finetune_seconds"] for p in mine if not p.get("reused_from")]
        out[m] = {"sensitivity_seconds": t.wall_seconds,
                  "compute_seconds": t.config.get("compute_seconds", t.wall_seconds),
                  "passes": t.passes, "solve_seconds_mean": sum(solve) / len(solve) if solve else 0.0,
                  "time_to_plan_seconds": t.wall_seconds + (sum(solve) / len(solve) if solve else 0.0),
                  "finetune_seconds": sum(fine)}
    return out


def load_points(out: str | Path) -> list[dict[str, Any]]:
    """Every finished point of a (possibly still running) frontier run directory."""
    return [load_json(p) for p in sorted(Path(out, "points").glob("*.json"))]


__all__ = ["ENDPOINTS", "FrontierConfig", "frontier", "load_points", "point_checkpoint"]
