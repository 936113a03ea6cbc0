"""``lowbit walk`` through the CLI: run directories for all four problems, resume, and one-line errors."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

import lowbit.neuro.run as neuro_run
from lowbit.cli import main
from lowbit.io import load_json
from lowbit.neuro import Chain, save_matrix
from tests.neuro.conftest import random_chain

TINY = ["--walkers", "600", "--sweep", "150,300,600", "--repeats", "1", "--quiet"]
FILES = ["config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "density.png", "error_vs_walkers.png",
         "report.md", "report.html"]


def _cli(args, capsys):
    try:
        rc = main([*map(str, args)])
    except SystemExit as e:  # argparse's own errors (e.g. an invalid choice) exit directly
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def matrix_file(tmp_path_factory):
    return save_matrix(tmp_path_factory.mktemp("m") / "chain.npz", random_chain(16, 4, seed=3))


@pytest.mark.parametrize("args", [
    ["--problem", "diffusion", "--mesh", "12x12", "--steps", "20"],
    ["--problem", "diffusion", "--mesh", "30", "--topology", "torus", "--steps", "20", "--prob-bits", "6"],
    ["--problem", "jump-diffusion", "--mesh", "121", "--steps", "50"],
    ["--problem", "heat", "--mesh", "8x8"],
    ["--problem", "dtmc", "--matrix", "{matrix}", "--steps", "10", "--start", "2"],
])
def test_each_problem_writes_a_run_directory(tmp_path, capsys, matrix_file, args):
    args = [a.format(matrix=matrix_file) for a in args]
    rc, out, err = _cli(["walk", *args, *TINY, "--out", tmp_path / "w"], capsys)
    assert rc == 0, err
    assert "walker updates/s" in out and "report.html" in out
    assert all((tmp_path / "w" / f).exists() for f in FILES)
    s = load_json(tmp_path / "w" / "summary.json")
    assert s["spiking"]["walker_steps"] > 0 and s["baseline"]["walker_steps"] > 0
    assert s["agreement"]["p_value"] > 1e-4
    assert s["cost"]["synaptic_events"] > 0 and s["cost"]["truenorth_energy_j"] > 0
    assert s["bias"]["bits"] == s["config"]["prob_bits"] and len(s["sweep"]["mean"]) == 3
    assert "Quantization bias" in (tmp_path / "w" / "report.md").read_text()
    assert (tmp_path / "w" / "report.html").read_text().count("data:image/png;base64") == 2


def test_resume_continues_a_killed_run_to_the_same_answer(tmp_path, capsys, monkeypatch):
    args = ["walk", "--mesh", "10x10", "--steps", "40", "--checkpoint-every", "10", *TINY]
    rc, _, _ = _cli([*args, "--out", tmp_path / "whole"], capsys)
    assert rc == 0
    real = neuro_run.simulate

    def killed(*a, **kw):  # the main (checkpointed) run dies right after its second checkpoint
        if kw.get("checkpoint") is None:
            return real(*a, **kw)
        inner = kw["checkpoint"]

        def cp(state):
            inner(state)
            if state.step == 20:
                raise KeyboardInterrupt
        return real(*a, **{**kw, "checkpoint": cp})

    monkeypatch.setattr(neuro_run, "simulate", killed)
    rc, _, err = _cli([*args, "--out", tmp_path / "cut"], capsys)
    assert rc == 130 and "--resume" in err
    monkeypatch.setattr(neuro_run, "simulate", real)
    rc, _, _ = _cli([*args, "--out", tmp_path / "cut", "--resume"], capsys)
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "spiking"] == [10, 20, 30, 40]
    a, b = (load_json(tmp_path / d / "summary.json") for d in ("whole", "cut"))
    assert a["spiking"]["errors"] == b["spiking"]["errors"] and a["cost"] == b["cost"]
    rc, _, err = _cli([*args[:-1], "--walkers", "700", "--out", tmp_path / "cut", "--resume"], capsys)
    assert rc == 2 and "walkers=600" in err


@pytest.mark.parametrize("args,needle", [
    (["--mesh", "64xx"], "not a mesh"),
    (["--mesh", "0x8"], "positive"),
    (["--mesh", "8x8x8"], "1 or 2 sizes"),
    (["--walkers", "-5"], "walkers must be a positive integer"),
    (["--steps", "-1"], "steps must be a positive integer"),
    (["--prob-bits", "40"], "prob_bits must be an integer in [1, 24]"),
    (["--problem", "dtmc"], "needs a transition matrix"),
    (["--problem", "dtmc", "--matrix", "{bad}"], "row 0 of the transition matrix sums to 0.9"),
    (["--problem", "dtmc", "--matrix", "{tmp}/none.npz"], "not found"),
    (["--problem", "heat", "--mesh", "2x9"], "at least 3x3"),
    (["--problem", "jump-diffusion", "--mesh", "31"], "use --mesh"),
    (["--problem", "diffusion", "--mesh", "16", "--topology", "grid"], "topology grid needs a 2-D mesh"),
    (["--problem", "heat", "--topology", "torus"], "--topology is for problem diffusion"),
    (["--problem", "diffusion", "--start", "99999"], "outside the mesh"),
    (["--problem", "diffusion", "--stay", "1.5"], "stay probability"),
    (["--problem", "jump-diffusion", "--jump-std", "-1"], "jump_std must be > 0"),
    (["--sweep", "100,lots"], "comma-separated walker counts"),
    (["--problem", "nope"], "invalid choice"),
])
def test_user_errors_are_one_line_exit_2_and_leave_no_folder(tmp_path, capsys, args, needle):
    bad = tmp_path / "bad.npz"
    sp.save_npz(bad, sp.csr_matrix(np.array([[0.5, 0.4], [0.0, 1.0]])))
    args = [a.format(bad=bad, tmp=tmp_path) for a in args]
    rc, _, err = _cli(["walk", *args, "--quiet", "--out", tmp_path / "out"], capsys)
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_a_user_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, _, err = _cli(["walk", "--device", "cuda", "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "no CUDA GPU" in err and not (tmp_path / "out").exists()


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    args = ["walk", "--mesh", "8", "--steps", "5", *TINY, "--out", tmp_path / "w"]
    assert _cli(args, capsys)[0] == 0
    rc, _, err = _cli(args, capsys)
    assert rc == 2 and "--overwrite" in err
    assert _cli([*args, "--overwrite"], capsys)[0] == 0


def test_a_chain_with_an_unnormalised_row_is_refused_before_anything_runs():
    with pytest.raises(Exception, match="sums to"):
        Chain.from_scipy(np.array([[0.2, 0.2], [0.5, 0.5]]))
