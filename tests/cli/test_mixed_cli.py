"""``lowbit sensitivity | select | frontier`` through the CLI: outputs, and every user error as one line, exit 2."""

import pytest

from lowbit.cli import main
from lowbit.io import load_json
from lowbit.quant import Plan
from tests.sensitivity.mixed_helpers import w4a4_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return w4a4_run(tmp_path_factory.getbasetemp() / "mixed-w4a4")[0]


def _cli(args, capsys):
    try:
        rc = main([*map(str, args)])
    except SystemExit as e:  # argparse's own errors (e.g. an invalid choice) exit directly
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_sensitivity_select_frontier(run, tmp_path, capsys):
    rc, out, _ = _cli(["sensitivity", "--from", run, "--method", "eagl", "--out", tmp_path / "s", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "s" / "sensitivity.json").exists()
    lines = out.splitlines()
    assert lines[0].startswith("eagl (h4): 8 candidate layers") and lines[2].split()[0] == "1"
    scores = [float(line.split()[2]) for line in lines[2:10]]
    assert scores == sorted(scores, reverse=True)

    rc, out, _ = _cli(["select", "--from", run, "--sensitivity", tmp_path / "s", "--budget", "0.5", "--out",
                       tmp_path / "plan.yaml"], capsys)
    assert rc == 0 and "at 2 bits" in out
    assert sum(b == (2, 2) for b in Plan.load(tmp_path / "plan.yaml").layers.values()) >= 1

    rc, out, _ = _cli(["frontier", "--from", run, "--methods", "random", "--budgets", "0.5", "--epochs", "0.125",
                       "--batch-size", "32", "--data", "synthetic", "--out", tmp_path / "f", "--quiet"], capsys)
    assert rc == 0 and "uniform-w2a2" in out and "report.html" in out
    payload = load_json(tmp_path / "f" / "frontier.json")
    assert [p["label"] for p in payload["points"]] == ["uniform-w4a4", "uniform-w2a2", "random-0.5"]
    assert payload["config"]["fit"]["epochs"] == 0.125 and payload["config"]["fit"]["lr"] == 0.01  # LSQ 2-bit
    assert payload["spearman_vs_alps"] == {}


@pytest.mark.parametrize("args,needle", [
    (["sensitivity", "--from", "{tmp}/missing", "--method", "eagl"], "no such run"),
    (["sensitivity", "--from", "{fp32}", "--method", "eagl"], "W4A4-quantized"),
    (["sensitivity", "--from", "{run}", "--method", "fisher"], "invalid choice"),
    (["sensitivity", "--from", "{run}", "--method", "eagl", "--candidates", "nope"], "not quantized layers"),
    (["frontier", "--from", "{run}", "--methods", "eagl,fisher"], "unknown method"),
    (["frontier", "--from", "{run}", "--budgets", "0.5,lots"], "not a number"),
    (["frontier", "--from", "{run}", "--budgets", "1.5"], "must be in [0, 1]"),
    (["frontier", "--from", "{run}", "--budgets", "5", "--budget-kind", "throughput"], "out of reach"),
    (["select", "--from", "{run}", "--sensitivity", "{tmp}/none", "--budget", "0.5"], "not found"),
])
def test_user_errors_are_one_line_exit_2(run, tmp_path, capsys, args, needle):
    fill = {"tmp": tmp_path, "run": run, "fp32": run.parent / "fp32"}
    args = [a.format(**fill) for a in args] + ["--out", str(tmp_path / "o")]
    rc, _, err = _cli(args, capsys)
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
