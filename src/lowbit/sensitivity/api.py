"""One entry point for every method, and ``lowbit sensitivity``: score a W4A4 run's layers into a run directory.

    table = sensitivity("runs/w4a4", "eagl", "runs/sens-eagl")     # writes sensitivity.json and report.md
    table = score_layers("hessian", model, data, tol=1e-2)         # in memory, any quantized model

Under ``torchrun`` ALPS spreads its candidates over the ranks; the other methods run on rank 0 and hand their
table to the rest. Rank 0 writes the run directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import distributed as dist
from lowbit.data import DataSplits, iterate
from lowbit.errors import LowbitError
from lowbit.io import load_checkpoint
from lowbit.metrics import DEFAULT as TOP1
from lowbit.metrics import Metric, get_metric, metric_name
from lowbit.quant import quant_layers
from lowbit.runs import RunDir
from lowbit.sensitivity.alps import REFERENCES, alps_fit_config, alps_scores, check_top1
from lowbit.sensitivity.candidates import Candidates, example_input
from lowbit.sensitivity.control import random_scores
from lowbit.sensitivity.eagl import eagl_scores
from lowbit.sensitivity.hessian import hessian_scores
from lowbit.sensitivity.jobs import fingerprint
from lowbit.sensitivity.table import SensitivityTable
from lowbit.train import build_model, checkpoint_path
from lowbit.train.checkpoint import resolve_loss, run_data
from lowbit.train.loop import check_batch

METHODS = ("eagl", "alps", "hessian", "random")
NEEDS_DATA = ("alps", "hessian")
# Per-method options and their defaults (ALPS fit fields left None take the LSQ 2-bit recipe's values).
OPTIONS: dict[str, dict[str, Any]] = {
    "eagl": {"variant": "h4"},
    "alps": {"epochs": 1.0, "examples_per_epoch": None, "lr": None, "batch_size": 128, "reference": "finetuned"},
    "hessian": {"tol": 1e-2, "max_iter": 100, "examples": 1024, "batch_size": 128},
    "random": {},
}

# Options that must be numbers > 0 (sizes, counts, tolerances): a 0 would divide by zero or never stop.
POSITIVE = ("epochs", "examples_per_epoch", "lr", "batch_size", "tol", "max_iter", "examples", "rse")
# Accepted but without a default entry, so tables and fingerprints made before they existed still match.
OPTIONAL: dict[str, tuple[str, ...]] = {"alps": ("amp",), "hessian": ("rse",)}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise LowbitError(f"unknown sensitivity method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def method_options(method: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The method's defaults updated by ``options`` (None values ignored); unknown keys are an error."""
    known = OPTIONS[check_method(method)]
    options = {k: v for k, v in (options or {}).items() if v is not None}
    takes = [*known, *OPTIONAL.get(method, ())]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise LowbitError(f"{method}: unknown option(s) {', '.join(unknown)}; it takes "
                          f"{', '.join(takes) or 'none'}")
    for key in POSITIVE:
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise LowbitError(f"{method}: option {key} must be a number > 0, got {value!r}")
    return {**known, **options}


def score_layers(method: str, model: nn.Module, data: DataSplits | None = None, *,
                 candidates: Candidates = None, include_first_last: bool = False, seed: int = 0,
                 workers: int = 1, out: str | Path | None = None, resume: bool = False, quiet: bool = True,
                 device: str = "cpu", example: torch.Tensor | None = None,
                 options: dict[str, Any] | None = None, metric: str | Metric = TOP1, loss: Any = None,
                 ) -> SensitivityTable:
    """Score the candidate layers of a quantized model with ``method`` (see :data:`OPTIONS` for ``options``).

    ``data`` is needed by ALPS (train + val) and the Hessian (val); ``example`` (a batch-1 input) gives the
    data-free methods their MACs. ``seed`` seeds the random scores, the Rademacher vectors and ALPS' fine-tunes.
    ``metric`` is what ALPS measures (:mod:`lowbit.metrics`); the other methods measure no task metric.
    ``loss`` (``"module:function"`` or a callable ``fn(outputs, batch)``; None = cross-entropy) is what ALPS
    fine-tunes on and whose Hessian the trace method estimates.
    """
    opts = method_options(method, options)
    if method in NEEDS_DATA and data is None:
        raise LowbitError(f"{method} needs data (train and validation splits)")
    get_metric(metric)
    if example is None and data is not None:
        example = example_input(data=data)
    common = dict(candidates=candidates, include_first_last=include_first_last)
    if method == "alps":
        if opts["reference"] not in REFERENCES:
            raise LowbitError(f"unknown ALPS reference {opts['reference']!r}; choose one of {', '.join(REFERENCES)}")
        fit = alps_fit_config(opts["epochs"], examples_per_epoch=opts["examples_per_epoch"], lr=opts["lr"],
                              batch_size=opts["batch_size"], seed=seed, device=device, amp=opts.get("amp"))
        return alps_scores(model, data, fit=fit, reference=opts["reference"], workers=workers, out=out,
                           resume=resume, quiet=quiet, metric=metric, loss=loss, **common)
    dist.init_from_env(device)
    table = None
    if dist.is_main():  # one rank computes, the others get its table
        if method == "eagl":
            table = eagl_scores(model, opts["variant"], example_input=example, **common)
        elif method == "random":
            table = random_scores(model, random_state=seed, example_input=example, **common)
        else:
            batches = list(iterate(data.val, opts["batch_size"], device=device, limit=opts["examples"]))
            table = hessian_scores(model, batches, tol=opts["tol"], max_iter=opts["max_iter"], random_state=seed,
                                   quiet=quiet, loss_fn=resolve_loss(loss), rse=opts.get("rse"), **common)
    return dist.broadcast_object(table)


def load_w4a4_run(run: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained W4A4 (or W4A8) model of a ``lowbit quantize --bits w4a4`` run and its checkpoint dict.

    Every quantized layer must be at 4/4, 4/8 or 8/8 bits (float layers are allowed and never candidates); a
    W4A8 encoder's 4-bit-weight layers are its candidates.
    """
    ckpt = load_checkpoint(checkpoint_path(run))
    if ckpt.get("kind") != "quantized":
        raise LowbitError(f"{run}: --from needs a W4A4-quantized run (from `lowbit quantize --bits w4a4`), "
                          f"found a {ckpt.get('kind')!r} checkpoint")
    model = build_model(ckpt)
    bits = {n: (m.w_bits, m.a_bits) for n, m in quant_layers(model).items()}
    odd = [f"{n} at w{w}a{a}" for n, (w, a) in bits.items() if (w, a) not in ((4, 4), (4, 8), (8, 8))]
    if odd or not any(w == 4 for w, _ in bits.values()):
        raise LowbitError(f"{run}: not a W4A4-quantized run ({', '.join(odd[:3]) or 'no 4-bit layer'}); "
                          "quantize it with `lowbit quantize --bits w4a4` first")
    return model, ckpt


def load_data(ckpt: dict[str, Any], data: DataSplits | str | None, data_dir: str | None = None,
              data_args: dict[str, Any] | None = None) -> DataSplits:
    """``data`` as given, by name or factory, or (None) the data the run was trained on (its factory, args and
    split); input shapes must match."""
    if not isinstance(data, DataSplits):
        data = run_data(ckpt.get("spec"), data, data_dir, data_args=data_args or None)
    shape = ckpt.get("spec", {}).get("input_shape")
    if shape and data.input_shape is not None and list(shape) != list(data.input_shape):
        raise LowbitError(f"the model expects inputs {tuple(shape)} but data set {data.name} gives "
                          f"{tuple(data.input_shape)}")
    return data


def sensitivity(run: str | Path, method: str, out: str | Path, *, data: DataSplits | str | None = None,
                data_dir: str | None = None, candidates: Candidates = None, include_first_last: bool = False,
                seed: int = 0, workers: int = 1, device: str = "cpu", resume: bool = False,
                overwrite: bool = False, quiet: bool = True, options: dict[str, Any] | None = None,
                metric: str | Metric = TOP1, loss: str | None = None,
                data_args: dict[str, Any] | None = None) -> SensitivityTable:
    """``lowbit sensitivity``: score the W4A4 run ``run`` with ``method``; write ``<out>/sensitivity.json``.

    Also writes ``config.yaml`` and ``report.md`` (the sorted table). ALPS keeps one file per finished
    candidate under ``<out>/alps/``; with ``resume`` those are reused. EAGL and random need no data.
    """
    check_method(method)
    opts = method_options(method, options)
    get_metric(metric)
    dist.init_from_env(device)
    model, ckpt = load_w4a4_run(run)
    loss = loss or ckpt.get("spec", {}).get("loss")
    resolve_loss(loss)  # a bad import path fails before any work
    splits = load_data(ckpt, data, data_dir, data_args) if method in NEEDS_DATA else None
    shape = ckpt.get("spec", {}).get("input_shape")
    example = example_input(shape) if shape else None
    if example is None:  # inputs other than one tensor (dicts): take the first validation example's
        splits = splits or load_data(ckpt, data, data_dir, data_args)
        example = example_input(data=splits)
    if method == "alps":
        check_top1(model, splits, metric)
    if method in NEEDS_DATA:
        check_batch(model, splits, resolve_loss(loss), device=device, amp=opts.get("amp"), what=f"the model of {run}")
    weights = fingerprint(model)  # the source run however its path is spelled
    run_dir = RunDir(out, resume=resume, overwrite=overwrite, command="sensitivity",
                     same={"method": method, "weights": weights})
    with run_dir.removed_on_error():
        if overwrite and not run_dir.resume and dist.is_main():
            shutil.rmtree(run_dir.file("alps"), ignore_errors=True)
        dist.barrier()  # the old candidate files are gone before any rank writes new ones
        run_dir.write_config({"command": "sensitivity", "source": str(run), "weights": weights, "method": method,
                              "options": opts, "candidates": candidates, "include_first_last": include_first_last,
                              "seed": seed,
                              "workers": workers, "device": device, "data": None if splits is None else splits.name,
                              "metric": metric_name(metric), "ranks": dist.world_size(),
                              **({"loss": loss} if loss else {})})
        table = score_layers(method, model.to(device), splits, candidates=candidates,
                             include_first_last=include_first_last, seed=seed, workers=workers, out=run_dir.path,
                             resume=run_dir.resume, quiet=quiet, device=device, example=example, options=opts,
                             metric=metric, loss=loss)
        table = SensitivityTable(table.method, table.rows, table.wall_seconds, table.passes,
                                 {**table.config, "source": str(run)})
        if dist.is_main():
            table.save(run_dir.file("sensitivity.json"))
        run_dir.write_report(f"# Sensitivity: {method}\n\nSource: `{run}`\n\n```\n{table.render()}\n```\n")
        return table


__all__ = ["METHODS", "OPTIONS", "load_w4a4_run", "score_layers", "sensitivity"]
