"""``lowbit train``: fp32 training of a registry model into a run directory.

``weights`` starts from a local file (e.g. torchvision's ImageNet weights saved as safetensors) instead of
random init; with ``epochs=0`` that gives an fp32 run directory around pretrained weights, the starting point
``lowbit quantize --from`` needs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lowbit import distributed as dist
from lowbit.data import get_data
from lowbit.errors import LowbitError
from lowbit.io import load_checkpoint, save_checkpoint
from lowbit.metrics import get_metric
from lowbit.models import create_model, load_weights_
from lowbit.models.registry import check_model_name
from lowbit.plugins import is_import_path
from lowbit.runs import RunDir, plot_curves
from lowbit.train.checkpoint import CHECKPOINT_NAME, loss_name, model_spec, resolve_loss
from lowbit.train.loop import FitConfig, FitState, check_batch, check_same_recipe, evaluate, fit, make_optimizer


@dataclass(frozen=True)
class TrainConfig:
    """``model`` and ``data`` are lowbit names or the user's ``package.module:factory`` (called with
    ``model_args`` / ``data_args``); ``loss`` is ``package.module:fn`` with ``fn(outputs, batch) -> scalar``
    (default cross-entropy) and ``metric`` a :mod:`lowbit.metrics` name or path, reported per epoch."""

    model: str = "resnet8"
    width: float | None = None
    data: str = "fashion-mnist"
    data_dir: str | None = None
    out: str = "runs/train"
    fit: FitConfig = field(default_factory=FitConfig)
    workers: int = 0  # torch threads; also DataLoader worker processes for ImageFolder data
    weights: str | None = None  # local safetensors / state-dict file to start from (never downloaded)
    val_fraction: float | None = None  # None: the data set's default split
    image_size: int | None = None  # ImageFolder only; None: 224
    model_args: dict[str, Any] | None = None
    data_args: dict[str, Any] | None = None
    loss: str | None = None
    metric: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("model_args", "data_args", "loss", "metric"):  # recorded when used
            if d[key] is None:
                del d[key]
        return d


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, data=None) -> dict[str, Any]:
    """Train from scratch (or resume) and return the summary that is also written to ``summary.json``."""
    if cfg.workers < 0:
        raise LowbitError(f"workers must be >= 0 (0: torch's default threads), got {cfg.workers}")
    dist.init_from_env(cfg.fit.device)
    data = data or get_data(cfg.data, cfg.data_dir, val_fraction=cfg.val_fraction, image_size=cfg.image_size,
                            workers=cfg.workers, data_args=cfg.data_args)
    loss_fn = resolve_loss(cfg.loss)
    if cfg.metric is not None:
        get_metric(cfg.metric)  # a bad import path fails before anything is written
    if cfg.workers:
        torch.set_num_threads(cfg.workers)
    seed_everything(cfg.fit.seed)
    kwargs = model_kwargs(cfg, data)
    model = create_model(cfg.model, data.num_classes, **kwargs)
    spec = model_spec(cfg.model, kwargs, data.num_classes, data.input_shape, data.name, cfg.val_fraction,
                      data_args=cfg.data_args, loss=loss_name(cfg.loss))
    check_batch(model, data, loss_fn, device=cfg.fit.device, amp=cfg.fit.amp, what=f"model {cfg.model}")
    run = RunDir(cfg.out, resume=resume, overwrite=overwrite, command="train")  # a refused command leaves no folder
    optimizer = make_optimizer(model, cfg.fit)
    state = FitState()
    ckpt_file = run.file(CHECKPOINT_NAME)
    if run.resume and ckpt_file.exists():
        ckpt = load_checkpoint(ckpt_file, kind="fp32")
        if ckpt["spec"] != spec:
            raise LowbitError(f"{ckpt_file}: the checkpoint is for {ckpt['spec']['model']!r}, not this "
                              f"configuration; resume with the same options")
        check_same_recipe(ckpt.get("fit"), cfg.fit, ckpt_file, ckpt["epoch"])
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = FitState(ckpt["epoch"], run.read_metrics()[: ckpt["epoch"]])
    else:
        run.resume = False
        if cfg.weights:
            load_weights_(model, cfg.weights)
    run.write_config({"command": "train", **cfg.to_dict(), "resolved_model_kwargs": kwargs})

    def on_epoch_end(st: FitState, opt: torch.optim.Optimizer) -> None:
        if not dist.is_main():  # under torchrun rank 0 alone writes the run directory
            return
        save_checkpoint(ckpt_file, {"kind": "fp32", "spec": spec, "state_dict": model.state_dict(),
                                    "optimizer": opt.state_dict(), "epoch": st.epoch,
                                    "fit": cfg.fit.to_dict()})
        run.write_metrics(st.rows)

    t0 = time.perf_counter()
    with run.removed_on_error():
        state = fit(model, data, cfg.fit, optimizer=optimizer, start=state, on_epoch_end=on_epoch_end,
                    stop_after=stop_after, desc=f"train {cfg.model}", loss_fn=loss_fn, metric=cfg.metric)
    if state.epoch == 0:  # epochs=0 runs no epoch, hence no on_epoch_end: still leave a checkpoint to quantize
        on_epoch_end(state, optimizer)
    head = {"command": "train", "model": cfg.model, **({"weights": str(cfg.weights)} if cfg.weights else {})}
    summary = finish_run(run, model, data, cfg.fit, state, head, time.perf_counter() - t0, loss_fn=loss_fn,
                         metric=cfg.metric)
    return summary


def model_kwargs(cfg: TrainConfig, data) -> dict[str, Any]:
    """A factory gets its ``model_args`` only; a registry model also its classes and input channels."""
    args = dict(cfg.model_args or {})
    check_model_name(cfg.model)
    if is_import_path(cfg.model):
        if cfg.width is not None:
            raise LowbitError("--width applies to lowbit's ResNets; pass your factory's options with --model-args")
        return args
    if data.num_classes is None and "num_classes" not in args:
        raise LowbitError(f"data {data.name} does not say how many classes it has; pass --model-args "
                          "'{num_classes: N}' or use your own model factory")
    if data.input_shape is None:
        raise LowbitError(f"model {cfg.model!r} takes image tensors, but data {data.name} gives other inputs; "
                          "use your own model factory (--model package.module:factory)")
    kwargs = {"in_channels": data.input_shape[0], **args}
    if cfg.width is not None:
        kwargs["width"] = cfg.width
    return kwargs


def _evaluate_split(model, ds, fit_cfg: FitConfig, loss_fn, metric, prefix: str) -> dict[str, Any]:
    if ds is None:
        return {}
    loss, acc = evaluate(model, ds, fit_cfg.eval_batch_size, fit_cfg.device, fit_cfg.channels_last, loss_fn=loss_fn)
    out = {f"{prefix}_acc": None if acc != acc else acc, f"{prefix}_loss": loss}
    if metric is not None:
        from lowbit.metrics import measure

        out[f"{prefix}_metric"] = measure(metric, model, ds, batch_size=fit_cfg.eval_batch_size, device=fit_cfg.device)
    return out


def finish_run(run: RunDir, model, data, fit_cfg: FitConfig, state: FitState, head: dict[str, Any],
               wall_s: float, *, loss_fn=None, metric=None) -> dict[str, Any]:
    """Final val/test evaluation, summary.json, curves PNG and report.md (shared by train and quantize).

    The test split (if the data has one) is evaluated for the report only; nothing selects on it.
    """
    complete = state.epoch >= int(-(-fit_cfg.epochs // 1))
    summary = {
        **head,
        "complete": complete,
        "epochs": state.epoch,
        **_evaluate_split(model, data.val, fit_cfg, loss_fn, metric, "val"),
        **_evaluate_split(model, data.test, fit_cfg, loss_fn, metric, "test"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": sum(r["seconds"] for r in state.rows),
        "wall_seconds_this_process": wall_s,
        "data": data.name,
    }
    if metric is not None:
        from lowbit.metrics import metric_name

        summary["metric"] = metric_name(metric)
    run.write_summary(summary)
    plot_curves(state.rows, run.file("curves.png"), title=f"{head.get('model', '')} {head.get('command', '')}")
    run.write_report(render_report(summary, state.rows))
    return summary


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def render_report(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# {summary.get('command', 'run')}: {summary.get('model', '')}", ""]
    if summary.get("val_acc") is not None:
        lines.append(f"- validation accuracy: **{_pct(summary['val_acc'])}%**")
    lines.append(f"- validation loss: {summary['val_loss']:.4f}")
    if "metric" in summary:
        lines.append(f"- validation {summary['metric']}: **{summary['val_metric']:.4f}**")
    if summary.get("test_loss") is not None:
        lines.append(f"- test (reporting only): loss {summary['test_loss']:.4f}"
                     + (f", accuracy {_pct(summary['test_acc'])}%" if summary.get("test_acc") is not None else "")
                     + (f", {summary['metric']} {summary['test_metric']:.4f}" if "test_metric" in summary else ""))
    lines += [f"- epochs: {summary['epochs']}, training time: {summary['train_seconds']:.0f} s, "
              f"parameters: {summary['parameters']:,}", ""]
    if "plan" in summary:
        lines += [f"- plan: {summary.get('bits', 'per-layer')} ({len(summary['plan'])} layers)", ""]
    lines += ["![curves](curves.png)", "", "| epoch | lr | train loss | train acc | val loss | val acc | s |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['lr']:.2e} | {r['train_loss']:.4f} | {_pct(r['train_acc'])} | "
              f"{r['val_loss']:.4f} | {_pct(r['val_acc'])} | {r['seconds']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"

