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

import contextlib
import hashlib
import inspect
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import distributed as dist
from lowbit.data import DataSplits, batch_len, call_model, iterate, logits_of, num_batches, num_examples, split_batch
from lowbit.data.datasets import AUGMENTATIONS
from lowbit.data.protocol import can_shard, first_tensor, target_hint
from lowbit.errors import LowbitError, one_line
from lowbit.progress import progress

SCHEDULES = ("cosine", "onecycle", "exp", "constant")
AMP = ("bf16",)
COMPILE = (True, False, "auto")
DISTILL_LOSSES = ("kl", "mse", "cosine")
LossFn = Callable[[Any, Any], torch.Tensor]  # loss_fn(outputs, batch) -> scalar


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
    distill_loss: str = "kl"  # kl on logits (classification) | mse | cosine on the outputs (embeddings)
    # Modules (names shared by student and teacher, e.g. lowbit.models.hf.encoder_blocks) whose outputs are also
    # distilled: MSE, averaged over them, added with weight 1 (intermediate-feature KD). Needs distill.
    distill_features: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    channels_last: bool | None = None  # None: the model's own preference (lowbit's ResNets: True)
    compile: bool | str = "auto"  # True | False | "auto": compile a quantized model when it pays (AutoCompile)
    quiet: bool = False
    augmentation: str | None = None  # None: the data set's own; flip | crop+flip | none (lowbit's image sets)
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
        if self.augmentation is not None and self.augmentation not in AUGMENTATIONS:
            raise LowbitError(f"unknown augmentation {self.augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if not 0 <= self.label_smoothing < 1:
            raise LowbitError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise LowbitError(f"unknown device {self.device!r}; choose cpu or cuda")
        if self.compile not in COMPILE or not isinstance(self.compile, (bool, str)):
            raise LowbitError(f"compile must be true, false or 'auto', got {self.compile!r}")
        if self.amp is not None and self.amp not in AMP:
            raise LowbitError(f"unknown amp {self.amp!r}; choose {', '.join(AMP)} or leave it off (float32)")
        if isinstance(self.distill_features, str) or not all(isinstance(n, str) for n in self.distill_features):
            raise LowbitError(f"distill_features must be a list of module names, got {self.distill_features!r}")
        object.__setattr__(self, "distill_features", tuple(self.distill_features))  # from JSON: a list
        if self.distill_loss not in DISTILL_LOSSES:
            raise LowbitError(f"unknown distillation loss {self.distill_loss!r}; choose one of "
                              f"{', '.join(DISTILL_LOSSES)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["amp"] is None:  # unset: keep the dict (and the fingerprints of earlier runs) as before amp existed
            del d["amp"]
        if d["compile"] == "auto":  # compiling changes float rounding, not the recipe: runs that began before
            d["compile"] = False  # "auto" was the default (compile: false) keep their fingerprints and resume
        if d["distill_loss"] == "kl":
            del d["distill_loss"]
        if not d["distill_features"]:
            del d["distill_features"]
        else:
            d["distill_features"] = list(d["distill_features"])
        return d


# free to change on resume: how it runs, not what it learns; and ``epochs``, so that a finished run can be extended
_FREE_ON_RESUME = frozenset({"device", "channels_last", "compile", "quiet", "eval_batch_size", "epochs"})


def check_same_recipe(saved: dict[str, Any] | None, cfg: FitConfig, where: str | Path, done: int = 0) -> None:
    """Refuse to resume a checkpoint trained with other fit settings: the lr, data order or loss would change
    midway, and the run's config would record only the new ones. ``done``: the checkpoint's finished epochs."""
    if not saved:
        return
    names = {f.name for f in fields(FitConfig)}
    before = FitConfig(**{k: v for k, v in saved.items() if k in names})
    changed = [f"{n} {getattr(before, n)!r} -> {getattr(cfg, n)!r}" for n in sorted(names - _FREE_ON_RESUME)
               if getattr(before, n) != getattr(cfg, n)]
    if changed:
        raise LowbitError(f"{where}: trained with other settings ({', '.join(changed[:3])}); resume with the same "
                          "options, or start over with --overwrite / another --out")
    if cfg.epochs > before.epochs and before.epochs != int(before.epochs) and done >= math.ceil(before.epochs):
        raise LowbitError(f"{where}: the run ended inside an epoch ({before.epochs:g} epochs), so it "
                          f"cannot be extended to {cfg.epochs:g}; extend runs of whole epochs, or start over with "
                          "--overwrite / another --out")


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


def prefers_channels_last(model: nn.Module, asked: bool | None = None) -> bool:
    """Channels-last only when asked or when the model says it wants it (lowbit's ResNets, torchvision/timm
    models built by name): a user's model whose forward calls ``x.view(...)`` would break under it."""
    if asked is not None:
        return asked
    return bool(getattr(model, "prefers_channels_last", False))


def _prep(inputs: Any, channels_last: bool) -> Any:
    if channels_last and isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def default_loss(outputs: Any, target: torch.Tensor | None, label_smoothing: float = 0.0,
                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on the logits: class labels (N,) or per-pixel labels (N, H, W); ``sum`` is per example."""
    if target is None:
        raise LowbitError("the batches carry no target: return (inputs, target) or a dict with 'labels', or pass "
                          "a loss function loss_fn(outputs, batch)")
    logits = logits_of(outputs)
    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)
    if reduction == "sum" and target.ndim > 1:
        loss = loss / target[0].numel()
    return loss


def check_batch(model: nn.Module, data: DataSplits, loss_fn: LossFn | None = None, *, device: str = "cpu",
                amp: str | None = None, what: str = "the model") -> None:
    """One validation batch through ``model`` and the loss before a command writes anything, so a model that
    does not take the data, a batch without a target or a loss that raises is one line, not a traceback an
    epoch in. It runs on ``device`` (with bf16 autocast for ``amp="bf16"``) and returns to where it was; eval
    mode, no gradients, torch's RNG state restored, so training afterwards is unchanged (a model that
    initialises itself lazily does so on this batch)."""
    device = torch.device(device)
    home = next((p.device for p in model.parameters()), None)
    was_training = model.training
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        batch = next(iter(iterate(data.val, 2, limit=2, device=device)), None)
        if batch is None:
            return
        inputs, target = split_batch(batch)
        model.to(device).eval()
        try:
            out = call_model(model, inputs)
        except LowbitError:
            raise
        except Exception as e:
            raise LowbitError(f"{what} cannot run a batch of {data.name}: {one_line(e)}"
                              f"{target_hint(inputs) if target is None else ''}") from None
        finally:
            model.train(was_training)
            if home is not None:
                model.to(home)  # the caller moves it when it needs to
        try:
            loss = default_loss(out, target) if loss_fn is None else loss_fn(out, batch)
        except LowbitError:
            raise
        except Exception as e:
            name = "cross-entropy" if loss_fn is None else getattr(loss_fn, "__qualname__", "the loss function")
            raise LowbitError(f"the loss ({name}) fails on a batch of {data.name} and the outputs of {what}: "
                              f"{one_line(e)}") from None
        _check_scalar(loss)


def _check_scalar(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise LowbitError(f"the loss function must return a scalar tensor, got {type(loss).__name__}"
                          + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))


def _is_classification(logits: torch.Tensor, y: Any) -> bool:
    return (isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dtype != torch.bool
            and logits.ndim == y.ndim + 1 and logits.shape[0] == y.shape[0] and logits.shape[2:] == y.shape[1:])


def _hits(out: Any, y: Any) -> float | None:
    """Correct predictions summed per example: top-1 for labels (N,), pixel accuracy for masks (N, H, W);
    None where the target is not class labels (regression, embeddings)."""
    logits = logits_of(out)
    if not _is_classification(logits, y):
        return None
    return (logits.argmax(1) == y).reshape(len(y), -1).float().mean(1).sum().item()


def _fraction(total: float | None, n: int) -> float | None:
    return None if total is None else total / max(n, 1)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Any, batch_size: int = 512, device: str = "cpu",
             channels_last: bool | None = None, desc: str | None = None, quiet: bool = True,
             loss_fn: LossFn | None = None) -> tuple[float, float]:
    """Mean loss and top-1 accuracy (fraction) on ``ds`` (any data source); restores the model's mode.

    The loss is ``loss_fn(outputs, batch)`` averaged over examples, cross-entropy by default. For per-pixel
    targets (N, H, W) the accuracy is the mean of the examples' pixel accuracies; where the targets are not
    class labels it is NaN.
    """
    loss_sum, correct, n = _eval_sums(model, ds, batch_size, device, channels_last, desc=desc, quiet=quiet,
                                      loss_fn=loss_fn)
    acc = _fraction(correct, n)
    return loss_sum / max(n, 1), math.nan if acc is None else acc


@torch.no_grad()
def _eval_sums(model: nn.Module, ds: Any, batch_size: int, device, channels_last: bool | None, *,
               shard: tuple[int, int] | None = None, desc: str | None = None, quiet: bool = True,
               loss_fn: LossFn | None = None) -> tuple[float, float | None, int]:
    was_training = model.training
    model.eval()
    cl = prefers_channels_last(model, channels_last)
    loss_sum, correct, n = 0.0, 0.0, 0
    it = iterate(ds, batch_size, device=device, shard=shard)
    total = None if shard else num_batches(ds, batch_size)
    for batch in progress(it, total=total, desc=desc, quiet=quiet):
        inputs, y = split_batch(batch)
        out = call_model(model, _prep(inputs, cl))
        k = batch_len(inputs)
        if loss_fn is None:
            loss_sum += default_loss(out, y, reduction="sum").item()
        else:
            loss_sum += float(loss_fn(out, batch)) * k
        hits = _hits(out, y)
        correct = None if hits is None or correct is None else correct + hits
        n += k
    model.train(was_training)
    return loss_sum, correct, n


@torch.no_grad()
def predict(model: nn.Module, ds: Any, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """Outputs (logits) for every example of ``ds``, in order."""
    was_training = model.training
    model.eval()
    outs = [logits_of(call_model(model, split_batch(b)[0])).float().cpu() for b in iterate(ds, batch_size,
                                                                                           device=device)]
    model.train(was_training)
    return torch.cat(outs)


# compile="auto" (FitConfig.compile); the constants are measurements of bench/qat_overhead.py (2-core CPU, see
# docs/results/qat_overhead.md)
AUTO_COMPILE_PROBE_STEPS = 3  # eager steps timed (after one warm-up step) before deciding
# compiled vs eager step, the smallest measured (resnet8/20, 1 and 2 threads), by the slowest quantizer in the model
AUTO_COMPILE_SPEEDUP = {"lsq": 1.8, "faq": 1.15, "minmax": 1.15, None: 1.05}  # None: a float model
AUTO_COMPILE_COLD_S = 120.0  # a first compile, Inductor cache cold (resnet8 W4A4 LSQ ~115-120 s, resnet20 ~105 s)
AUTO_COMPILE_WARM_S = 20.0  # the same graph from Inductor's on-disk cache in a fresh process (~5-10 s)
_COMPILED: set[tuple] = set()  # structures this process has compiled: another precision plan reuses the graph


class AutoCompile:
    """Which module each training step runs: ``net`` eagerly, or ``torch.compile(net)`` (same parameters).

    ``mode=True`` compiles from the first step, ``False`` never (``LOWBIT_COMPILE=1|0`` turns ``"auto"`` into
    these, e.g. for ALPS' jobs, which take no flag). ``"auto"`` compiles a model with fake quantizers when that
    wins including the compile. After a warm-up step it times ``AUTO_COMPILE_PROBE_STEPS`` eager steps (median
    ``t``; under torchrun the mean over the ranks, so that all agree) and compiles if the steps left would save
    more than the compile costs::

        steps_left · t · (1 - 1 / speed-up) > expected compile seconds

    with the speed-up of ``AUTO_COMPILE_SPEEDUP`` for the model's quantizers (LSQ's straight-through and
    gradient-scale arithmetic fuses best; a float model gains so little that it practically stays eager).

    The expected compile is 0 for a structure this process has compiled already (any precision plan: the
    quantizers' bits are tensors, not constants of the graph, so the graph is reused; it compiles at once),
    ``AUTO_COMPILE_WARM_S`` when this machine's Inductor cache holds it (a marker lowbit leaves there), else
    ``AUTO_COMPILE_COLD_S``.

    Batches of another size than ``batch`` (an epoch's last partial batch) run eagerly: a new shape would
    recompile. If compiling fails under ``"auto"`` (no C++ compiler, an untraceable model), one warning and
    training goes on eagerly.
    """

    def __init__(self, model: nn.Module, net: nn.Module, cfg: FitConfig, steps_left: int, batch: int, *,
                 channels_last: bool = False, ddp: bool = False):
        from lowbit.quant.quantizers import _Quantizer

        mode = cfg.compile
        if mode == "auto":
            mode = {"0": False, "1": True}.get(os.environ.get("LOWBIT_COMPILE", "auto"), "auto")
        self.auto = mode == "auto"
        methods = {m.method for m in model.modules() if isinstance(m, _Quantizer)} or {None}
        self.speedup = min(AUTO_COMPILE_SPEEDUP.get(m, AUTO_COMPILE_SPEEDUP[None]) for m in methods)
        self.net, self.batch, self.steps_left, self.ddp = net, batch, steps_left, ddp
        self.mode: bool | str = mode
        self.backend = os.environ.get("LOWBIT_COMPILE_BACKEND", "inductor")  # "eager": Dynamo only (tests)
        self._model, self._key = model, (channels_last, cfg.amp, ddp, cfg.device)
        self._structure: tuple | None = None
        self._times: list[float] = []
        self._steps = 0
        self.compiled: nn.Module | None = None
        self.compile_seconds: float | None = None  # the first compiled step: tracing, compiling and running
        if mode is True:
            self._compile()

    def _compile(self) -> None:
        self.compiled = torch.compile(self.net, backend=self.backend)
        self.mode = True

    def structure(self, inputs: Any) -> tuple:
        """What a compiled graph is specialised to: module types, parameter and buffer shapes, inputs, settings
        (not the bits: they are buffer values)."""
        leaves = torch.utils._pytree.tree_leaves(inputs)
        return (tuple((n, type(m).__qualname__) for n, m in self._model.named_modules()),
                tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in self._model.named_parameters()),
                tuple((n, tuple(b.shape), b.dtype) for n, b in self._model.named_buffers()),
                tuple((tuple(t.shape), t.dtype, t.device.type) for t in leaves if isinstance(t, torch.Tensor)),
                self._key, self.backend, torch.get_num_threads())

    def _marker(self) -> Path:
        """A file in Inductor's cache folder saying that this structure's graph was compiled into it."""
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        digest = hashlib.sha256(repr((self._structure, torch.__version__)).encode()).hexdigest()[:20]
        return Path(cache_dir()) / "lowbit-compiled" / digest

    def net_for(self, inputs: Any) -> nn.Module:
        """The module to run this batch with."""
        if self._structure is None:
            self._structure = self.structure(inputs)
            if self.mode == "auto" and self._structure in _COMPILED:
                self._compile()
        self._last_len = batch_len(inputs)
        if self.compiled is not None and self._last_len == self.batch:
            return self.compiled
        return self.net

    def step_done(self, seconds: float, compiled: bool) -> None:
        """Record a finished step; under ``"auto"``, decide once the probe steps are timed."""
        self._steps += 1
        if compiled and self.compile_seconds is None:
            self.compile_seconds = seconds
            _COMPILED.add(self._structure)
            with contextlib.suppress(OSError):
                marker = self._marker()
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{seconds:.1f}\n")
        if self.mode != "auto" or self._steps == 1 or self._last_len != self.batch:
            return
        self._times.append(seconds)
        if len(self._times) < AUTO_COMPILE_PROBE_STEPS:
            return
        t = statistics.median(self._times)
        if self.ddp:
            t = dist.all_reduce_sum(torch.tensor([t], dtype=torch.float64)).item() / dist.world_size()
        saved = (self.steps_left - self._steps) * t * (1 - 1 / self.speedup)
        if saved > self.expected_compile_seconds():
            self._compile()
        else:
            self.mode = False

    def expected_compile_seconds(self) -> float:
        if self._structure in _COMPILED:
            return 0.0
        try:
            warm = self._marker().exists()
        except OSError:
            warm = False
        return AUTO_COMPILE_WARM_S if warm else AUTO_COMPILE_COLD_S

    def give_up(self, error: Exception) -> bool:
        """Under ``"auto"``, after ``error`` from a compiled step: warn once, run eagerly from now on."""
        if not self.auto or self.compiled is None or isinstance(error, LowbitError):
            return False
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(f"torch.compile failed ({type(error).__name__}: {first[:200]}); training eagerly "
                      "(--no-compile skips the attempt)", stacklevel=2)
        self.compiled, self.mode = None, False
        return True


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
        data_parallel: bool = True,
        loss_fn: LossFn | None = None,
        metric: Any = None) -> FitState:
    """Train ``model`` in place on ``data.train``; validate on ``data.val`` after every epoch.

    ``data`` holds any sources of :mod:`lowbit.data.protocol`. ``loss_fn(outputs, batch)`` replaces the
    cross-entropy; ``metric`` (:mod:`lowbit.metrics`) adds ``val_metric`` to every epoch's row.
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
    channels_last = prefers_channels_last(model, cfg.channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = optimizer or make_optimizer(model, cfg)
    _state_follows_params(optimizer)  # a resumed optimizer loaded its state beside the model's CPU parameters
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    taps = _FeatureTaps(model, teacher, cfg.distill_features) if teacher is not None and cfg.distill_features else None
    net = _data_parallel(model, data, cfg, world) if ddp else model
    n_train = num_examples(data.train)
    per_epoch = cfg.examples_per_epoch or n_train
    local_batch = cfg.batch_size // world
    if ddp:  # every rank must take the same number of steps: equal shards of each epoch
        steps_per_epoch = num_batches(data.train, local_batch, _even(min(per_epoch, n_train), world) // world)
    else:
        steps_per_epoch = num_batches(data.train, cfg.batch_size, per_epoch)
    shard = (rank, world) if ddp else None
    n_epochs = math.ceil(cfg.epochs)
    state = start or FitState()
    quiet = cfg.quiet or not main
    steps_left = sum(num_batches(data.train, local_batch, _epoch_limit(cfg, e, per_epoch, n_train, world) // world)
                     for e in range(state.epoch, math.ceil(cfg.epochs)))
    # which steps run compiled (same parameters: checkpoints save ``model``, never the compiled wrapper)
    compiler = AutoCompile(model, net, cfg, steps_left, local_batch, channels_last=channels_last, ddp=ddp)
    epochs = progress(range(state.epoch, n_epochs), initial=state.epoch, total=n_epochs, desc=desc, quiet=quiet,
                      unit="epoch")
    for epoch in epochs:
        limit = _epoch_limit(cfg, epoch, per_epoch, n_train, world)
        t0 = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0.0, 0
        batches = iterate(data.train, local_batch, train=True, seed=cfg.seed, epoch=epoch, device=device,
                          limit=limit, augmentation=cfg.augmentation, shard=shard)
        bar = progress(batches, total=num_batches(data.train, local_batch, limit // world), desc=f"epoch {epoch + 1}",
                       quiet=quiet)
        lr = cfg.lr
        compiled_steps = 0
        for i, batch in enumerate(bar):
            lr = lr_at(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t_step = time.perf_counter()
            step_net = compiler.net_for(split_batch(batch)[0])
            try:
                loss, out, target = _train_step(step_net, teacher, optimizer, batch, cfg, channels_last, loss_fn,
                                                taps)
            except Exception as e:  # "auto" only: a compiler that fails (no C++ toolchain...) means eager
                if step_net is net or not compiler.give_up(e):
                    raise
                step_net = net
                loss, out, target = _train_step(net, teacher, optimizer, batch, cfg, channels_last, loss_fn, taps)
            loss = loss.item()
            compiler.step_done(time.perf_counter() - t_step, compiled=step_net is not net)
            compiled_steps += step_net is not net
            bad = not math.isfinite(loss)
            if ddp:  # a NaN on any rank stops them all at this step
                bad = bool(dist.all_reduce_sum(torch.tensor([float(bad)], device=device)).item())
            if bad:
                what = f"{loss}" if not math.isfinite(loss) else "non-finite on another rank"
                raise LowbitError(f"loss became {what} in epoch {epoch + 1} (lr {lr:.3g}); lower --lr or check the "
                                  f"data and the checkpoint")
            k = batch_len(split_batch(batch)[0])
            hits = _hits(out, target)
            loss_sum += loss * k
            correct = None if hits is None or correct is None else correct + hits
            seen += k
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        train_s = time.perf_counter() - t0
        if seen == 0:
            raise LowbitError(f"epoch {epoch + 1} saw no training batch; is the training data empty (or a "
                              "generator that was used up by an earlier epoch)?")
        if ddp:
            _sync_buffers(model)
            loss_sum, correct, seen = _sum_over_ranks(loss_sum, -1.0 if correct is None else correct, seen,
                                                      device=device)
            correct, seen = None if correct < 0 else correct, int(seen)
        val_loss, val_acc = _validate(model, data.val, cfg, shard, channels_last, loss_fn)
        state.epoch = epoch + 1
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": _fraction(correct, seen),
               "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": train_s, "examples": seen}
        if compiled_steps:
            row["compiled_steps"] = compiled_steps
            if compiler.compile_seconds is not None and not any("compile_seconds" in r for r in state.rows):
                row["compile_seconds"] = compiler.compile_seconds  # the first compiled step, compile included
        if metric is not None:
            from lowbit.metrics import measure, metric_name

            row["metric"] = metric_name(metric)
            row["val_metric"] = measure(metric, model, data.val, batch_size=cfg.eval_batch_size, device=cfg.device)
        state.rows.append(row)
        shown = row.get("val_metric", val_acc)
        epochs.set_postfix(val=f"{shown:.4f}" if shown is not None else "-")
        if on_epoch_end is not None and main:
            on_epoch_end(state, optimizer)
        if ddp:
            dist.barrier()  # the checkpoint exists for every rank before anyone goes on
        if stop_after is not None and state.epoch >= stop_after:
            break
    if taps is not None:
        taps.remove()
    return state


def _state_follows_params(optimizer: torch.optim.Optimizer) -> None:
    """Per-parameter state (momentum, Adam moments) to its parameter's device and float dtype, as
    ``Optimizer.load_state_dict`` casts it: ``model.to`` moved the parameters in place, so the optimizer still
    holds them but not their state (a resume on CUDA would mix devices). Adam's ``step`` stays put."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if k != "step" and isinstance(v, torch.Tensor):
                    state[k] = v.to(p.device, p.dtype if v.is_floating_point() else v.dtype)


def _epoch_limit(cfg: FitConfig, epoch: int, per_epoch: int, n_train: int, world: int) -> int:
    """Training examples in ``epoch`` (all ranks together): the last one may be a fraction."""
    limit = max(1, round(min(1.0, cfg.epochs - epoch) * per_epoch))
    return _even(min(limit, n_train), world) if world > 1 else limit


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
    n_train = num_examples(data.train)
    per_epoch = min(cfg.examples_per_epoch or n_train, n_train)
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
    """lowbit's in-memory data and a user's map-style Dataset always; a set with its own ``batches``
    (ImageFolder) only if that takes ``shard``; DataLoaders and other iterables never."""
    from lowbit.data.datasets import TensorDataset

    if hasattr(ds, "batches"):
        return "shard" in inspect.signature(ds.batches).parameters
    return isinstance(ds, TensorDataset) or can_shard(ds)


def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers everywhere, so every rank validates (and rank 0 saves) the same model."""
    for b in model.buffers():
        dist.broadcast_(b, 0)


def _sum_over_ranks(*values: float, device) -> list[float]:
    t = dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device))
    return [float(v) for v in t.tolist()]


def _validate(model: nn.Module, ds, cfg: FitConfig, shard: tuple[int, int] | None, channels_last: bool,
              loss_fn: LossFn | None) -> tuple[float, float | None]:
    """Validation split over the ranks and summed; every rank gets the same numbers."""
    if shard is not None and not _can_shard(ds):
        shard = None  # not splittable: every rank evaluates all of it (same model, same result)
    loss_sum, correct, n = _eval_sums(model, ds, cfg.eval_batch_size, cfg.device, channels_last, shard=shard,
                                      loss_fn=loss_fn)
    if shard is not None:
        loss_sum, correct, n = _sum_over_ranks(loss_sum, -1.0 if correct is None else correct, n,
                                               device=next(model.parameters()).device)
        correct = None if correct < 0 else correct
    return loss_sum / max(n, 1), _fraction(correct, n)


def distill_loss(student: Any, teacher: Any, kind: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    """Distillation from the frozen teacher's outputs: KL on softened logits (classification, Hinton et al.
    2015, scaled by T²) or, for embeddings and regression, MSE / (1 - cosine similarity) on the outputs."""
    s, t = logits_of(student), logits_of(teacher).detach()
    if kind == "kl":  # summed over classes, averaged over examples and, for dense (N, C, H, W) logits such as
        # segmentation, over positions: the scale of the cross-entropy it is added to (1:1)
        positions = s[0, 0].numel() if s.dim() > 2 else 1
        return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                        reduction="batchmean", log_target=True) * temperature**2 / positions
    if kind == "mse":
        return F.mse_loss(s.float(), t.float())
    return (1 - F.cosine_similarity(s.flatten(1).float(), t.flatten(1).float(), dim=1)).mean()


class _FeatureTaps:
    """Forward hooks that keep the outputs of the same named modules in the student and the teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: tuple[str, ...]):
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self.names = names
        self._handles = []
        for model, store in ((student, self.student), (teacher, self.teacher)):
            modules = dict(model.named_modules())
            missing = [n for n in names if n not in modules]
            if missing:
                raise LowbitError(f"distill_features: {type(model).__name__} has no module {missing[0]!r}")
            if isinstance(model, torch.fx.GraphModule):  # residual_bits: only modules the graph calls run hooks
                called = {node.target for node in model.graph.nodes if node.op == "call_module"}
                inlined = [n for n in names if n not in called]
                if inlined:
                    raise LowbitError(f"distill_features: {inlined[0]!r} is traced through in the residual-"
                                      "quantized model (its hooks never run); name a layer that it calls")
            for n in names:
                self._handles.append(modules[n].register_forward_hook(self._keep(store, n)))

    @staticmethod
    def _keep(store: dict[str, torch.Tensor], name: str):
        def hook(module, args, output):
            store[name] = first_tensor(output)  # a block may return a tuple (hidden state first)
        return hook

    def loss(self) -> torch.Tensor:
        """Mean over the modules of ``MSE(student feature, teacher feature)``."""
        terms = [F.mse_loss(self.student[n].float(), self.teacher[n].detach().float()) for n in self.names]
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _train_step(model, teacher, optimizer, batch, cfg: FitConfig, channels_last: bool, loss_fn: LossFn | None,
                taps: _FeatureTaps | None = None):
    inputs, target = split_batch(batch)
    inputs = _prep(inputs, channels_last)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
        out = call_model(model, inputs)
        if loss_fn is None:
            loss = default_loss(out, target, cfg.label_smoothing)
        else:
            loss = loss_fn(out, batch)
            _check_scalar(loss)
        if teacher is not None:  # LSQ+KD: task loss and distillation loss weighted 1:1
            with torch.no_grad():
                t_out = call_model(teacher, inputs)
            loss = loss + distill_loss(out, t_out, cfg.distill_loss, cfg.distill_temperature)
            if taps is not None:  # intermediate features (hidden states), weight 1
                loss = loss + taps.loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach().float(), _detach(out), target


def _detach(out: Any) -> Any:
    return out.detach() if isinstance(out, torch.Tensor) else logits_of(out).detach()
