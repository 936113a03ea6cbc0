"""The independent lowering check: the real export passes; a wrong batch-norm fold, which the simulation cannot
see (it shares the lowering's constants), fails it, naming the layer."""

import pytest
import torch

import lowbit.export.capture as capture
from lowbit.deploy import check_lowering, format_report, verify
from lowbit.export.simulate import Simulation
from lowbit.runtime.engine import IntegerModel
from tests.export.test_user_models import ResidualNet, _export, _pixels, _quantized, _randomise_bn

N_BN = 5  # stem + two convs in each of the two blocks


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
