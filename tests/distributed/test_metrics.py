"""The task-metric hook: resolution and its errors, ALPS and the frontier measuring a metric, the example."""

import importlib.util
import sys
from pathlib import Path

import pytest

from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.frontier import FrontierConfig, frontier
from lowbit.metrics import get_metric, list_metrics, measure, metric_name, register_metric, top1
from lowbit.sensitivity import alps_fit_config, alps_scores, load_w4a4_run
from lowbit.train import evaluate, recipe_fit_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "segmentation_metric.py"
CANDS = ["layer1.0.conv1", "layer2.0.conv2"]


def test_names_strings_and_callables_resolve():
    assert get_metric("top1") is top1 and "top1" in list_metrics()
    assert get_metric("lowbit.metrics:top1") is top1
    assert get_metric(len) is len
    assert metric_name("top1") == "top1" and metric_name(top1) == "top1"
    assert metric_name(evaluate) == "lowbit.train.loop:evaluate"


@pytest.mark.parametrize("metric,match", [
    ("nope", "unknown metric 'nope'; choose one of .*top1"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("lowbit.metrics:nope", "has no 'nope'"),
    ("lowbit.metrics:DEFAULT", "not a function"),
    ("", "metric must be"),
])
def test_bad_metrics_are_one_line_errors(metric, match):
    with pytest.raises(LowbitError, match=match) as e:
        get_metric(metric)
    assert "\n" not in str(e.value)


def test_registering_a_name_twice_is_refused():
    with pytest.raises(LowbitError, match="already registered"):
        register_metric("top1")(lambda model, ds, **kw: 0.0)
    with pytest.raises(LowbitError, match="without ':'"):
        register_metric("a:b")


def test_a_metric_must_return_a_number(w4a4):
    run, data = w4a4
    model, _ = load_w4a4_run(run)
    with pytest.raises(LowbitError, match="not a number"):
        measure(lambda model, ds, **kw: "high", model, data.val)


def test_cli_rejects_an_unknown_metric_before_any_work(tmp_path, capsys):
    assert main(["sensitivity", "--from", str(tmp_path / "none"), "--method", "alps", "--metric", "nope",
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'nope'" in err and len(err.strip().splitlines()) == 1


def test_alps_scores_are_metric_drops(w4a4, tmp_path):
    """The same top-1 accuracy through the hook gives the same scores, under its own name and file key."""
    run, data = w4a4
    model, _ = load_w4a4_run(run)
    fit = alps_fit_config(0.25, batch_size=32)
    plain = alps_scores(model, data, CANDS, fit=fit, out=tmp_path / "a")
    hooked = alps_scores(model, data, CANDS, fit=fit, out=tmp_path / "b", metric="lowbit.metrics:top1")
    assert hooked.scores == plain.scores
    assert hooked.config["metric"] == "lowbit.metrics:top1" and "metric" not in plain.config
    assert hooked.config["reference_val_metric"] == plain.config["reference_val_acc"]
    assert all(r.extra["val_metric"] == r.extra["val_acc"] for r in hooked.rows)
    assert hooked.config["key"] != plain.config["key"]  # resume never mixes files of two metrics


def test_frontier_records_and_reports_the_metric(w4a4, tmp_path):
    run, data = w4a4
    fit = recipe_fit_config("lsq", 2, epochs=1, examples_per_epoch=32, batch_size=32, quiet=True)
    with pytest.raises(LowbitError, match="unknown metric"):
        FrontierConfig(methods=("eagl",), metric="nope")
    cfg = FrontierConfig(methods=("eagl",), budgets=(0.5,), fit=fit, endpoints=False, metric="lowbit.metrics:top1")
    payload = frontier(run, tmp_path / "fr", cfg, data=data)
    assert payload["metric"] == "lowbit.metrics:top1" and payload["config"]["metric"] == payload["metric"]
    p = payload["points"][0]
    assert p["val_metric"] == p["val_acc"] and p["test_metric"] == p["test_acc"]
    assert payload["references"]["w4a4_checkpoint"]["val_metric"] == payload["references"]["w4a4_checkpoint"]["val_acc"]
    assert "val lowbit.metrics:top1" in (tmp_path / "fr" / "report.md").read_text()
    assert "val_metric" in (tmp_path / "fr" / "frontier.csv").read_text().splitlines()[0]


def test_segmentation_example_runs_alps_with_miou():
    spec = importlib.util.spec_from_file_location("segmentation_metric", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up while it runs
    spec.loader.exec_module(example)
    assert get_metric("miou") is example.miou
    table = example.main(n_train=64, size=8, epochs=1, alps_epochs=0.5, quiet=True)
    assert table.config["metric"] == "miou" and len(table.rows) == 2
    for r in table.rows:
        assert 0 <= r.extra["val_metric"] <= 1 and 0 <= r.extra["val_acc"] <= 1
        assert r.score == pytest.approx(table.config["reference_val_metric"] - r.extra["val_metric"])
