"""One readable training loop, shared by fp32 training and quantized fine-tuning.

No trainer framework: ``fit`` is a for-loop over epochs and batches with SGD (Nesterov momentum), a per-step
learning-rate schedule, optional label smoothing and optional distillation from a frozen teacher. After each
epoch it evaluates on the validation split, appends a metrics row and writes a checkpoint atomically; with
``resume`` it continues from that checkpoint and, because each epoch's data order and augmentation depend only
on (seed, epoch), ends where an uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.data import DataSplits, TensorDataset, iterate, num_batches
from lowbit.data.datasets import AUGMENTATIONS
from lowbit.errors import LowbitError

SCHEDULES = ("cosine", "onecycle", "exp", "constant")


@dataclass(frozen=True)
class FitConfig:
    """How to (fine-)tune. ``lr_decay`` is the per-epoch factor of the ``exp`` schedule (FAQ: 0.936)."""

    epochs: float = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_decay: float = 0.936
    label_smoothing: float = 0.0
    distill: bool = False
    distill_temperature: float = 1.0
    seed: int = 0
    device: str = "cpu"
    channels_last: bool = True
    compile: bool = False
    quiet: bool = False
    augmentation: str = "flip"  # flip | crop+flip | none (in-memory data sets); see README
    examples_per_epoch: int | None = None  # a fraction of an epoch (ALPS, smoke runs)
    eval_batch_size: int = 512

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise LowbitError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not self.epochs >= 0:
            raise LowbitError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise LowbitError("batch size must be >= 1")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise LowbitError(f"learning rate must be a finite number >= 0, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise LowbitError("weight decay must be >= 0 and momentum in [0, 1)")
        if self.augmentation not in AUGMENTATIONS:
            raise LowbitError(f"unknown augmentation {self.augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if not 0 <= self.label_smoothing < 1:
            raise LowbitError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise LowbitError(f"unknown device {self.device!r}; choose cpu or cuda")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(cfg: FitConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer step ``step``; every schedule is evaluated per step."""
    total = max(1, round(cfg.epochs * steps_per_epoch))
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":  # linear up for 30% (or the warm-up), cosine down to ~0
        warm = warm or round(0.3 * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "exp":
        return cfg.lr * cfg.lr_decay ** ((step - warm) / steps_per_epoch)  # ×lr_decay per epoch, smoothly
    t = (step - warm) / max(1, total - warm)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices/kernels only: BN, biases and quantizer steps (ndim <= 1) are exempt."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def _prep(x: torch.Tensor, cfg: FitConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and x.ndim == 4 else x


@torch.no_grad()
def evaluate(model: nn.Module, ds: TensorDataset, batch_size: int = 512, device: str = "cpu",
             channels_last: bool = True, desc: str | None = None, quiet: bool = True,
             ) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (fraction) on ``ds``; restores the model's mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    cfg = FitConfig(channels_last=channels_last)
    it = iterate(ds, batch_size, device=device)
    for x, y in tqdm(it, total=num_batches(ds, batch_size), desc=desc, leave=False, disable=quiet or None):
        out = model(_prep(x, cfg))
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)


@torch.no_grad()
def predict(model: nn.Module, ds: TensorDataset, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """Logits for every example of ``ds`` (N, classes), in order."""
    was_training = model.training
    model.eval()
    outs = [model(x).float().cpu() for x, _ in iterate(ds, batch_size, device=device)]
    model.train(was_training)
    return torch.cat(outs)


@dataclass
class FitState:
    """What a checkpoint must hold to resume: weights, optimizer, the epoch reached, the metrics so far."""

    epoch: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)


def fit(model: nn.Module, data: DataSplits, cfg: FitConfig, *,
        optimizer: torch.optim.Optimizer | None = None,
        teacher: nn.Module | None = None,
        start: FitState | None = None,
        on_epoch_end: Callable[[FitState, torch.optim.Optimizer], None] | None = None,
        stop_after: int | None = None,
        desc: str = "train") -> FitState:
    """Train ``model`` in place on ``data.train``; validate on ``data.val`` after every epoch.

    ``on_epoch_end(state, optimizer)`` is where the caller writes its checkpoint and metrics. ``stop_after``
    ends the loop after that many epochs (tests use it to simulate a killed run). Fractional ``epochs`` run a
    last partial epoch. A NaN or infinite loss stops with a LowbitError naming the epoch and the fix.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = optimizer or make_optimizer(model, cfg)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    net = torch.compile(model) if cfg.compile else model  # same parameters; checkpoints save ``model``
    per_epoch = cfg.examples_per_epoch or len(data.train)
    steps_per_epoch = num_batches(data.train, cfg.batch_size, per_epoch)
    n_epochs = math.ceil(cfg.epochs)
    state = start or FitState()
    epochs = tqdm(range(state.epoch, n_epochs), initial=state.epoch, total=n_epochs, desc=desc,
                  disable=cfg.quiet or None, unit="epoch")
    for epoch in epochs:
        frac = min(1.0, cfg.epochs - epoch)
        limit = max(1, round(frac * per_epoch))
        t0 = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = iterate(data.train, cfg.batch_size, train=True, seed=cfg.seed, epoch=epoch, device=device,
                          limit=limit, augmentation=cfg.augmentation)
        bar = tqdm(batches, total=num_batches(data.train, cfg.batch_size, limit), leave=False,
                   desc=f"epoch {epoch + 1}", disable=cfg.quiet or None)
        for i, (x, y) in enumerate(bar):
            lr = lr_at(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, out = _train_step(net, teacher, optimizer, _prep(x, cfg), y, cfg.label_smoothing,
                                cfg.distill_temperature)
            loss = loss.item()
            if not math.isfinite(loss):
                raise LowbitError(f"loss became {loss} in epoch {epoch + 1} (lr {lr:.3g}); lower --lr or check "
                                  f"the data and the checkpoint")
            loss_sum += loss * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        train_s = time.perf_counter() - t0
        val_loss, val_acc = evaluate(model, data.val, cfg.eval_batch_size, cfg.device, cfg.channels_last)
        state.epoch = epoch + 1
        state.rows.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                           "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": train_s,
                           "examples": seen})
        epochs.set_postfix(val_acc=f"{100 * val_acc:.2f}")
        if on_epoch_end is not None:
            on_epoch_end(state, optimizer)
        if stop_after is not None and state.epoch >= stop_after:
            break
    return state


def _train_step(model, teacher, optimizer, x, y, label_smoothing: float, temperature: float):
    out = model(x)
    loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    if teacher is not None:  # LSQ+KD: label loss and distillation loss weighted 1:1
        with torch.no_grad():
            t_logits = teacher(x)
        kd = F.kl_div(F.log_softmax(out / temperature, 1), F.log_softmax(t_logits / temperature, 1),
                      reduction="batchmean", log_target=True) * temperature**2
        loss = loss + kd
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), out.detach()
