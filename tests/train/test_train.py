import json
import math
import os

import pytest
import torch

from lowbit.data import synthetic
from lowbit.errors import LowbitError
from lowbit.io import load_checkpoint
from lowbit.models import create_model
from lowbit.train import FitConfig, TrainConfig, evaluate, fit, load_run_model, lr_at, train
from tests.conftest import FMNIST_DIR


def _cfg(out, **kw):
    fit_kw = dict(epochs=3, batch_size=64, lr=0.05, quiet=True, seed=1)
    fit_kw.update(kw)
    return TrainConfig(model="resnet8", width=0.5, data="synthetic", out=str(out), fit=FitConfig(**fit_kw))


def test_a_few_steps_lower_the_loss():
    data = synthetic(n_train=256)
    model = create_model("mlp")
    before, _ = evaluate(model, data.train)
    fit(model, data, FitConfig(epochs=2, batch_size=32, lr=0.05, quiet=True))
    after, _ = evaluate(model, data.train)
    assert after < 0.7 * before


def test_run_directory_contents(tmp_path):
    s = train(_cfg(tmp_path / "r", epochs=2), data=synthetic())
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "curves.png", "report.md"} <= names
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "val_acc", "lr", "seconds"} <= set(rows[0])
    assert s["complete"] and 0 <= s["test_acc"] <= 1 and s["parameters"] > 0
    model, ckpt = load_run_model(tmp_path / "r")
    assert ckpt["kind"] == "fp32" and ckpt["epoch"] == 2


def test_kill_and_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    data = synthetic()
    full = train(_cfg(tmp_path / "full"), data=data)
    part = train(_cfg(tmp_path / "part"), data=data, stop_after=1)
    assert not part["complete"]
    resumed = train(_cfg(tmp_path / "part"), data=data, resume=True)
    assert resumed["complete"] and resumed["epochs"] == 3
    assert abs(resumed["test_acc"] - full["test_acc"]) <= 0.001
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_other_fit_settings(tmp_path):
    data = synthetic(n_train=128)
    train(_cfg(tmp_path / "run", epochs=2), data=data, stop_after=1)
    with pytest.raises(LowbitError, match=r"trained with other settings \(lr 0.05 -> 0.1\)"):
        train(_cfg(tmp_path / "run", epochs=2, lr=0.1), data=data, resume=True)
    resumed = train(_cfg(tmp_path / "run", epochs=2, eval_batch_size=64, compile=False), data=data, resume=True)
    assert resumed["complete"]  # settings that do not change the recipe may differ


def test_extending_a_run_that_ended_inside_an_epoch_is_refused(tmp_path):
    """More epochs continue a run of whole epochs; from 0.5 epochs the loop would have nothing left to run and
    the config would record epochs it never trained."""
    data = synthetic(n_train=128)
    train(_cfg(tmp_path / "run", epochs=0.5), data=data)
    with pytest.raises(LowbitError, match="ended inside an epoch"):
        train(_cfg(tmp_path / "run", epochs=1), data=data, resume=True)
    train(_cfg(tmp_path / "whole", epochs=1), data=data)
    assert train(_cfg(tmp_path / "whole", epochs=1.5), data=data, resume=True)["complete"]
    rows = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    train(_cfg(tmp_path / "killed", epochs=1.5), data=data, stop_after=1)  # the partial epoch never ran
    assert train(_cfg(tmp_path / "killed", epochs=2), data=data, resume=True)["complete"]


def test_optimizer_state_follows_the_parameters_to_the_device():
    """A resumed optimizer loads its momentum beside the CPU-built model; fit moves the model (to CUDA), so the
    state must follow. A CPU run gets the same mismatch to repair from state in another dtype."""
    model = create_model("resnet8", width=0.25)
    cfg = FitConfig(epochs=1, batch_size=32, lr=0.05, quiet=True, examples_per_epoch=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fit(model, synthetic(n_train=64), cfg, optimizer=optimizer)
    for state in optimizer.state.values():
        state["momentum_buffer"] = state["momentum_buffer"].double()
    fit(model, synthetic(n_train=64), cfg, optimizer=optimizer)
    assert {s["momentum_buffer"].dtype for s in optimizer.state.values()} == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_cuda(tmp_path):
    data = synthetic()
    train(_cfg(tmp_path / "part", device="cuda"), data=data, stop_after=1)
    assert train(_cfg(tmp_path / "part", device="cuda"), data=data, resume=True)["complete"]


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    train(_cfg(tmp_path / "r", epochs=1), data=synthetic())
    with pytest.raises(LowbitError, match="--resume"):
        train(_cfg(tmp_path / "r", epochs=1), data=synthetic())
    with pytest.raises(LowbitError, match="nothing to resume"):
        train(_cfg(tmp_path / "other", epochs=1), data=synthetic(), resume=True)


def test_nan_loss_is_a_clear_error(tmp_path):
    with pytest.raises(LowbitError, match="loss became"):
        train(_cfg(tmp_path / "r", epochs=1, lr=1e30), data=synthetic())


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "exp", "constant"])
def test_schedules_are_finite_and_start_right(schedule):
    cfg = FitConfig(epochs=4, lr=0.1, schedule=schedule, lr_decay=0.5)
    lrs = [lr_at(cfg, s, 10) for s in range(40)]
    assert all(math.isfinite(x) and 0 <= x <= 0.1 + 1e-12 for x in lrs)
    if schedule == "exp":
        assert lrs[0] == 0.1 and lrs[10] == 0.05 and abs(lrs[30] - 0.1 * 0.5**3) < 1e-12 and lrs[31] < lrs[30]
    if schedule == "cosine":
        assert lrs[0] == 0.1 and lrs[-1] < 0.001


def test_bad_config_values():
    with pytest.raises(LowbitError):
        FitConfig(schedule="linear")
    with pytest.raises(LowbitError):
        FitConfig(lr=-1)
    with pytest.raises(LowbitError):
        FitConfig(device="tpu")


def test_zero_epochs_still_writes_a_run_that_quantize_accepts(tmp_path):
    from lowbit.train import QuantizeConfig, quantize_run

    data = synthetic(n_train=128)
    s = train(_cfg(tmp_path / "r", epochs=0), data=data)
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt", kind="fp32")
    assert ckpt["epoch"] == 0 and ckpt["spec"]["model"] == "resnet8"
    assert s["complete"] and s["epochs"] == 0 and 0 <= s["val_acc"] <= 1 and 0 <= s["test_acc"] <= 1
    q = quantize_run(QuantizeConfig(source=str(tmp_path / "r"), out=str(tmp_path / "q"), data="synthetic",
                                    fit=FitConfig(epochs=0, quiet=True)), data=data)
    assert q["bits"] == "w4a4"


def test_weights_initialise_the_model(tmp_path):
    from safetensors.torch import save_file

    data = synthetic(n_train=128)
    src = create_model("resnet8", width=0.5)
    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    cfg = _cfg(tmp_path / "r", epochs=0)
    s = train(TrainConfig(**{**cfg.__dict__, "weights": str(tmp_path / "w.safetensors")}), data=data)
    model, _ = load_run_model(tmp_path / "r")
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    assert s["weights"] == str(tmp_path / "w.safetensors")
    assert abs(s["val_acc"] - evaluate(src, data.val)[1]) < 1e-9
    with pytest.raises(LowbitError, match="do not fit"):
        train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "r2"), "model": "mlp",
                             "width": None, "weights": str(tmp_path / "w.safetensors")}), data=data)


def test_unset_amp_leaves_the_config_dict_as_before():
    assert "amp" not in FitConfig().to_dict()  # fingerprints of runs made before amp existed still match
    assert FitConfig(amp="bf16").to_dict()["amp"] == "bf16"
    # the dict rebuilds the config, except that compile="auto" is recorded as False (the default before auto)
    assert FitConfig(**FitConfig().to_dict()) == FitConfig(compile=False)


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="Fashion-MNIST not installed")
def test_val_fraction_travels_with_the_run(tmp_path):
    from lowbit.sensitivity.api import load_data

    train(TrainConfig(model="mlp", out=str(tmp_path / "r"), val_fraction=0.05,
                      fit=FitConfig(epochs=0, quiet=True)))
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt", kind="fp32")
    assert ckpt["spec"]["val_fraction"] == 0.05
    assert len(load_data(ckpt, None).val) == 3000  # later stages select on the run's own validation images
    default = train(TrainConfig(model="mlp", out=str(tmp_path / "d"), fit=FitConfig(epochs=0, quiet=True)))
    assert "val_fraction" not in load_checkpoint(tmp_path / "d" / "checkpoint.pt")["spec"] and default["complete"]


def test_the_batch_check_leaves_mode_device_and_rng_as_they_were():
    from lowbit.train.loop import check_batch

    model = create_model("mlp").train()
    rng = torch.random.get_rng_state()
    check_batch(model, synthetic(n_train=64), amp="bf16")
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(LowbitError, match="cannot run a batch of synthetic: RuntimeError: mat1 and mat2"):
        check_batch(create_model("mlp", image_size=14), synthetic(n_train=64), what="the model")
