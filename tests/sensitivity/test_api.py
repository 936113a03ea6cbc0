import pytest

from lowbit.errors import LowbitError
from lowbit.io import load_checkpoint, save_checkpoint
from lowbit.sensitivity import SensitivityTable, score_layers, sensitivity


def test_run_directory_outputs(w4a4, tmp_path):
    run, _ = w4a4
    t = sensitivity(run, "eagl", tmp_path / "s", options={"variant": "h4-h2"})
    assert {"config.yaml", "sensitivity.json", "report.md"} <= {p.name for p in (tmp_path / "s").iterdir()}
    back = SensitivityTable.load(tmp_path / "s" / "sensitivity.json")
    assert back == t and t.config["variant"] == "h4-h2" and t.config["source"] == str(run)
    assert t.layers[0] == "layer1.0.conv1" and "conv1" not in t.layers and "fc" not in t.layers
    assert t.render() in (tmp_path / "s" / "report.md").read_text()
    with pytest.raises(LowbitError, match="already holds a run"):
        sensitivity(run, "eagl", tmp_path / "s")


def test_random_scores_are_seeded(w4a4, tmp_path):
    run, data = w4a4
    a = sensitivity(run, "random", tmp_path / "a", seed=3)
    b = sensitivity(run, "random", tmp_path / "b", seed=3)
    c = sensitivity(run, "random", tmp_path / "c", seed=4)
    assert a.scores == b.scores != c.scores
    assert all(0 <= s < 1 for s in a.scores.values())


def test_hessian_on_the_run(w4a4, tmp_path):
    run, data = w4a4
    t = sensitivity(run, "hessian", tmp_path / "h", data=data, options={"max_iter": 2, "examples": 32})
    assert t.config["iterations"] <= 2 and t.passes["hvp"] == t.config["iterations"]  # one batch of 32
    assert len(t.rows) == 8


def test_not_a_w4a4_run(w4a4, tmp_path):
    run, _ = w4a4
    with pytest.raises(LowbitError, match="needs a W4A4-quantized run"):
        sensitivity(run.parent / "fp32", "eagl", tmp_path / "x")
    with pytest.raises(LowbitError, match="no such run"):
        sensitivity(tmp_path / "missing", "eagl", tmp_path / "x")
    ck = load_checkpoint(run / "checkpoint.pt")
    layers = dict(ck["plan"]["layers"])
    layers["layer2.0.conv1"] = [2, 2]
    save_checkpoint(tmp_path / "w2.pt", {**ck, "plan": {"layers": layers}})
    with pytest.raises(LowbitError, match="not a W4A4-quantized run.*layer2.0.conv1 at w2a2"):
        sensitivity(tmp_path / "w2.pt", "eagl", tmp_path / "x")


def test_unknown_method_and_options(w4a4, tmp_path):
    run, data = w4a4
    with pytest.raises(LowbitError, match="unknown sensitivity method"):
        sensitivity(run, "fisher", tmp_path / "x")
    with pytest.raises(LowbitError, match="unknown option"):
        sensitivity(run, "eagl", tmp_path / "x", options={"tol": 0.1})
    from lowbit.sensitivity import load_w4a4_run

    model, _ = load_w4a4_run(run)
    with pytest.raises(LowbitError, match="needs data"):
        score_layers("alps", model)


def test_alps_amp_is_optional_and_absent_from_defaults():
    from lowbit.sensitivity.api import method_options

    assert "amp" not in method_options("alps", None)  # tables made before amp existed keep their keys
    assert method_options("alps", {"amp": "bf16"})["amp"] == "bf16"
    with pytest.raises(LowbitError, match="amp"):
        method_options("hessian", {"amp": "bf16"})


@pytest.mark.parametrize("method,options", [
    ("hessian", {"batch_size": 0}), ("hessian", {"tol": -1.0}), ("hessian", {"max_iter": 0}),
    ("hessian", {"rse": "0.1"}), ("alps", {"epochs": 0}), ("alps", {"examples_per_epoch": -5}),
])
def test_sizes_and_tolerances_must_be_positive(method, options):
    from lowbit.sensitivity.api import method_options

    with pytest.raises(LowbitError, match=f"option {next(iter(options))} must be a number > 0"):
        method_options(method, options)
