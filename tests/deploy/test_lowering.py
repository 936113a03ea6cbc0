"""The independent lowering check: the real export passes; a wrong batch-norm fold, which the simulation cannot
see (it shares the lowering's constants), fails it, naming the layer."""

from pathlib import Path

import pytest
import torch

import lowbit
import lowbit.export.capture as capture
from lowbit.deploy import check_lowering, format_report, verify
from lowbit.export.simulate import Simulation
from lowbit.runtime.engine import IntegerModel
from tests.export.test_user_models import ResidualNet, _export, _pixels, _quantized, _randomise_bn

N_BN = 5  # stem + two convs in each of the two blocks
ASSET = Path(lowbit.__file__).parent / "assets" / "resnet8-fashion-mnist.safetensors"


def _model():
    return _quantized(_randomise_bn(ResidualNet()))


def test_real_export_passes(tmp_path):
    model = _model()
    runtime = IntegerModel.load(_export(model, tmp_path).path)
    result = check_lowering(runtime, model, _pixels(64, seed=2))
    assert result.ok, result.failures
    assert set(result.layers) == {"stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "fc"}
    assert sum(f.batch_norm is not None for f in result.folds.values()) == N_BN
    assert all(c.max_diff <= 1 for c in result.layers.values()) and result.logits_max_diff_relative < 1e-3
    assert result.summary().startswith("lowering vs fake-quant model (independent, 64 images): OK")
    assert model.training is False


def _wrong_eps(bn, name):
    sigma = torch.sqrt(bn.running_var.double() + 1e-3)  # the model's eps is 1e-5
    g = bn.weight.detach().double() / sigma
    return g, bn.bias.detach().double() - g * bn.running_mean.double()


def _no_beta(bn, name):
    g = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return g, -g * bn.running_mean.double()


@pytest.mark.parametrize("wrong_fold", [_wrong_eps, _no_beta], ids=["wrong_eps", "dropped_bn_bias"])
def test_wrong_batch_norm_fold_is_caught(tmp_path, monkeypatch, wrong_fold):
    model = _model()
    monkeypatch.setattr(capture, "_bn_affine", wrong_fold)
    exported = _export(model, tmp_path)
    runtime = IntegerModel.load(exported.path)
    x = _pixels(64, seed=2)
    # the simulation replays the same (wrong) constants: bit-exact, so it cannot tell
    assert torch.equal(Simulation(exported.lowered).run_int(x).to(torch.int64), runtime.run_int(x).to(torch.int64))
    result = check_lowering(runtime, model, x)
    assert not result.ok
    bad = {line.split(":")[0] for line in result.failures}
    assert {"stem", "block1.conv1"} <= bad and "fc" not in {n for n in bad if "batch norm" in n}
    assert any("folded batch norm bn off by" in line for line in result.failures)
    assert "WRONG" in result.summary()


def test_verify_reports_the_lowering_line(tmp_path):
    model = _model()
    exported = _export(model, tmp_path)
    runtime = IntegerModel.load(exported.path)
    report = verify(runtime, _pixels(32, seed=4), fake_quant=model, simulation=Simulation(exported.lowered),
                    lowering_images=16)
    assert report["lowering"]["ok"] and report["lowering"]["images"] == 16
    lines = format_report(report).splitlines()
    assert lines[-1].startswith("lowering vs fake-quant model (independent, 16 images): OK, 6 layers' input codes")


def test_code_tolerance_widens_only_for_a_larger_epilogue_budget():
    from lowbit.deploy.lowering import code_tolerance

    assert code_tolerance(None) == code_tolerance(2.0**-10) == 0.002  # default files keep the 0.2% bound
    assert code_tolerance(2.0**-7) == 16 * 2.0**-7 and code_tolerance(0.5) == 0.5  # at most half the codes
    for bad in ("x", float("nan"), float("inf"), -1.0, 0.6):  # not a budget an export writes: the default
        assert code_tolerance(bad) == 0.002


def test_a_post_training_model_passes_layer_by_layer(tmp_path):
    """Min/max W4A4 of the shipped resnet8, no fine-tuning: the classifier's 8-bit inputs average 49 4-bit codes
    onto ties of their finer grid, so one code off upstream used to move many of them (WRONG on a correct
    export). Given the runtime's own inputs, each layer differs only by its own rounding."""
    from lowbit.data import synthetic
    from lowbit.export.exporter import export_model
    from lowbit.export.simulate import normalize_pixels
    from lowbit.models import create_model, load_weights_
    from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_

    model = create_model("resnet8", 10, in_channels=1)
    load_weights_(model, ASSET)
    quantize_(model, Plan.preset("w4a4", model), QuantConfig(method="minmax"))
    val = synthetic(n_val=256).val
    pixels = {"mean": [float(val.mean)], "std": [float(val.std)]}
    calibrate_(model, [normalize_pixels(val.images[:128], pixels["mean"], pixels["std"])])
    exported = export_model(model.eval(), tmp_path / "m.lowbit", input_shape=(1, 28, 28), pixels=pixels)
    result = check_lowering(IntegerModel.load(exported.path), model, val.images)
    assert result.ok, result.failures
    assert max(c.frac_differing for c in result.layers.values()) < 1e-3
    assert all(c.max_diff <= 1 for c in result.layers.values()) and result.logits_max_diff_relative < 1e-5
