"""ALPS: Accuracy-aware Layer Precision Selection (Bablani et al., arXiv 2301.13330).

Verified: ALPS "relies on single epoch fine-tuning after layer precision reduction". Reconstructed
(methods.md §1.2 step 1b [I]): for each candidate l, copy the W4A4 network, drop layer l's weights *and* input
activations to 2 bits (steps re-initialised by the quantizer's init rule, input step from calibration batches),
fine-tune the whole network for one epoch (or ``epochs`` / ``examples_per_epoch`` of one) with the LSQ recipe at
2 bits, and measure validation accuracy a_l (never test). The score is the accuracy drop

    Δ_l = a_ref - a_l      (higher = more sensitive = keep at 4 bits)

with the reference a_ref chosen by ``reference``:

* ``"finetuned"`` (default): the W4A4 network fine-tuned with the *same* recipe, budget and seed, no layer
  dropped: one extra job. Fine-tuning alone moves accuracy, so this isolates the effect of the drop.
* ``"checkpoint"``: the W4A4 checkpoint's validation accuracy as it is (no extra job).

Every candidate is an independent job: ``workers > 1`` runs them in spawned processes. With ``out`` each
finished job is written at once, atomically, to ``<out>/alps/<layer>.json`` (the reference to
``_reference.json``); ``resume=True`` loads those files and never redoes a finished job. Files made with other
settings or another model are refused, not mixed in.

``metric`` replaces validation accuracy by any task metric (:mod:`lowbit.metrics`, higher is better); the
score is then the metric's drop. Under ``torchrun`` each rank fine-tunes its share of the candidates alone
(candidate i of those still to do on rank i % world), writes each file as it finishes, and after a barrier
every rank builds the same table; the scores equal a one-process run's exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import distributed as dist
from lowbit.data import DataSplits, logits_of, num_examples
from lowbit.errors import LowbitError
from lowbit.io import load_json, save_json
from lowbit.metrics import DEFAULT as TOP1
from lowbit.metrics import Metric, get_metric, measure, metric_name
from lowbit.sensitivity.candidates import Candidates, candidate_layers, example_input, make_rows, profile
from lowbit.sensitivity.jobs import FinetuneJob, finetune_dropped, fingerprint, gather_results, my_share, run_jobs
from lowbit.sensitivity.table import SensitivityTable, add_passes, no_passes
from lowbit.train import FitConfig, evaluate, recipe_fit_config
from lowbit.train.checkpoint import loss_name, resolve_loss

REFERENCES = ("finetuned", "checkpoint")
REFERENCE_FILE = "_reference"


def alps_fit_config(epochs: float = 1.0, *, low_bits: int = 2, **overrides: Any) -> FitConfig:
    """The default ALPS fine-tune: the LSQ recipe at ``low_bits`` (lr, decay, cosine) for ``epochs``, quiet.

    ``overrides`` are FitConfig fields, e.g. ``lr=0.005``, ``examples_per_epoch=10000``, ``seed=1``;
    None values are ignored.
    """
    return recipe_fit_config("lsq", low_bits, epochs=epochs, **{"quiet": True, **overrides})


def check_top1(model: nn.Module, data: DataSplits, metric: str | Metric) -> None:
    """Top-1 needs class labels: on other targets (regression, embeddings) ask for a metric before any work."""
    if metric_name(metric) != TOP1:
        return
    from lowbit.data import call_model, head, iterate, split_batch, to_device
    from lowbit.train.loop import _is_classification

    inputs, target = split_batch(next(iter(iterate(data.val, 2, limit=2, device=None))))
    param = next(model.parameters())
    was = model.training
    model.eval()
    with torch.no_grad():
        out = logits_of(call_model(model, to_device(head(inputs, 2), param.device)))
    model.train(was)
    if not _is_classification(out, target):
        raise LowbitError("top-1 accuracy needs class labels, which these targets are not; pass a metric (higher "
                          "is better): --metric package.module:function, or metric= in the API")


def _job(shared: tuple[FinetuneJob, Path | None, str], name: str | None) -> dict[str, Any]:
    """One ALPS job (module level so spawned workers can run it); writes its result file when it ends."""
    job, folder, key = shared
    result = finetune_dropped(job, [] if name is None else [name])
    record = {"layer": name, **result, "key": key}
    if folder is not None:
        save_json(folder / f"{name or REFERENCE_FILE}.json", record)
    return record


def _load_finished(folder: Path, names: list[str | None], key: str) -> dict[str | None, dict[str, Any]]:
    done = {}
    for name in names:
        p = folder / f"{name or REFERENCE_FILE}.json"
        if p.exists():
            record = load_json(p)
            if record.get("key") != key:
                raise LowbitError(f"{p}: finished with other settings or another model; resume with the same "
                                  "options, or start over with --overwrite / another --out")
            done[name] = record
    return done


def alps_scores(model: nn.Module, data: DataSplits, candidates: Candidates = None, *,
                fit: FitConfig | None = None, reference: str = "finetuned", low_bits: int = 2,
                include_first_last: bool = False, workers: int = 1, out: str | Path | None = None,
                resume: bool = False, quiet: bool = True, metric: str | Metric = TOP1, loss: Any = None,
                ) -> SensitivityTable:
    """Measured accuracy (or ``metric``) drops of the candidate layers; higher = keep at 4 bits (module docstring).

    Args:
        model: the trained W4A4 model (left unchanged; every job works on a copy).
        data: its data; jobs fine-tune on ``data.train`` and measure on ``data.val``.
        candidates: layer names; default: all quantized layers but the first, last and 8-bit ones.
        fit: the fine-tune recipe for every job (default :func:`alps_fit_config`: LSQ at 2 bits, 1 epoch).
        reference: ``"finetuned"`` (default, one extra job) or ``"checkpoint"``.
        workers: parallel processes (one torch thread each); <= 1 runs in this process (or on this rank).
        out: folder for the per-job files ``<out>/alps/<layer>.json``; None keeps results in memory.
        resume: load finished job files from ``out`` instead of recomputing them.
        metric: what is measured on validation (:mod:`lowbit.metrics`); default top-1 accuracy.
        loss: the fine-tunes' loss, ``"module:function"`` or a callable ``fn(outputs, batch)``; None =
            cross-entropy.
    """
    if reference not in REFERENCES:
        raise LowbitError(f"unknown ALPS reference {reference!r}; choose one of {', '.join(REFERENCES)}")
    get_metric(metric)  # an unknown metric fails before any fine-tune
    check_top1(model, data, metric)
    name = metric_name(metric)
    t0 = time.perf_counter()
    fit = fit or alps_fit_config(low_bits=low_bits)
    dist.init_from_env(fit.device)
    names = candidate_layers(model, candidates, include_first_last)
    if REFERENCE_FILE in names:
        raise LowbitError(f"a layer named {REFERENCE_FILE!r} clashes with the ALPS reference file")
    folder = None if out is None else Path(out) / "alps"
    settings = {"fit": fit.to_dict(), "low_bits": low_bits, "model": fingerprint(model),
                "data": [data.name, num_examples(data.train), num_examples(data.val)]}
    if name != TOP1:  # top-1 keeps the keys of files written before metrics existed
        settings["metric"] = name
    if loss is not None:
        settings["loss"] = loss_name(loss)
    key = fingerprint(settings)
    jobs: list[str | None] = list(names) + ([None] if reference == "finetuned" else [])
    done = _load_finished(folder, jobs, key) if resume and folder is not None and dist.is_main() else {}
    done = dist.broadcast_object(done)  # rank 0 read the files: every rank agrees on what is left
    todo = [j for j in jobs if j not in done]
    job = FinetuneJob(model, data, fit, low_bits, metric=metric, loss=loss)
    mine = {}
    for job_name, record in run_jobs(_job, (job, folder, key), my_share(todo), workers=workers, desc="ALPS",
                                     quiet=quiet or not dist.is_main()):
        mine[job_name] = record
    done.update(gather_results(mine))

    value = "val_acc" if name == TOP1 else "val_metric"
    passes = add_passes(*(r["passes"] for r in done.values()))
    if reference == "finetuned":
        ref = done[None][value]
    else:
        param = next(model.parameters())
        if name == TOP1:
            _, ref = evaluate(model, data.val, fit.eval_batch_size, str(param.device), fit.channels_last,
                              loss_fn=resolve_loss(loss))
        else:
            ref = measure(metric, model, data.val, batch_size=fit.eval_batch_size, device=str(param.device))
        passes = add_passes(passes, {"forward": -(-num_examples(data.val) // fit.eval_batch_size)})
    scores = {n: ref - done[n][value] for n in names}
    extra = {n: {"val_acc": done[n]["val_acc"], **({} if name == TOP1 else {"val_metric": done[n][value]}),
                 "seconds": done[n]["seconds"]} for n in names}
    rows = make_rows(model, names, scores, profile(model, example_input(data=data)), extra)
    config = {"reference": reference, f"reference_{value}": ref, "low_bits": low_bits, "fit": fit.to_dict(),
              "workers": workers, "include_first_last": include_first_last, "resumed": len(jobs) - len(todo),
              "compute_seconds": sum(r["seconds"] for r in done.values()), "key": key}
    if name != TOP1:
        config["metric"] = name
    if dist.world_size() > 1:
        config["ranks"] = dist.world_size()
    return SensitivityTable("alps", rows, time.perf_counter() - t0, {**no_passes(), **passes}, config)


__all__ = ["REFERENCES", "alps_fit_config", "alps_scores"]
