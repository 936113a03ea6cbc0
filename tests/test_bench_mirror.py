"""bench/mirror.py: the committed copy that lets a long benchmark resume in another session."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from mirror import main, restore, sync  # noqa: E402


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_sync_keeps_records_and_base_checkpoints_not_point_models(tmp_path):
    runs, state = tmp_path / "runs", tmp_path / "state"
    _write(runs / "w4a4" / "checkpoint.pt", "base")
    _write(runs / "frontier-seed0" / "points" / "eagl-0.5.json", "{}")
    _write(runs / "frontier-seed0" / "points" / "eagl-0.5.pt", "model")
    _write(runs / "frontier-seed0" / "frontier.png", "png")
    assert sync(runs, state) == 2
    kept = sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file())
    assert kept == ["frontier-seed0/points/eagl-0.5.json", "w4a4/checkpoint.pt"]
    assert sync(runs, state) == 0  # unchanged files are not rewritten
    _write(runs / "w4a4" / "checkpoint.pt", "later epoch")
    assert sync(runs, state) == 1 and (state / "w4a4" / "checkpoint.pt").read_text() == "later epoch"


def test_restore_fills_gaps_and_never_overwrites_local_progress(tmp_path):
    runs, state = tmp_path / "runs", tmp_path / "state"
    _write(state / "w4a4" / "checkpoint.pt", "old")
    _write(state / "alps" / "layer1.json", "{}")
    _write(runs / "w4a4" / "checkpoint.pt", "newer")
    assert restore(state, runs) == 1
    assert (runs / "w4a4" / "checkpoint.pt").read_text() == "newer"
    assert (runs / "alps" / "layer1.json").exists()


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["copy", "a", "b"]) == 2
    assert main(["sync", str(tmp_path / "missing"), str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()
    assert "error" in capsys.readouterr().err


def test_a_terminated_benchmark_leaves_its_last_stage_in_the_mirror(tmp_path):
    import signal
    import subprocess

    runs, state = tmp_path / "runs", tmp_path / "state"
    bench = Path(__file__).resolve().parent.parent / "bench"
    code = (f"import sys, time; sys.path.insert(0, {str(bench)!r}); from pathlib import Path; "
            f"from mirror import mirror; mirror(Path({str(runs)!r}), Path({str(state)!r}), every=3600); "
            f"Path({str(runs / 'points')!r}).mkdir(parents=True); "
            f"Path({str(runs / 'points' / 'a.json')!r}).write_text('{{}}'); print('ready', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert (state / "points" / "a.json").read_text() == "{}"


def test_finished_runs_outside_the_sources_keep_only_their_records(tmp_path):
    runs, state = tmp_path / "runs", tmp_path / "state"
    _write(runs / "fp32" / "checkpoint.pt", "source")
    _write(runs / "fp32" / "summary.json", '{"complete": true}')
    _write(runs / "w4a4-s0" / "checkpoint.pt", "epoch 2")
    _write(runs / "w4a4-s0" / "summary.json", '{"complete": false}')
    sync(runs, state, sources={"fp32"})
    assert (state / "w4a4-s0" / "checkpoint.pt").exists()  # unfinished: resumes from it
    _write(runs / "w4a4-s0" / "summary.json", '{"complete": true}')
    sync(runs, state, sources={"fp32"})
    assert not (state / "w4a4-s0" / "checkpoint.pt").exists()  # finished: the summary is enough
    assert (state / "w4a4-s0" / "summary.json").read_text() == '{"complete": true}'
    assert (state / "fp32" / "checkpoint.pt").exists()  # other runs start from it
