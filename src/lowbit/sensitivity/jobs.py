"""Independent fine-tuning jobs (ALPS candidates, frontier points): run them in parallel, count their passes,
and fingerprint what they depend on so a resumed run never mixes results of different settings.

Parallel jobs run in ``torch.multiprocessing`` *spawn* processes (fork is unsafe once torch has started
threads) with one torch thread each: ``workers`` processes × N threads would oversubscribe the cores.
``workers <= 1`` runs the jobs one after the other in this process.

Under ``torchrun`` the jobs are spread over the ranks (:func:`my_share`, job i to rank i % world) and every rank
then gets all results (:func:`gather_results`). A job never depends on the rank it runs on, so the results
equal a one-process run's exactly (same seed, same thread count).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit import distributed as dist
from lowbit.data import DataSplits, batch_len, num_examples
from lowbit.errors import LowbitError
from lowbit.metrics import DEFAULT as TOP1
from lowbit.metrics import measure, metric_name
from lowbit.progress import progress
from lowbit.quant import quant_layers, reset_layer_
from lowbit.train import FitConfig, calibration_batches, evaluate, fit, make_optimizer
from lowbit.train.checkpoint import resolve_loss

_WORKER: dict[str, Any] = {}


def _init_worker(fn: Callable, shared: Any) -> None:
    torch.set_num_threads(1)
    _WORKER["fn"], _WORKER["shared"] = fn, shared


def _run_one(job: Any) -> tuple[Any, Any]:
    return job, _WORKER["fn"](_WORKER["shared"], job)


def run_jobs(fn: Callable[[Any, Any], Any], shared: Any, jobs: Sequence[Any], *, workers: int = 1,
             desc: str = "jobs", quiet: bool = True) -> Iterator[tuple[Any, Any]]:
    """Yield ``(job, fn(shared, job))`` as each job finishes (in completion order when parallel).

    ``fn`` must be a module-level function and ``shared`` picklable: both go to every worker once. As with
    any spawn start, a calling script needs the ``if __name__ == "__main__":`` guard.
    A worker's exception (e.g. a LowbitError) is raised here; the pool is then shut down.
    """
    jobs = list(jobs)
    bar = progress(total=len(jobs), desc=desc, quiet=quiet, unit="job")
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield job, fn(shared, job)
                bar.update()
            return
        ctx = torch.multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(fn, shared)) as pool:
            for job, result in pool.imap_unordered(_run_one, jobs):
                yield job, result
                bar.update()
    finally:
        bar.close()


def my_share(jobs: Sequence[Any]) -> list[Any]:
    """This rank's jobs: job i goes to rank i % world (all of them in a plain process)."""
    return list(jobs)[dist.rank()::dist.world_size()]


def gather_results(results: dict[Any, Any]) -> dict[Any, Any]:
    """Every rank's ``{job: result}`` merged, on every rank (waits for the slowest rank)."""
    merged: dict[Any, Any] = {}
    for part in dist.all_gather_object(results):
        merged.update(part)
    return merged


class PassCounter:
    """Counts mini-batch passes through ``model`` while active: every forward, and as backward passes the
    forwards in training mode (``fit`` follows each with one backward); epochs = training examples / ``n_train``.
    """

    def __init__(self, model: nn.Module, n_train: int):
        self.model, self.n_train = model, max(1, n_train)
        self.forward = self.backward = self.train_examples = 0
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.forward += 1
        if module.training:
            self.backward += 1
            self.train_examples += batch_len((args, kwargs)) if args or kwargs else 0

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def as_dict(self) -> dict[str, float]:
        return {"forward": self.forward, "backward": self.backward, "hvp": 0,
                "epochs": self.train_examples / self.n_train}


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (settings) or of a model's state dict (weights)."""
    h = hashlib.sha256()
    if isinstance(obj, nn.Module):
        for name, t in obj.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def drop_layers_(model: nn.Module, names: Sequence[str], bits: int, batches: list) -> nn.Module:
    """Set ``names`` to ``bits``/``bits`` (weights and inputs) and re-initialise their steps, in module order.

    Input steps come from ``batches`` run through the model as it stands, so the order matters; module order
    makes the same set always give the same model. Build the optimizer afterwards (new step Parameters).
    """
    wanted = set(names)
    for name, layer in quant_layers(model).items():
        if name in wanted:
            reset_layer_(layer, bits, bits, batches=batches, model=model)
    return model


def _calibration(model: nn.Module, data: DataSplits, cfg: FitConfig) -> list:
    """Batches that initialise the dropped layers' input steps: LSQ reads only the first training batch
    (LSQ §2.1), FAQ and MinMax the five of ``calibration_batches``."""
    lsq = all(m.method == "lsq" for m in quant_layers(model).values())
    return calibration_batches(data, cfg.batch_size, n_batches=1 if lsq else 5, device=cfg.device)


@dataclass(frozen=True)
class FinetuneJob:
    """What every fine-tuning job shares: the starting model, the data and the recipe."""

    model: nn.Module
    data: DataSplits
    fit: FitConfig
    low_bits: int = 2
    test: bool = False  # also evaluate the test split (frontier points; never for ALPS)
    metric: Any = TOP1  # a name, "module:function" or callable (lowbit.metrics); top1 = accuracy only
    loss: Any = None  # "module:function" (resolved in the worker) or a callable; None = cross-entropy
    teacher: nn.Module | None = None  # the fp32 model, when ``fit.distill`` (LSQ+KD fine-tunes)


def finetune_dropped(shared: FinetuneJob, names: Sequence[str], save: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Copy the model, drop ``names`` to low bits, fine-tune with the shared recipe, evaluate.

    Returns val (and test) loss/accuracy, seconds and passes, and with a task metric other than top1 also
    ``metric`` and ``val_metric`` (``test_metric``). Seeds are reset first so the same job gives the same
    result in any process, rank and order; under torchrun the job trains alone on its rank.
    ``save={"path": ..., "header": {...}}`` writes the fine-tuned model as a quantized-run checkpoint (the
    header adds ``spec``, ``quant_config`` and ``source``), so the model that was measured can be exported.
    """
    t0 = time.perf_counter()
    cfg = shared.fit
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(shared.model).to(cfg.device)
    loss_fn = resolve_loss(shared.loss)
    test = shared.test and shared.data.test is not None
    with PassCounter(model, num_examples(shared.data.train)) as counter:
        if names:
            drop_layers_(model, names, shared.low_bits, _calibration(model, shared.data, cfg))
        optimizer = make_optimizer(model, cfg)
        if cfg.epochs > 0:
            if cfg.distill and shared.teacher is None:
                raise LowbitError("distillation was asked for, but the job has no fp32 teacher")
            state = fit(model, shared.data, cfg, optimizer=optimizer, desc="fine-tune", data_parallel=False,
                        loss_fn=loss_fn, teacher=copy.deepcopy(shared.teacher) if cfg.distill else None)
            val_loss, val_acc = state.rows[-1]["val_loss"], state.rows[-1]["val_acc"]
        else:
            val_loss, val_acc = evaluate(model, shared.data.val, cfg.eval_batch_size, cfg.device, cfg.channels_last,
                                         loss_fn=loss_fn)
        out = {"val_acc": _acc(val_acc), "val_loss": val_loss}
        if test:
            out["test_loss"], acc = evaluate(model, shared.data.test, cfg.eval_batch_size, cfg.device,
                                             cfg.channels_last, loss_fn=loss_fn)
            out["test_acc"] = _acc(acc)
        name = metric_name(shared.metric)
        if name != TOP1:
            out["metric"] = name
            for split in ("val", "test") if test else ("val",):
                out[f"{split}_metric"] = measure(shared.metric, model, getattr(shared.data, split),
                                                 batch_size=cfg.eval_batch_size, device=cfg.device)
    if save is not None:
        from lowbit.io import save_checkpoint
        from lowbit.quant import plan_of

        save_checkpoint(save["path"], {"kind": "quantized", **save["header"], "plan": plan_of(model).to_dict(),
                                       "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                                       "epoch": math.ceil(cfg.epochs), "fit": cfg.to_dict(), "measured": out})
    return {**out, "seconds": time.perf_counter() - t0, "passes": counter.as_dict()}


def _acc(acc: float | None) -> float | None:
    return None if acc is None or acc != acc else acc


__all__ = ["FinetuneJob", "PassCounter", "drop_layers_", "fingerprint", "finetune_dropped", "gather_results",
           "my_share", "run_jobs"]
