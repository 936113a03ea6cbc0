"""Two gloo ranks under torchrun, end to end through the CLI, against one process.

Each launch costs a few seconds of start-up (two Python processes importing torch); the models are tiny.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.data import synthetic
from lowbit.frontier import FrontierConfig, frontier, select
from lowbit.io import load_checkpoint
from lowbit.sensitivity import SensitivityTable, sensitivity
from lowbit.train import FitConfig, QuantizeConfig, TrainConfig, quantize_run, recipe_fit_config, train

CANDS = "layer1.0.conv1,layer2.0.conv2,layer3.0.conv1"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for _k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lowbit(*args: str, ranks: int = 1, ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port())]
    r = subprocess.run([*launch, "-m", "lowbit", *args, "--quiet"], env={**ENV, **(env or {})}, capture_output=True,
                       text=True,
                       timeout=300)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """A resnet8 (width 0.5) trained briefly on the CLI's synthetic data (2 epochs of 512: ~30%; with less it is
    at chance level, and comparing accuracies would say nothing)."""
    out = tmp_path_factory.mktemp("ddp") / "fp32"
    train(TrainConfig(model="resnet8", width=0.5, data="synthetic", out=str(out),
                      fit=FitConfig(epochs=2, batch_size=32, lr=0.1, quiet=True)), data=synthetic())
    return out


@pytest.fixture(scope="module")
def quantized(fp32):
    """``(out, one)``: a 2-rank W4A4 run directory and the one-process summary with the same settings."""
    one = quantize_run(QuantizeConfig(source=str(fp32), out=str(fp32.parent / "one"), data="synthetic"),
                       fit_overrides={"epochs": 1, "batch_size": 32, "lr": 0.02, "quiet": True})
    out = fp32.parent / "two"
    _lowbit("quantize", *_quantize_flags(fp32), "--epochs", "1", "--out", str(out), ranks=2)
    return out, one


def _quantize_flags(fp32: Path) -> list[str]:
    return ["--from", str(fp32), "--bits", "w4a4", "--data", "synthetic", "--batch-size", "32", "--lr", "0.02"]


def test_quantize_on_two_ranks_writes_one_run(quantized):
    out, one = quantized
    files = sorted(p.name for p in out.iterdir())
    assert files == ["checkpoint.pt", "config.yaml", "curves.png", "metrics.jsonl", "report.md", "summary.json"]
    two = json.loads((out / "summary.json").read_text())
    assert two["complete"] and two["epochs"] == 1
    assert one["val_acc"] > 0.2  # learned something: the comparison means something
    assert abs(two["val_acc"] - one["val_acc"]) < 0.06  # same global batch and steps; only the noise differs
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["examples"] == 512  # the two shards cover the epoch once


def test_quantize_resumes_on_two_ranks(fp32, quantized):
    out, _ = quantized
    row1 = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    _lowbit("quantize", *_quantize_flags(fp32), "--epochs", "2", "--resume", "--out", str(out), ranks=2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == row1  # continued from rank 0's checkpoint
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no stray temporary files


def test_compiled_quantize_on_two_ranks_resumes_with_plain_checkpoint_keys(fp32, tmp_path):
    """DDP under torch.compile (Dynamo with the eager backend: the wiring, not Inductor's kernels)."""
    out, env = tmp_path / "compiled", {"LOWBIT_COMPILE_BACKEND": "eager"}
    _lowbit("quantize", *_quantize_flags(fp32), "--epochs", "1", "--compile", "--out", str(out), ranks=2, env=env)
    _lowbit("quantize", *_quantize_flags(fp32), "--epochs", "2", "--compile", "--resume", "--out", str(out),
            ranks=2, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["compiled_steps"] for r in rows] == [16, 16]  # 256 examples per rank, batches of 16
    keys = load_checkpoint(out / "checkpoint.pt")["state_dict"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


@pytest.fixture(scope="module")
def w4a4(fp32):
    out = fp32.parent / "w4a4"
    quantize_run(QuantizeConfig(source=str(fp32), out=str(out), data="synthetic"), data=synthetic(),
                 fit_overrides={"epochs": 0.5, "batch_size": 32, "quiet": True})
    return out


def _alps_flags(w4a4: Path) -> list[str]:
    return ["--from", str(w4a4), "--method", "alps", "--data", "synthetic", "--epochs", "0.125", "--batch-size",
            "32", "--candidates", CANDS, "--seed", "3"]


@pytest.fixture(scope="module")
def alps(w4a4):
    """``(one, two)``: ALPS tables of one process (here, one thread) and of two ranks, same settings."""
    root = w4a4.parent
    one = sensitivity(w4a4, "alps", root / "alps-one", data="synthetic", candidates=CANDS, seed=3,
                      options={"epochs": 0.125, "batch_size": 32})
    _lowbit("sensitivity", *_alps_flags(w4a4), "--out", str(root / "alps-two"), ranks=2)
    return one, root / "alps-two"


def test_alps_on_two_ranks_equals_one_process(w4a4, alps):
    one, two_dir = alps
    two = SensitivityTable.load(two_dir)
    assert two.scores == one.scores  # every candidate's fine-tune is independent of the rank it ran on
    assert two.passes == one.passes and two.config["ranks"] == 2
    assert sorted(p.name for p in (two_dir / "alps").iterdir()) == sorted(
        [f"{c}.json" for c in CANDS.split(",")] + ["_reference.json"])
    plans = [select(w4a4, d, 0.5, d.with_suffix(".yaml")).selection.chosen
             for d in (two_dir.parent / "alps-one", two_dir)]
    assert plans[0] == plans[1] and plans[0]


def test_alps_resumes_on_two_ranks(w4a4, alps):
    one, two_dir = alps
    (two_dir / "alps" / f"{CANDS.split(',')[1]}.json").unlink()  # killed before this one finished
    kept = {p.name: p.stat().st_mtime_ns for p in (two_dir / "alps").iterdir()}
    _lowbit("sensitivity", *_alps_flags(w4a4), "--out", str(two_dir), "--resume", ranks=2)
    again = SensitivityTable.load(two_dir)
    assert again.scores == one.scores and again.config["resumed"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in (two_dir / "alps").iterdir() if p.name in kept} == kept


def test_frontier_on_two_ranks_equals_one_process(w4a4, tmp_path):
    """Plans are spread over the ranks, each fine-tuned alone: every point equals the one-process point."""
    fit = recipe_fit_config("lsq", 2, epochs=0.125, batch_size=32, quiet=True)
    cfg = FrontierConfig(methods=("eagl", "alps"), budgets=(0.5, 1.0), fit=fit, candidates=CANDS.split(","),
                         options={"alps": {"epochs": 0.125}})  # the CLI leaves ALPS at its batch of 128
    one = frontier(w4a4, tmp_path / "one", cfg, data="synthetic")
    _lowbit("frontier", "--from", str(w4a4), "--methods", "eagl,alps", "--budgets", "0.5,1.0", "--data", "synthetic",
            "--epochs", "0.125", "--alps-epochs", "0.125", "--batch-size", "32", "--candidates", CANDS,
            "--out", str(tmp_path / "two"), ranks=2)
    two = json.loads((tmp_path / "two" / "frontier.json").read_text())
    keys = ("label", "plan", "val_acc", "val_loss", "test_acc", "test_loss", "reused_from")
    assert [[p[k] for k in keys] for p in two["points"]] == [[p[k] for k in keys] for p in one["points"]]
    alps = [[(r["layer"], r["score"], r["val_acc"]) for r in t["methods"]["alps"]["rows"]] for t in (one, two)]
    assert alps[0] == alps[1]
    assert sorted(p.name for p in (tmp_path / "two" / "points").glob("*.json")) == sorted(
        f"{p['label']}.json" for p in one["points"])
    kept = {p.name for p in (tmp_path / "two" / "points").glob("*.pt")}  # each distinct plan's model, once
    assert kept == {p["checkpoint"].split("/")[-1] for p in two["points"]} and len(kept) == len(
        {tuple(p["low_layers"]) for p in two["points"]})


def test_a_nan_loss_stops_every_rank(tmp_path):
    r = _lowbit("train", "--model", "resnet8", "--width", "0.5", "--data", "synthetic", "--epochs", "1",
                "--batch-size", "32", "--lr", "1e30", "--out", str(tmp_path / "nan"), ranks=2, ok=False)
    assert r.stderr.count("lowbit: error: loss became") == 2  # both ranks stop at the same step, one line each
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


def test_the_cli_entry_point_exists():
    assert (Path(__file__).resolve().parents[2] / "src" / "lowbit" / "__main__.py").exists()
