"""bench/quantization.py: two copies of the command share the runs and train each exactly once."""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _worker(runs: str, names: list[str], log: str) -> None:
    sys.path.insert(0, str(BENCH))
    import quantization

    def fake_run(cfg, data, resume, overwrite, fit_overrides):
        with open(log, "a") as f:
            f.write(Path(cfg.out).name + "\n")
        time.sleep(0.2)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        summary = {"complete": True, "test_acc": 0.5, "seed": fit_overrides["seed"]}
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary))
        return summary

    quantization.quantize_run = fake_run
    jobs = {n: dict(fp32="fp32", out=Path(runs) / n, bits="w4a4", recipe="lsq+kd", seed=i, epochs=1)
            for i, n in enumerate(names)}
    res = quantization.run_all(jobs, data=None)
    assert sorted(res) == sorted(names) and all(r["complete"] for r in res.values())


def test_two_processes_split_the_runs_and_both_see_all_results(tmp_path):
    names = [f"w4a4-lsq+kd-s{i}" for i in range(6)]
    log = tmp_path / "log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "runs"), names, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    trained = log.read_text().split()
    assert sorted(trained) == sorted(names)  # each run trained once, none twice
