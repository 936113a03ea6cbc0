"""``FitConfig.compile``: True / False / "auto", resume and checkpoints under compile, the NaN guard, fallback.

Most cases compile with Dynamo's ``eager`` backend (``LOWBIT_COMPILE_BACKEND=eager``: tracing and guards, no
Inductor), which exercises every path of the loop in seconds; one slow case runs Inductor for real.
"""

import copy

import pytest
import torch

from lowbit.data import synthetic
from lowbit.errors import LowbitError
from lowbit.io import load_checkpoint
from lowbit.models import create_model
from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
from lowbit.train import FitConfig, QuantizeConfig, TrainConfig, fit, loop, quantize_run, train
from lowbit.train.quantize import calibration_batches


@pytest.fixture(autouse=True)
def dynamo_only(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_COMPILE_BACKEND", "eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("LOWBIT_COMPILE", raising=False)
    monkeypatch.setattr(loop, "_COMPILED", set())
    torch._dynamo.reset()


def _qmodel(data, plan="w4a4"):
    torch.manual_seed(0)
    m = create_model("resnet8", width=0.25)
    quantize_(m, Plan.preset(plan, m), QuantConfig())
    calibrate_(m, calibration_batches(data, 32, 1))
    return m


def _fit(model, data, **kw):
    cfg = dict(epochs=1, batch_size=32, lr=0.02, quiet=True)
    return fit(model, data, FitConfig(**{**cfg, **kw}))


def test_compile_setting_is_checked_and_auto_keeps_old_fingerprints():
    assert FitConfig().compile == "auto"
    assert FitConfig().to_dict()["compile"] is False  # runs started when the default was False still resume
    assert FitConfig(compile=True).to_dict()["compile"] is True
    for bad in ("yes", 1, None):
        with pytest.raises(LowbitError, match="compile"):
            FitConfig(compile=bad)


def test_forced_compile_runs_full_batches_compiled_and_the_partial_one_eagerly():
    data = synthetic(n_train=200)  # 6 batches of 32 and one of 8
    state = _fit(_qmodel(data), data, compile=True)
    assert state.rows[0]["compiled_steps"] == 6


def test_auto_stays_eager_for_a_short_fit_and_expects_little_from_float_models():
    data = synthetic(n_train=256)
    assert "compiled_steps" not in _fit(_qmodel(data), data).rows[0]
    assert loop.AutoCompile(_qmodel(data), None, FitConfig(), 10, 32).speedup == loop.AUTO_COMPILE_SPEEDUP["lsq"]
    assert loop.AutoCompile(create_model("mlp"), None, FitConfig(), 10, 32).speedup == loop.AUTO_COMPILE_SPEEDUP[None]


def test_auto_compiles_when_the_steps_left_repay_it(monkeypatch):
    data = synthetic(n_train=512)  # 16 steps: 1 warm-up, 3 timed, then 12 compiled
    monkeypatch.setattr(loop, "AUTO_COMPILE_COLD_S", 0.0)
    state = _fit(_qmodel(data), data)
    assert state.rows[0]["compiled_steps"] == 16 - 1 - loop.AUTO_COMPILE_PROBE_STEPS


def test_a_structure_compiled_by_an_earlier_process_expects_a_warm_cache():
    data = synthetic(n_train=128)
    model = _qmodel(data)
    _fit(model, data, compile=True)
    x = next(iter(loop.iterate(data.train, 32)))[0]
    loop._COMPILED.clear()  # as in a fresh process; Inductor's cache folder keeps lowbit's marker
    compiler = loop.AutoCompile(model, model, FitConfig(), 100, 32, channels_last=True)
    compiler.net_for(x)
    assert compiler.expected_compile_seconds() == loop.AUTO_COMPILE_WARM_S
    other = loop.AutoCompile(model, model, FitConfig(), 100, 16, channels_last=True)
    other.net_for(x[:16])  # another batch shape: another graph
    assert other.expected_compile_seconds() == loop.AUTO_COMPILE_COLD_S


def test_auto_compiles_at_once_a_structure_compiled_before_with_another_plan():
    data = synthetic(n_train=256)
    _fit(_qmodel(data, "w4a4"), data, compile=True)
    state = _fit(_qmodel(data, "w2a2"), data)  # auto, short: compiled only because the graph exists
    assert state.rows[0]["compiled_steps"] == 8


def test_lowbit_compile_env_overrides_auto(monkeypatch):
    data = synthetic(n_train=128)
    monkeypatch.setenv("LOWBIT_COMPILE", "1")
    assert _fit(_qmodel(data), data).rows[0]["compiled_steps"] == 4
    monkeypatch.setenv("LOWBIT_COMPILE", "0")
    monkeypatch.setattr(loop, "AUTO_COMPILE_COLD_S", 0.0)
    assert "compiled_steps" not in _fit(_qmodel(data), data, epochs=3).rows[-1]


def test_a_failing_compiler_means_eager_under_auto_and_an_error_when_forced(monkeypatch):
    class Broken(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *a, **k):
            raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda net, **kw: Broken(net))
    monkeypatch.setattr(loop, "AUTO_COMPILE_COLD_S", 0.0)
    data = synthetic(n_train=256)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        state = _fit(_qmodel(data), data)
    assert "compiled_steps" not in state.rows[0] and state.rows[0]["train_loss"] > 0
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        _fit(_qmodel(data), data, compile=True)


def test_nan_guard_under_compile():
    data = synthetic(n_train=256)
    with pytest.raises(LowbitError, match="loss became"):
        _fit(_qmodel(data), data, compile=True, lr=1e30)


def test_compiled_quantize_run_checkpoints_plain_keys_and_resumes(tmp_path):
    data = synthetic()
    fp = tmp_path / "fp32"
    train(TrainConfig(model="resnet8", width=0.25, data="synthetic", out=str(fp),
                      fit=FitConfig(epochs=1, batch_size=64, lr=0.1, quiet=True)), data=data)
    over = {"epochs": 2, "batch_size": 64, "lr": 0.02, "quiet": True, "compile": True}
    cfg = QuantizeConfig(source=str(fp), out=str(tmp_path / "q"), data="synthetic")
    part = quantize_run(cfg, fit_overrides=over, stop_after=1)
    keys = load_checkpoint(tmp_path / "q" / "checkpoint.pt")["state_dict"].keys()
    assert not part["complete"] and not any("_orig_mod" in k or "q_min" in k for k in keys)
    resumed = quantize_run(cfg, fit_overrides=over, resume=True)
    full = quantize_run(QuantizeConfig(source=str(fp), out=str(tmp_path / "full"), data="synthetic"),
                        fit_overrides=over)
    assert resumed["complete"] and resumed["epochs"] == 2
    assert abs(resumed["val_acc"] - full["val_acc"]) <= 1 / 128 + 1e-9  # one validation example at most


@pytest.mark.slow
def test_inductor_training_matches_eager_up_to_rounding(monkeypatch):
    """Inductor for real (a minute or more on 2 cores): same steps, losses within float rounding."""
    monkeypatch.delenv("LOWBIT_COMPILE_BACKEND")
    data = synthetic(n_train=256)
    model = _qmodel(data)
    rows = [_fit(copy.deepcopy(model), data, compile=c, epochs=2).rows for c in (False, True)]
    for eager, compiled in zip(*rows):
        assert abs(eager["train_loss"] - compiled["train_loss"]) < 1e-3 * max(1.0, eager["train_loss"])
    assert rows[1][0]["compiled_steps"] == 8
