"""Slow end-to-end check on the real Fashion-MNIST files: train → quantize → export → bit-exact runtime."""

import os

import pytest

from tests.conftest import FMNIST_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")),
                       reason="Fashion-MNIST not installed"),
]


def test_fashion_mnist_pipeline(tmp_path):
    from lowbit.data import get_data
    from lowbit.deploy.verify import verify
    from lowbit.export.exporter import export_run
    from lowbit.export.simulate import Simulation
    from lowbit.runtime.engine import IntegerModel
    from lowbit.train import FitConfig, QuantizeConfig, TrainConfig, quantize_run, train

    data = get_data("fashion-mnist", FMNIST_DIR)
    fp = train(TrainConfig(model="resnet8", out=str(tmp_path / "fp"), fit=FitConfig(epochs=1, quiet=True)), data=data)
    assert fp["test_acc"] > 0.80
    q = quantize_run(QuantizeConfig(source=str(tmp_path / "fp"), out=str(tmp_path / "q"), bits="w4a4"), data=data,
                     fit_overrides={"epochs": 0.2, "quiet": True})
    assert q["test_acc"] > fp["test_acc"] - 0.05
    result = export_run(tmp_path / "q", tmp_path / "m.lowbit")
    runtime = IntegerModel.load(result.path)
    report = verify(runtime, data.test.images[:1000], data.test.labels[:1000], simulation=Simulation(result.lowered),
                    fake_quant=result.lowered.model)
    assert report["simulation"]["bit_exact"]
    assert result.file_bytes * 4 < result.fp32_bytes
