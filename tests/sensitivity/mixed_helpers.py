"""A tiny trained W4A4 run shared by the sensitivity, frontier and CLI tests (built once per session)."""

from pathlib import Path

from lowbit.data import synthetic
from lowbit.train import FitConfig, QuantizeConfig, TrainConfig, quantize_run, train

_BUILT: dict[Path, tuple[Path, object]] = {}


def data():
    return synthetic(n_train=256, n_val=128, n_test=128)


def w4a4_run(root: Path):
    """``(run_dir, data)``: resnet8 at width 0.5 (narrower convs crash torch's channels-last backward on CPU),
    fp32 for 3 epochs, then W4A4 LSQ for 1 epoch, on synthetic data."""
    if root not in _BUILT:
        d = data()
        fp = root / "fp32"
        train(TrainConfig(model="resnet8", width=0.5, data="synthetic", out=str(fp),
                          fit=FitConfig(epochs=3, batch_size=32, lr=0.05, quiet=True)), data=d)
        q = root / "w4a4"
        quantize_run(QuantizeConfig(source=str(fp), out=str(q), data="synthetic"), data=d,
                     fit_overrides={"epochs": 1, "batch_size": 32, "quiet": True})
        _BUILT[root] = (q, d)
    return _BUILT[root]
