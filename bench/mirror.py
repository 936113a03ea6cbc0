"""A committed copy of a long benchmark's resumable state, so that another session or machine continues it.

``runs/`` is not in git, and the issue-scale benchmarks take longer than one session on 2 cores. Every stage
they finish is a small record (JSON results, run configs and metrics) plus the base runs' checkpoints; those are
mirrored into ``bench/state/<name>/`` (committed) while the benchmark runs and restored into ``runs/`` when a
fresh checkout lacks them, after which the benchmark's own ``--resume`` logic skips what is done. Per-point
model files (``points/*.pt``) stay out: resuming needs only the records, and they would weigh tens of MB.

    python bench/mirror.py sync runs/bench-frontier-r20 bench/state/frontier-r20      # copy finished state in
    python bench/mirror.py restore bench/state/frontier-r20 runs/bench-frontier-r20   # before resuming
"""

from __future__ import annotations

import atexit
import filecmp
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Collection
from pathlib import Path

MAX_FILE_BYTES = 8 << 20


def _kept(rel: Path, size: int) -> bool:
    """Records and base checkpoints, not per-point models, plots or anything large."""
    if size > MAX_FILE_BYTES or rel.suffix in (".png", ".lowbit", ".onnx", ".lock") or "__pycache__" in rel.parts:
        return False
    return not (rel.suffix == ".pt" and "points" in rel.parts)


def _copy(src: Path, dst: Path) -> bool:
    """Atomic copy when the content differs; True if something was written."""
    if dst.exists() and filecmp.cmp(src, dst, shallow=False):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return True


def _finished(ckpt: Path) -> bool:
    summary = ckpt.with_name("summary.json")
    try:
        return summary.exists() and bool(json.loads(summary.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def sync(runs: Path, state: Path, sources: Collection[str] | None = None) -> int:
    """Mirror ``runs`` into ``state`` (files only added or updated: a stage never goes back); returns #written.

    A run's metrics are copied before its checkpoint, so a copy taken mid-epoch never holds a checkpoint
    newer than its metrics. With ``sources`` (the top-level runs that others start from), a finished run
    outside them keeps only its records: resuming needs its summary, not its weights.
    """
    files = sorted((p for p in runs.rglob("*") if p.is_file() and not p.name.endswith(".tmp")),
                   key=lambda p: p.name == "checkpoint.pt")
    n = 0
    for p in files:
        rel = p.relative_to(runs)
        if sources is not None and p.name == "checkpoint.pt" and rel.parts[0] not in sources and _finished(p):
            (state / rel).unlink(missing_ok=True)
            continue
        try:
            if _kept(rel, p.stat().st_size):
                n += _copy(p, state / rel)
        except FileNotFoundError:  # replaced while we looked (atomic writes): the next sync takes it
            continue
    return n


def restore(state: Path, runs: Path) -> int:
    """Copy into ``runs`` what it lacks from ``state`` (never overwrites newer local state); returns #copied."""
    n = 0
    if state.is_dir():
        for p in sorted(state.rglob("*")):
            dst = runs / p.relative_to(state)
            if p.is_file() and not dst.exists():
                n += _copy(p, dst)
    return n


def mirror(runs: Path, state: Path, every: float = 300.0, sources: Collection[str] | None = None) -> None:
    """Restore now, then sync every ``every`` seconds from a daemon thread and once more at exit (SIGTERM too)."""
    restored = restore(state, runs)
    if restored:
        print(f"restored {restored} file(s) of earlier progress from {state}", flush=True)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            sync(runs, state, sources)

    threading.Thread(target=loop, daemon=True, name="bench-state-mirror").start()

    def final() -> None:
        stop.set()
        sync(runs, state, sources)

    atexit.register(final)
    # a stopped benchmark (kill, end of a session) still leaves its last finished stage in the mirror
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("sync", "restore"):
        print("usage: python bench/mirror.py sync RUNS STATE | restore STATE RUNS", file=sys.stderr)
        return 2
    src, dst = Path(argv[1]), Path(argv[2])
    if not src.is_dir():
        print(f"error: {src} is not a folder", file=sys.stderr)
        return 2
    n = sync(src, dst) if argv[0] == "sync" else restore(src, dst)
    print(f"{argv[0]}: {n} file(s) written to {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
