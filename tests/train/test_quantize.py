import pytest
import torch

from lowbit.data import synthetic
from lowbit.errors import LowbitError
from lowbit.quant import QuantConv2d
from lowbit.train import (
    FitConfig,
    QuantizeConfig,
    TrainConfig,
    evaluate,
    load_quantized_run,
    quantize_run,
    recipe_activation_init,
    recipe_fit_config,
    train,
)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp") / "fp32"
    data = synthetic(n_train=384)
    train(TrainConfig(model="resnet8", width=0.5, data="synthetic", out=str(out),
                      fit=FitConfig(epochs=3, batch_size=64, lr=0.05, quiet=True)), data=data)
    return out, data


def _q(src, out, **kw):
    kw.setdefault("bits", "w4a4")
    return QuantizeConfig(source=str(src), out=str(out), data="synthetic", **kw)


def test_recipes_follow_the_papers_ratios():
    lsq4, lsq8, lsq2 = (recipe_fit_config("lsq", b) for b in (4, 8, 2))
    assert (lsq4.lr, lsq8.lr, lsq8.epochs) == (0.01, 0.001, 1)
    assert lsq2.weight_decay == pytest.approx(lsq4.weight_decay / 4)
    faq4 = recipe_fit_config("faq", 4, epochs=10)
    assert faq4.schedule == "exp" and faq4.lr == 0.0015
    assert faq4.lr_decay**10 == pytest.approx(0.936**110)
    assert recipe_fit_config("faq", 8).lr == 1e-4
    with pytest.raises(LowbitError):
        recipe_fit_config("sgd", 4)


def test_the_8_bit_lsq_recipe_starts_input_steps_from_the_mse_step(fp32_run, tmp_path):
    assert [recipe_activation_init(r, b) for r, b in (("lsq", 8), ("lsq", 4), ("faq", 8))] == ["mse", "mean", "mean"]
    src, data = fp32_run
    inits = {}
    runs = {"w8": {"bits": "w8a8"}, "w4": {}, "w8-mean": {"bits": "w8a8", "activation_init": "mean"},
            "w8-minmax": {"bits": "w8a8", "method": "minmax"}}
    for name, kw in runs.items():
        quantize_run(_q(src, tmp_path / name, **kw), data=data, fit_overrides={"epochs": 0, "quiet": True})
        model, ckpt = load_quantized_run(tmp_path / name)
        q = model.layer1[0].conv1.input_quantizer
        inits[name] = (ckpt["quant_config"].get("activation_init", "mean"), getattr(q, "init", q.method))
    assert inits == {"w8": ("mse", "mse"), "w4": ("mean", "mean"), "w8-mean": ("mean", "mean"),
                     "w8-minmax": ("mean", "minmax")}  # a config that records nothing it does not use


def test_quantize_run_writes_a_rebuildable_run(fp32_run, tmp_path):
    src, data = fp32_run
    s = quantize_run(_q(src, tmp_path / "q"), data=data, fit_overrides={"epochs": 1, "quiet": True})
    assert s["complete"] and s["bits"] == "w4a4" and s["plan"]["conv1"] == [8, 8]
    model, ckpt = load_quantized_run(tmp_path / "q")
    assert ckpt["kind"] == "quantized" and isinstance(model.layer1[0].conv1, QuantConv2d)
    _, acc = evaluate(model, data.test)
    assert acc == pytest.approx(s["test_acc"])


def test_post_training_only_and_distillation(fp32_run, tmp_path, capsys):
    src, data = fp32_run
    ptq = quantize_run(_q(src, tmp_path / "ptq", method="minmax"), data=data,
                       fit_overrides={"epochs": 0, "quiet": True})
    assert ptq["epochs"] == 0 and ptq["method"] == "minmax"
    kd = quantize_run(_q(src, tmp_path / "kd", bits="w2a2", recipe="faq", distill=True), data=data,
                      fit_overrides={"epochs": 1})
    assert kd["recipe"] == "faq+kd"
    assert "w2a2 faq+kd: 1/1 epoch" in capsys.readouterr().err  # the progress line names the recipe the run records


def test_quantize_resume_matches_uninterrupted(fp32_run, tmp_path):
    src, data = fp32_run
    over = {"epochs": 2, "quiet": True, "batch_size": 64}
    full = quantize_run(_q(src, tmp_path / "full"), data=data, fit_overrides=over)
    quantize_run(_q(src, tmp_path / "part"), data=data, fit_overrides=over, stop_after=1)
    res = quantize_run(_q(src, tmp_path / "part"), data=data, fit_overrides=over, resume=True)
    assert res["epochs"] == 2 and abs(res["test_acc"] - full["test_acc"]) <= 0.001
    a, _ = load_quantized_run(tmp_path / "full")
    b, _ = load_quantized_run(tmp_path / "part")
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), k


def test_plan_file_and_errors(fp32_run, tmp_path):
    src, data = fp32_run
    plan = tmp_path / "plan.yaml"
    plan.write_text("layers:\n  conv1: [8, 8]\n  layer1.0.conv1: [2, 2]\n  fc: [8, 8]\n")
    s = quantize_run(_q(src, tmp_path / "p", bits=None, plan_file=str(plan)), data=data,
                     fit_overrides={"epochs": 1, "quiet": True})
    assert s["plan"]["layer1.0.conv1"] == [2, 2] and "layer1.0.conv2" not in s["plan"]
    plan.write_text("layers:\n  nope: [4, 4]\n")
    with pytest.raises(LowbitError, match="nope"):
        quantize_run(_q(src, tmp_path / "p2", bits=None, plan_file=str(plan)), data=data)
    with pytest.raises(LowbitError, match="fp32 run"):
        quantize_run(_q(tmp_path / "p", tmp_path / "p3"), data=data)
