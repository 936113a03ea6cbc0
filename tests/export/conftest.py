"""A tiny trained and quantized model on synthetic data, shared by the export tests (seconds to make)."""

import pytest

from lowbit.data import synthetic
from lowbit.train import FitConfig, QuantizeConfig, TrainConfig, quantize_run, train


def make_quantized_run(root, bits="w4a4", per_channel=False, plan_file=None):
    """fp32 resnet8 (width 0.5) trained 3 short epochs (~70% on synthetic data), then quantized and fine-tuned
    half an epoch: the quantized run directory."""
    data = synthetic()
    fp32, quant = root / "fp32", root / f"q_{bits}{'_pc' if per_channel else ''}"
    if not (fp32 / "checkpoint.pt").exists():
        fit = FitConfig(epochs=3, batch_size=16, lr=0.1, quiet=True, channels_last=False, augmentation="none")
        train(TrainConfig(model="resnet8", width=0.5, data="synthetic", out=str(fp32), fit=fit), data=data)
    cfg = QuantizeConfig(source=str(fp32), out=str(quant), bits=None if plan_file else bits, plan_file=plan_file,
                         per_channel=per_channel, data="synthetic")
    quantize_run(cfg, data=data, fit_overrides=dict(epochs=0.5, batch_size=16, quiet=True, channels_last=False,
                                                    augmentation="none"))
    return quant


@pytest.fixture(scope="session")
def quantized_run(tmp_path_factory):
    return make_quantized_run(tmp_path_factory.mktemp("runs"))
