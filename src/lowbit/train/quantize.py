"""``lowbit quantize``: quantize an fp32 run by a plan and fine-tune it with a recipe.

Recipes (methods.md §2–3; values scaled to this data set, where our fp32 recipe uses lr 0.1, wd 5e-4):

* ``lsq`` — LSQ quantizers (learned steps), SGD momentum 0.9, cosine decay without restarts. LSQ's ImageNet
  lr is 1/10 of its fp32 lr for 2/3/4 bits (0.01) and 1/100 for 8 bits (0.001, 1 epoch); we keep those
  ratios to our fp32 lr 0.1. LSQ's weight decay by precision (1e-4 at 4/8 bits, 0.5e-4 at 3, 0.25e-4 at 2,
  i.e. 1×, ½×, ¼× its fp32 decay) is applied as the same ratios of our fp32 decay 5e-4.
* ``faq`` — FAQ quantizers (fixed steps from percentile calibration), SGD momentum 0.9. 8 bits: 1 epoch at
  lr 1e-4. ≤4 bits: lr 0.0015 with exponential decay; FAQ decays ×0.936 per epoch over 110 epochs (a total
  factor ≈ 7e-4), so by default we spread that same total decay over the epochs we run (override
  ``--lr-decay``). Weight decay 5e-4 (FAQ: 1e-4 at its fp32 decay; same ratio).
* ``--distill`` adds knowledge distillation from the frozen fp32 teacher (temperature 1, weights 1:1; LSQ+KD).

For a mixed plan the recipe follows the lowest precision in it. ``--epochs 0`` gives the post-training
(calibration only) accuracy.

Under ``torchrun`` every rank calibrates the same model and ``fit`` trains it data-parallel; rank 0 alone writes
the run directory.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import distributed as dist
from lowbit.data import DataSplits, iterate
from lowbit.errors import LowbitError
from lowbit.io import load_checkpoint, save_checkpoint
from lowbit.quant import Plan, QuantConfig, build_quantized, calibrate_, quantize_
from lowbit.runs import RunDir
from lowbit.train.checkpoint import CHECKPOINT_NAME, build_model, checkpoint_path, loss_name, resolve_loss, run_data
from lowbit.train.loop import FitConfig, FitState, check_batch, check_same_recipe, fit, make_optimizer
from lowbit.train.train import finish_run

RECIPES = ("lsq", "faq")
FP_LR, FP_WD = 0.1, 5e-4
_LSQ_WD_RATIO = {8: 1.0, 4: 1.0, 3: 0.5, 2: 0.25}
_FAQ_TOTAL_DECAY = 0.936**110


def plan_min_bits(plan: Plan) -> int:
    bits = [b for wa in plan.layers.values() for b in wa if b is not None]
    if not bits:
        raise LowbitError("the plan quantizes nothing (all layers float); choose bits such as w4a4")
    return min(bits)


def recipe_fit_config(recipe: str, min_bits: int, epochs: float | None = None, **over: Any) -> FitConfig:
    """The recipe's optimiser settings for a plan whose lowest precision is ``min_bits``; ``over`` wins."""
    if recipe not in RECIPES:
        raise LowbitError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    low = min_bits <= 4
    if recipe == "lsq":
        kw = dict(lr=FP_LR / 10 if low else FP_LR / 100, weight_decay=FP_WD * _LSQ_WD_RATIO.get(min_bits, 1.0),
                  schedule="cosine", nesterov=False, epochs=5 if low else 1)
    else:
        kw = dict(lr=0.0015 if low else 1e-4, weight_decay=FP_WD, schedule="exp" if low else "constant",
                  nesterov=False, epochs=5 if low else 1)
    if epochs is not None:
        kw["epochs"] = epochs
    if recipe == "faq" and low and "lr_decay" not in over:
        kw["lr_decay"] = _FAQ_TOTAL_DECAY ** (1 / max(1.0, kw["epochs"]))
    kw.update({k: v for k, v in over.items() if v is not None})
    return FitConfig(**kw)


def recipe_activation_init(method: str, min_bits: int) -> str:
    """How LSQ's input steps start for a plan whose lowest precision is ``min_bits`` (other quantizers: "mean",
    which they ignore).

    Below 8 bits, the paper's ``2·mean|x|/sqrt(Q_P)``. At 8 bits that rule costs accuracy that one epoch of
    fine-tuning does not win back (resnet20 on Fashion-MNIST: post-training W8A8 −0.57 pt, after the 1-epoch
    recipe −0.52 pt), while the step minimising the quantization MSE loses nothing (+0.04 pt, and +0.04 pt
    after the epoch): the 8-bit recipe starts from it (docs/results/quantization.md).
    """
    return "mse" if method == "lsq" and min_bits >= 8 else "mean"


def calibration_batches(data: DataSplits, batch_size: int = 128, n_batches: int = 5, device="cpu"):
    """The first ``n_batches`` of the training split, un-augmented (LSQ uses the first; FAQ uses five)."""
    batches = []
    for batch in iterate(data.train, batch_size, device=device, limit=batch_size * n_batches):
        batches.append(batch)
        if len(batches) == n_batches:  # a user's DataLoader has its own batch size
            break
    return batches


def prepare_quantized(model_fp: nn.Module, plan: Plan, qcfg: QuantConfig, data: DataSplits, *,
                      device: str = "cpu", batch_size: int = 128, n_batches: int = 5) -> nn.Module:
    """A calibrated quantized copy of ``model_fp`` (the float model is left untouched)."""
    model = copy.deepcopy(model_fp).to(device)
    model = quantize_(model, plan, qcfg)  # a new model with qcfg.residual_bits
    calibrate_(model, calibration_batches(data, batch_size, n_batches, device))
    return model


@dataclass(frozen=True)
class QuantizeConfig:
    source: str
    out: str = "runs/quantize"
    bits: str | None = "w4a4"
    plan_file: str | None = None
    recipe: str = "lsq"
    method: str | None = None  # quantizer: lsq | faq | minmax (default: the recipe's)
    per_channel: bool = False
    quantize_matmuls: bool = False  # also the attention matmuls of Hugging Face encoders
    activation_init: str | None = None  # LSQ input steps: mean (the paper) | mse | percentile; None: the recipe's
    residual_bits: int | None = None  # also quantize the residual stream after each add (QuantConfig.residual_bits)
    share_residual_steps: bool = True  # readers of the stream at its bits take its step (QuantConfig's option)
    first_last_bits: int | None = 8
    distill: bool = False
    data: str | None = None  # None: the fp32 run's own data (its factory and split)
    data_dir: str | None = None
    fit: FitConfig | None = None  # resolved from the recipe when None
    loss: str | None = None  # None: the fp32 run's loss (cross-entropy unless it recorded one)
    metric: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("loss", "metric"):
            if d[key] is None:
                del d[key]
        for key, default in (("quantize_matmuls", False), ("activation_init", None), ("residual_bits", None)):
            if d[key] == default:  # recorded when used: configs of earlier runs compare as before
                del d[key]
        if self.residual_bits is None:
            del d["share_residual_steps"]
        return d


def resolve_plan(model_fp: nn.Module, bits: str | None, plan_file: str | None,
                 first_last_bits: int | None = 8, example_input: Any = None) -> Plan:
    """A plan file, or a preset whose first and last *executed* layers (found by running ``example_input``)
    keep ``first_last_bits``."""
    if plan_file:
        plan = Plan.load(plan_file)
        plan.validate(model_fp)
        return plan
    if not bits:
        raise LowbitError("give --bits (e.g. w4a4) or --plan plan.yaml")
    return Plan.preset(bits, model_fp, first_last_bits=first_last_bits, example_input=example_input)


def quantize_run(cfg: QuantizeConfig, *, resume: bool = False, overwrite: bool = False,
                 stop_after: int | None = None, data: DataSplits | None = None,
                 fit_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize the fp32 run ``cfg.source`` by plan, fine-tune with the recipe, write the run directory."""
    src = load_checkpoint(checkpoint_path(cfg.source))
    if src.get("kind") != "fp32":
        raise LowbitError(f"{cfg.source}: --from needs an fp32 run (from `lowbit train`), found {src.get('kind')}")
    teacher = build_model(src)
    spec = dict(src["spec"])
    data = data or run_data(spec, cfg.data, cfg.data_dir)  # the run's own data: select on its validation split
    _check_input(src, data)
    loss_fn = resolve_loss(cfg.loss or spec.get("loss"))
    if cfg.metric is not None:
        from lowbit.metrics import get_metric

        get_metric(cfg.metric)  # a bad import path fails before anything is written
    if cfg.loss:
        spec["loss"] = loss_name(cfg.loss)
    plan = resolve_plan(teacher, cfg.bits, cfg.plan_file, cfg.first_last_bits, data.example(1))
    method = cfg.method or cfg.recipe
    act_init = cfg.activation_init or recipe_activation_init(method, plan_min_bits(plan))
    qcfg = QuantConfig(method=method, per_channel=cfg.per_channel,
                       quantize_matmuls=cfg.quantize_matmuls, activation_init=act_init,
                       residual_bits=cfg.residual_bits, share_residual_steps=cfg.share_residual_steps)
    fit_cfg = cfg.fit or recipe_fit_config(cfg.recipe, plan_min_bits(plan), **(fit_overrides or {}))
    if cfg.distill:
        fit_cfg = replace(fit_cfg, distill=True)
    cfg = replace(cfg, fit=fit_cfg)
    dist.init_from_env(fit_cfg.device)
    check_batch(teacher, data, loss_fn, device=fit_cfg.device, amp=fit_cfg.amp, what=f"model {spec.get('model')}")
    run = RunDir(cfg.out, resume=resume, overwrite=overwrite, command="quantize")
    ckpt_file = run.file(CHECKPOINT_NAME)
    state = FitState()
    torch.manual_seed(fit_cfg.seed)
    t_prep = time.perf_counter()
    if run.resume and ckpt_file.exists():
        ck = load_checkpoint(ckpt_file, kind="quantized")
        if ck["plan"] != plan.to_dict() or QuantConfig.from_dict(ck["quant_config"]) != qcfg:
            raise LowbitError(f"{ckpt_file}: the checkpoint's plan or quantizer differ from this command; "
                              f"resume with the same options")
        check_same_recipe(ck.get("fit"), fit_cfg, ckpt_file, ck["epoch"])
        model = build_quantized(build_model(src), plan, qcfg, ck["state_dict"])
        optimizer = make_optimizer(model, fit_cfg)
        optimizer.load_state_dict(ck["optimizer"])
        state = FitState(ck["epoch"], run.read_metrics()[: ck["epoch"]])
    else:
        model = prepare_quantized(teacher, plan, qcfg, data, device=fit_cfg.device, batch_size=fit_cfg.batch_size)
        optimizer = make_optimizer(model, fit_cfg)  # after calibration: LSQ steps exist now
    prep_s = time.perf_counter() - t_prep
    run.write_config({"command": "quantize", **cfg.to_dict(), "quant_config": qcfg.to_dict(),
                      "plan": plan.to_dict()})

    def save(st: FitState, opt: torch.optim.Optimizer) -> None:
        if not dist.is_main():
            return
        save_checkpoint(ckpt_file, {"kind": "quantized", "spec": spec, "plan": plan.to_dict(),
                                    "quant_config": qcfg.to_dict(), "state_dict": model.state_dict(),
                                    "optimizer": opt.state_dict(), "epoch": st.epoch, "fit": fit_cfg.to_dict(),
                                    "source": str(cfg.source)})
        run.write_metrics(st.rows)

    recipe = cfg.recipe + ("+kd" if fit_cfg.distill else "")
    t0 = time.perf_counter()
    with run.removed_on_error():
        if fit_cfg.epochs == 0:
            save(state, optimizer)
        else:
            state = fit(model, data, fit_cfg, optimizer=optimizer, start=state, on_epoch_end=save,
                        teacher=teacher if fit_cfg.distill else None, stop_after=stop_after,
                        desc=f"{cfg.bits or 'plan'} {recipe}", loss_fn=loss_fn, metric=cfg.metric)
    head = {"command": "quantize", "model": src["spec"]["model"], "bits": cfg.bits if not cfg.plan_file else "plan",
            "recipe": recipe, "method": qcfg.method,
            "plan": plan.to_dict()["layers"], "calibration_seconds": prep_s}
    return finish_run(run, model, data, fit_cfg, state, head, time.perf_counter() - t0, loss_fn=loss_fn,
                      metric=cfg.metric)


def _check_input(ckpt: dict[str, Any], data: DataSplits) -> None:
    shape = ckpt.get("spec", {}).get("input_shape")
    if shape and data.input_shape is not None and list(shape) != list(data.input_shape):
        raise LowbitError(f"the model expects inputs {tuple(shape)} but data set {data.name} gives "
                          f"{tuple(data.input_shape)}")


def load_quantized_run(run: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    ck = load_checkpoint(checkpoint_path(run), kind="quantized")
    return build_model(ck), ck
