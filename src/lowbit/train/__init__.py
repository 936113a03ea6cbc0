"""Training: one readable loop (``fit``) for fp32 training and quantized fine-tuning."""

from lowbit.train.checkpoint import build_model, checkpoint_path, load_run_model
from lowbit.train.loop import FitConfig, FitState, evaluate, fit, lr_at, make_optimizer, predict
from lowbit.train.train import TrainConfig, finish_run, train

__all__ = ["FitConfig", "FitState", "TrainConfig", "build_model", "checkpoint_path", "evaluate", "finish_run",
           "fit", "load_run_model", "lr_at", "make_optimizer", "predict", "train"]

from lowbit.train.quantize import (  # noqa: E402
    QuantizeConfig,
    calibration_batches,
    load_quantized_run,
    prepare_quantized,
    quantize_run,
    recipe_activation_init,
    recipe_fit_config,
)

__all__ += ["QuantizeConfig", "calibration_batches", "load_quantized_run", "prepare_quantized", "quantize_run",
            "recipe_activation_init", "recipe_fit_config"]
