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
from lowbit.models import create_model, load_weights_
from lowbit.runs import RunDir, plot_curves
from lowbit.train.checkpoint import CHECKPOINT_NAME, model_spec
from lowbit.train.loop import FitConfig, FitState, evaluate, fit, make_optimizer


@dataclass(frozen=True)
class TrainConfig:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, data=None) -> dict[str, Any]:
    """Train from scratch (or resume) and return the summary that is also written to ``summary.json``."""
    dist.init_from_env(cfg.fit.device)
    run = RunDir(cfg.out, resume=resume, overwrite=overwrite)
    data = data or get_data(cfg.data, cfg.data_dir, val_fraction=cfg.val_fraction, image_size=cfg.image_size,
                            workers=cfg.workers)
    kwargs = {"in_channels": data.input_shape[0]}
    if cfg.width is not None:
        kwargs["width"] = cfg.width
    if cfg.workers:
        torch.set_num_threads(cfg.workers)
    seed_everything(cfg.fit.seed)
    model = create_model(cfg.model, data.num_classes, **kwargs)
    spec = model_spec(cfg.model, kwargs, data.num_classes, data.input_shape, data.name, cfg.val_fraction)
    optimizer = make_optimizer(model, cfg.fit)
    state = FitState()
    ckpt_file = run.file(CHECKPOINT_NAME)
    if run.resume and ckpt_file.exists():
        ckpt = load_checkpoint(ckpt_file, kind="fp32")
        if ckpt["spec"] != spec:
            raise LowbitError(f"{ckpt_file}: the checkpoint is for {ckpt['spec']['model']!r}, not this "
                              f"configuration; resume with the same options")
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
    state = fit(model, data, cfg.fit, optimizer=optimizer, start=state, on_epoch_end=on_epoch_end,
                stop_after=stop_after, desc=f"train {cfg.model}")
    if state.epoch == 0:  # epochs=0 runs no epoch, hence no on_epoch_end: still leave a checkpoint to quantize
        on_epoch_end(state, optimizer)
    head = {"command": "train", "model": cfg.model, **({"weights": str(cfg.weights)} if cfg.weights else {})}
    summary = finish_run(run, model, data, cfg.fit, state, head, time.perf_counter() - t0)
    return summary


def finish_run(run: RunDir, model, data, fit_cfg: FitConfig, state: FitState, head: dict[str, Any],
               wall_s: float) -> dict[str, Any]:
    """Final val/test evaluation, summary.json, curves PNG and report.md (shared by train and quantize)."""
    complete = state.epoch >= int(-(-fit_cfg.epochs // 1))
    val_loss, val_acc = evaluate(model, data.val, fit_cfg.eval_batch_size, fit_cfg.device, fit_cfg.channels_last)
    test_loss, test_acc = evaluate(model, data.test, fit_cfg.eval_batch_size, fit_cfg.device,
                                   fit_cfg.channels_last)
    summary = {
        **head,
        "complete": complete,
        "epochs": state.epoch,
        "val_acc": val_acc, "val_loss": val_loss,
        "test_acc": test_acc, "test_loss": test_loss,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": sum(r["seconds"] for r in state.rows),
        "wall_seconds_this_process": wall_s,
        "data": data.name,
    }
    run.write_summary(summary)
    plot_curves(state.rows, run.file("curves.png"), title=f"{head.get('model', '')} {head.get('command', '')}")
    run.write_report(render_report(summary, state.rows))
    return summary


def render_report(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# {summary.get('command', 'run')}: {summary.get('model', '')}", "",
             f"- validation accuracy: **{100 * summary['val_acc']:.2f}%**",
             f"- test accuracy (reporting only): **{100 * summary['test_acc']:.2f}%**",
             f"- epochs: {summary['epochs']}, training time: {summary['train_seconds']:.0f} s, "
             f"parameters: {summary['parameters']:,}", ""]
    if "plan" in summary:
        lines += [f"- plan: {summary.get('bits', 'per-layer')} ({len(summary['plan'])} layers)", ""]
    lines += ["![curves](curves.png)", "", "| epoch | lr | train loss | train acc | val loss | val acc | s |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['lr']:.2e} | {r['train_loss']:.4f} | {100 * r['train_acc']:.2f} | "
              f"{r['val_loss']:.4f} | {100 * r['val_acc']:.2f} | {r['seconds']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"

