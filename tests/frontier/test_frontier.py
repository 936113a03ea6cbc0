import csv
import shutil

import pytest

import lowbit.frontier.sweep as frontier_module
from lowbit.errors import LowbitError
from lowbit.frontier import FrontierConfig, frontier, load_points, spearman
from lowbit.io import load_json
from lowbit.sensitivity import SensitivityRow, SensitivityTable, eagl_scores, load_w4a4_run
from lowbit.train import recipe_fit_config

POINT_KEYS = {"method": str, "label": str, "plan": dict, "low_layers": list, "n_low": int, "bops": int,
              "weight_bytes": int, "relative_throughput": float, "low_bit_mac_fraction": float, "val_acc": float,
              "test_acc": float, "finetune_seconds": float, "key": str}


def _config(**kw):
    fit = recipe_fit_config("lsq", 2, epochs=1, examples_per_epoch=32, batch_size=32, quiet=True)
    return FrontierConfig(**{"methods": ("eagl", "alps", "hessian", "random"), "budgets": (0.5, 1.0), "fit": fit,
                             "options": {"hessian": {"max_iter": 2, "examples": 32}}, **kw})


def _alps_table(run):
    """A stand-in ALPS table that ranks the layers exactly opposite to EAGL (no fine-tuning in this test)."""
    model, _ = load_w4a4_run(run)
    eagl = eagl_scores(model)
    rows = tuple(SensitivityRow(r.layer, -r.score, r.macs, r.params) for r in eagl.rows)
    return SensitivityTable("alps", rows, 12.5, {"forward": 9, "backward": 8, "epochs": 2.0}, {})


@pytest.fixture(scope="module")
def done(w4a4, tmp_path_factory):
    run, data = w4a4
    out = tmp_path_factory.mktemp("frontier") / "fr"
    payload = frontier(run, out, _config(), data=data, tables={"alps": _alps_table(run)})
    return run, data, out, payload


def test_frontier_json_schema(done):
    run, _, out, payload = done
    assert payload == load_json(out / "frontier.json")
    assert {"version", "source", "data", "config", "profile", "candidates", "layers", "references", "methods",
            "spearman_vs_alps", "time_to_solution", "points"} <= set(payload)
    assert list(payload["methods"]) == ["eagl", "alps", "hessian", "random"]
    points = payload["points"]
    assert [p["label"] for p in points] == ["uniform-w4a4", "uniform-w2a2"] + [
        f"{m}-{b}" for m in ("eagl", "alps", "hessian", "random") for b in ("0.5", "1")]
    for p in points:
        for k, t in POINT_KEYS.items():
            assert isinstance(p[k], t), (p["label"], k)
        assert 0 <= p["val_acc"] <= 1 and 0 <= p["test_acc"] <= 1
        assert load_json(out / "points" / f"{p['label']}.json") == p
        if p["budget"] is not None:
            assert p["low_bit_mac_fraction"] >= p["budget"]  # every plan meets its budget
            assert p["time_to_plan_seconds"] == pytest.approx(p["sensitivity_seconds"] + p["solve_seconds"])
    w4, w2 = points[0], points[1]
    assert w4["relative_throughput"] == 1.0 and w4["n_low"] == 0 and w2["low_bit_mac_fraction"] == 1.0
    assert w2["plan"]["conv1"] == [8, 8] and w2["plan"]["fc"] == [8, 8]  # first/last never drop
    for p in points[2:]:
        if p["budget"] == 1.0:  # all candidates at 2 bits = the W2A2 plan, fine-tuned once and shared
            assert p["reused_from"] == "uniform-w2a2" and p["test_acc"] == w2["test_acc"]
    assert sum(layer["mac_share"] for layer in payload["layers"]) == pytest.approx(1.0)
    assert payload["references"]["fp32"]["run"] == str(run.parent / "fp32")
    assert payload["spearman_vs_alps"]["eagl"] == pytest.approx(-1.0)
    tts = payload["time_to_solution"]
    assert tts["alps"]["sensitivity_seconds"] == 12.5 and tts["hessian"]["passes"]["hvp"] >= 1
    assert tts["eagl"]["passes"] == {"forward": 0, "backward": 0, "hvp": 0, "epochs": 0.0}


def test_csv_png_and_reports(done):
    _, _, out, payload = done
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert len(rows) == len(payload["points"])
    assert {"method", "budget", "plan", "bops", "weight_bytes", "relative_throughput", "val_acc", "test_acc",
            "finetune_seconds"} <= set(rows[0])
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "src=\"frontier.png\"" not in html
    md = (out / "report.md").read_text()
    assert "](frontier.png)" in md and "Spearman" in md and "Time to solution" in md and "layer3.0.conv2" in md


def test_resume_skips_finished_points(done, tmp_path, monkeypatch):
    run, data, out, payload = done
    copy = tmp_path / "fr"
    shutil.copytree(out, copy)
    calls = []
    real = frontier_module.finetune_dropped
    monkeypatch.setattr(frontier_module, "finetune_dropped",
                        lambda job, low, save=None: calls.append(tuple(low)) or real(job, low, save))
    stamps = {f.name: f.stat().st_mtime_ns for f in (copy / "points").glob("*.json")}
    again = frontier(run, copy, _config(), data=data, tables={"alps": _alps_table(run)}, resume=True)
    assert calls == [] and {f.name: f.stat().st_mtime_ns for f in (copy / "points").glob("*.json")} == stamps
    assert [p["test_acc"] for p in again["points"]] == [p["test_acc"] for p in payload["points"]]
    target = next(p for p in payload["points"] if p["label"] == "eagl-0.5")
    same_plan = [p["label"] for p in payload["points"] if p["low_layers"] == target["low_layers"]]
    for label in same_plan:  # as if killed before this plan was fine-tuned
        (copy / "points" / f"{label}.json").unlink()
    frontier(run, copy, _config(), data=data, tables={"alps": _alps_table(run)}, resume=True)
    assert calls == [tuple(target["low_layers"])]
    assert {p["label"] for p in load_points(copy)} == {p["label"] for p in payload["points"]}
    with pytest.raises(LowbitError, match="other settings"):
        frontier(run, copy, _config(seed=1), data=data, tables={"alps": _alps_table(run)}, resume=True)


def test_infeasible_budget_fails_before_any_work(w4a4, tmp_path):
    run, data = w4a4
    with pytest.raises(LowbitError, match="out of reach"):
        frontier(run, tmp_path / "fr", _config(budget_kind="throughput", budgets=(1.2, 9.0)), data=data)
    assert not (tmp_path / "fr").exists()


def test_bad_configurations():
    with pytest.raises(LowbitError, match="unknown method"):
        FrontierConfig(methods="eagl,fisher")
    with pytest.raises(LowbitError, match="not among the methods"):
        FrontierConfig(methods=("eagl",), options={"alps": {"epochs": 0.5}})
    with pytest.raises(LowbitError, match="must be in"):
        FrontierConfig(budgets=(0.5, 2.0))


def test_tables_must_score_this_runs_candidates(w4a4, tmp_path):
    run, data = w4a4
    wrong = SensitivityTable("eagl", (SensitivityRow("layer1.0.conv1", 1.0, 1, 1),), 0.0)
    with pytest.raises(LowbitError, match="does not score this run's candidates"):
        frontier(run, tmp_path / "fr", _config(methods=("eagl",), options={}), data=data, tables={"eagl": wrong})


def test_spearman_undefined_is_none():
    assert spearman({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1.0, "b": 2.0, "c": 3.0}) is None
    assert spearman({"a": 1.0}, {"a": 2.0}) is None
    assert spearman({"a": 1.0, "b": 2.0, "c": 3.0}, {"c": 9.0, "b": 5.0, "a": 1.0}) == pytest.approx(1.0)


def test_every_point_keeps_the_model_that_was_measured(done):
    from lowbit.export.exporter import export_run
    from lowbit.frontier import point_checkpoint
    from lowbit.runtime.engine import IntegerModel
    from lowbit.train import evaluate, load_quantized_run

    run, data, out, payload = done
    for p in payload["points"]:
        assert (out / p["checkpoint"]).is_file()
    ckpt, point = point_checkpoint(out, "eagl@0.5")
    assert point["label"] == "eagl-0.5" and ckpt.name.endswith(".pt")
    model, _ = load_quantized_run(ckpt)
    _, acc = evaluate(model, data.test)
    assert acc == point["test_acc"]  # the checkpoint is exactly the fine-tuned point
    result = export_run(ckpt, out / "p.lowbit")
    logits = IntegerModel.load(result.path)(data.test.images)
    exported = (logits.argmax(1) == data.test.labels).double().mean().item()
    assert exported == pytest.approx(point["test_acc"], abs=1.5 / len(data.test))  # rounding may flip one example
    best, chosen = point_checkpoint(out, best=True, min_throughput=1.0 + 1e-6)
    mixed = [p for p in payload["points"] if p["relative_throughput"] > 1 + 1e-6]
    assert chosen["val_acc"] == max(p["val_acc"] for p in mixed) and best.is_file()


def test_point_choice_errors(done):
    from lowbit.frontier import point_checkpoint

    _, _, out, _ = done
    with pytest.raises(LowbitError, match="no frontier point 'nope@0.3'"):
        point_checkpoint(out, "nope@0.3")
    with pytest.raises(LowbitError, match="choose one frontier point"):
        point_checkpoint(out)
    with pytest.raises(LowbitError, match="no frontier point reaches"):
        point_checkpoint(out, best=True, min_throughput=50)
