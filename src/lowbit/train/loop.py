"""One readable training loop, shared by fp32 training and quantized fine-tuning.

No trainer framework: ``fit`` is a for-loop over epochs and batches with SGD (Nesterov momentum), a per-step
learning-rate schedule, optional label smoothing and optional distillation from a frozen teacher. After each
epoch it evaluates on the validation split, appends a metrics row and writes a checkpoint atomically; with
``resume`` it continues from that checkpoint and, because each epoch's data order and augmentation depend only
on (seed, epoch), ends where an uninterrupted run would.

Under ``torchrun`` (WORLD_SIZE > 1) ``fit`` is data-parallel: the model is wrapped in DistributedDataParallel,
rank r trains on ``order[r::world]`` of each epoch's common order with ``batch_size // world`` examples per
step (the global batch stays ``batch_size``), validation is split the same way and summed over the ranks, and
only rank 0 shows progress and runs ``on_epoch_end`` (checkpoints, metrics) while the others wait.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit import distributed as dist
from lowbit.data import DataSplits, TensorDataset, iterate, num_batches
from lowbit.data.datasets import AUGMENTATIONS
from lowbit.errors import LowbitError

SCHEDULES = ("cosine", "onecycle", "exp", "constant")
AMP = ("bf16",)


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
    amp: str | None = None  # "bf16": autocast the training forward (CPU or CUDA)

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
        if self.amp is not None and self.amp not in AMP:
            raise LowbitError(f"unknown amp {self.amp!r}; choose {', '.join(AMP)} or leave it off (float32)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["amp"] is None:  # unset: keep the dict (and the fingerprints of earlier runs) as before amp existed
            del d["amp"]
        return d


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


def _hits(out: torch.Tensor, y: torch.Tensor) -> float:
    """Correct predictions summed per example: top-1 for labels (N,), pixel accuracy for masks (N, H, W)."""
    return (out.argmax(1) == y).reshape(len(y), -1).float().mean(1).sum().item()


@torch.no_grad()
def evaluate(model: nn.Module, ds: TensorDataset, batch_size: int = 512, device: str = "cpu",
             channels_last: bool = True, desc: str | None = None, quiet: bool = True,
             ) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (fraction) on ``ds``; restores the model's mode.

    For per-pixel targets (N, H, W) the accuracy is the mean of the examples' pixel accuracies.
    """
    loss_sum, correct, n = _eval_sums(model, ds, batch_size, device, channels_last, desc=desc, quiet=quiet)
    return loss_sum / max(n, 1), correct / max(n, 1)


@torch.no_grad()
def _eval_sums(model: nn.Module, ds: TensorDataset, batch_size: int, device, channels_last: bool, *,
               shard: tuple[int, int] | None = None, desc: str | None = None, quiet: bool = True,
               ) -> tuple[float, float, int]:
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0.0, 0
    cfg = FitConfig(channels_last=channels_last)
    it = iterate(ds, batch_size, device=device, shard=shard)
    total = None if shard else num_batches(ds, batch_size)
    for x, y in tqdm(it, total=total, desc=desc, leave=False, disable=quiet or None):
        out = model(_prep(x, cfg))
        loss_sum += F.cross_entropy(out, y, reduction="sum").item() / (y[0].numel() if y.ndim > 1 else 1)
        correct += _hits(out, y)
        n += len(y)
    model.train(was_training)
    return loss_sum, correct, n


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
        desc: str = "train",
        data_parallel: bool = True) -> FitState:
    """Train ``model`` in place on ``data.train``; validate on ``data.val`` after every epoch.

    ``on_epoch_end(state, optimizer)`` is where the caller writes its checkpoint and metrics. ``stop_after``
    ends the loop after that many epochs (tests use it to simulate a killed run). Fractional ``epochs`` run a
    last partial epoch. A NaN or infinite loss stops with a LowbitError naming the epoch and the fix (on every
    rank at the same step). ``data_parallel=False`` keeps a torchrun rank training alone (ALPS candidates).
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    ddp = data_parallel and dist.init_from_env(device)
    world, rank = (dist.world_size(), dist.rank()) if ddp else (1, 0)
    main = rank == 0
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = optimizer or make_optimizer(model, cfg)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    net = _data_parallel(model, data, cfg, world) if ddp else model
    net = torch.compile(net) if cfg.compile else net  # same parameters; checkpoints save ``model``
    per_epoch = cfg.examples_per_epoch or len(data.train)
    local_batch = cfg.batch_size // world
    if ddp:  # every rank must take the same number of steps: equal shards of each epoch
        steps_per_epoch = num_batches(data.train, local_batch, _even(min(per_epoch, len(data.train)), world) // world)
    else:
        steps_per_epoch = num_batches(data.train, cfg.batch_size, per_epoch)
    shard = (rank, world) if ddp else None
    n_epochs = math.ceil(cfg.epochs)
    state = start or FitState()
    quiet = cfg.quiet or not main
    epochs = tqdm(range(state.epoch, n_epochs), initial=state.epoch, total=n_epochs, desc=desc,
                  disable=quiet or None, unit="epoch")
    for epoch in epochs:
        frac = min(1.0, cfg.epochs - epoch)
        limit = max(1, round(frac * per_epoch))
        if ddp:
            limit = _even(min(limit, len(data.train)), world)
        t0 = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0.0, 0
        batches = iterate(data.train, local_batch, train=True, seed=cfg.seed, epoch=epoch, device=device,
                          limit=limit, augmentation=cfg.augmentation, shard=shard)
        bar = tqdm(batches, total=num_batches(data.train, local_batch, limit // world), leave=False,
                   desc=f"epoch {epoch + 1}", disable=quiet or None)
        for i, (x, y) in enumerate(bar):
            lr = lr_at(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, out = _train_step(net, teacher, optimizer, _prep(x, cfg), y, cfg.label_smoothing,
                                    cfg.distill_temperature, cfg.amp)
            loss = loss.item()
            bad = not math.isfinite(loss)
            if ddp:  # a NaN on any rank stops them all at this step
                bad = bool(dist.all_reduce_sum(torch.tensor([float(bad)], device=device)).item())
            if bad:
                what = f"{loss}" if not math.isfinite(loss) else "non-finite on another rank"
                raise LowbitError(f"loss became {what} in epoch {epoch + 1} (lr {lr:.3g}); lower --lr or check the "
                                  f"data and the checkpoint")
            loss_sum += loss * len(y)
            correct += _hits(out, y)
            seen += len(y)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        train_s = time.perf_counter() - t0
        if ddp:
            _sync_buffers(model)
            loss_sum, correct, seen = _sum_over_ranks(loss_sum, correct, seen, device=device)
            seen = int(seen)
        val_loss, val_acc = _validate(model, data.val, cfg, shard)
        state.epoch = epoch + 1
        state.rows.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                           "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": train_s,
                           "examples": seen})
        epochs.set_postfix(val_acc=f"{100 * val_acc:.2f}")
        if on_epoch_end is not None and main:
            on_epoch_end(state, optimizer)
        if ddp:
            dist.barrier()  # the checkpoint exists for every rank before anyone goes on
        if stop_after is not None and state.epoch >= stop_after:
            break
    return state


def _even(n: int, world: int) -> int:
    """``n`` rounded down to a multiple of ``world`` (at most world - 1 examples of an epoch are left out)."""
    if n < world:
        raise LowbitError(f"{n} training examples cannot be split over {world} ranks")
    return n - n % world


def _data_parallel(model: nn.Module, data: DataSplits, cfg: FitConfig, world: int) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if cfg.batch_size % world:
        raise LowbitError(f"--batch-size {cfg.batch_size} is the global batch and must be a multiple of the "
                          f"{world} ranks, e.g. {max(world, cfg.batch_size - cfg.batch_size % world)}")
    last = cfg.epochs - math.floor(cfg.epochs)
    per_epoch = min(cfg.examples_per_epoch or len(data.train), len(data.train))
    if last and max(1, round(last * per_epoch)) < world:
        raise LowbitError(f"the last partial epoch ({last:g} of {per_epoch} examples) is smaller than the "
                          f"{world} ranks; use whole epochs or a larger fraction")
    if not _can_shard(data.train):
        raise LowbitError(f"{type(data.train).__name__} data cannot be split over torchrun ranks yet; train it "
                          "in one process (without torchrun)")
    device = next(model.parameters()).device
    # Buffers (BN statistics, quantizer flags) are synced once per epoch by _sync_buffers, not before every
    # forward: cheaper, and the same on every torch (``broadcast_buffers`` became ``forward_sync_buffers``).
    params = inspect.signature(DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **sync)


def _can_shard(ds) -> bool:
    """In-memory data always; a data set with its own ``batches`` (ImageFolder) only if that takes ``shard``."""
    return not hasattr(ds, "batches") or "shard" in inspect.signature(ds.batches).parameters


def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers everywhere, so every rank validates (and rank 0 saves) the same model."""
    for b in model.buffers():
        dist.broadcast_(b, 0)


def _sum_over_ranks(*values: float, device) -> list[float]:
    t = dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device))
    return [float(v) for v in t.tolist()]


def _validate(model: nn.Module, ds, cfg: FitConfig, shard: tuple[int, int] | None) -> tuple[float, float]:
    """Validation split over the ranks and summed; every rank gets the same numbers."""
    if shard is not None and not _can_shard(ds):
        shard = None  # not splittable: every rank evaluates all of it (same model, same result)
    loss_sum, correct, n = _eval_sums(model, ds, cfg.eval_batch_size, cfg.device, cfg.channels_last, shard=shard)
    if shard is not None:
        loss_sum, correct, n = _sum_over_ranks(loss_sum, correct, n, device=next(model.parameters()).device)
    return loss_sum / max(n, 1), correct / max(n, 1)


def _train_step(model, teacher, optimizer, x, y, label_smoothing: float, temperature: float,
                amp: str | None = None):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
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
    return loss.detach().float(), out.detach()
