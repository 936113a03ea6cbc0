"""The run directory every command writes: ``runs/<name>/``.

Layout: ``config.yaml`` (the resolved configuration), ``metrics.jsonl`` (one JSON line per epoch or step of
work), ``summary.json`` (the final numbers), ``checkpoint.pt`` (atomic, every epoch), PNG plots and one
``report.md``. Every file is written atomically, so a killed command leaves a consistent directory that
``--resume`` continues from. Under torchrun only rank 0 writes (the other ranks compute the same results).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowbit.distributed import is_main
from lowbit.errors import LowbitError
from lowbit.io import atomic_write_text, load_yaml, save_json, save_yaml


class RunDir:
    """``command`` (what ``config.yaml`` records) must match on ``resume``, so one command never continues or
    overwrites another's run; ``same`` adds the settings a resumed run must share (e.g. its source run)."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False,
                 marker: str = "config.yaml", command: str | None = None, same: dict[str, Any] | None = None):
        self.path = Path(path)
        exists = (self.path / marker).exists()
        self.resume = resume and exists
        self._created = not self.path.exists()
        if self.resume and command is not None:
            self._check_same(marker, {"command": command}, same or {})
        if not is_main():  # rank 0 checks, creates and clears the folder; the others only read it
            return
        if resume and not exists:
            raise LowbitError(f"{self.path}: nothing to resume (no {marker}); run without --resume first")
        if exists and not resume and not overwrite:
            raise LowbitError(f"{self.path} already holds a run; pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --out")
        _check_writable(self.path)  # created by the first file written: a refused command leaves no folder
        if exists and overwrite and not resume:
            for name in ("metrics.jsonl", "summary.json", "checkpoint.pt"):
                (self.path / name).unlink(missing_ok=True)

    def _check_same(self, marker: str, must: dict[str, Any], same: dict[str, Any]) -> None:
        """``must`` has to match; ``same`` where the saved config records it (runs of older versions may not)."""
        saved = load_yaml(self.path / marker)
        saved = saved if isinstance(saved, dict) else {}
        for key, want in {**must, **{k: v for k, v in same.items() if k in saved}}.items():
            if _norm(saved.get(key)) != _norm(want):
                raise LowbitError(f"{self.path}: --resume continues the run this folder holds, but its {key} is "
                                  f"{saved.get(key)!r}, not {want!r}; choose another --out")

    @contextmanager
    def removed_on_error(self) -> Iterator[RunDir]:
        """A command that fails before writing anything but its config leaves no folder behind, so the same
        command, corrected, is not refused as "already holds a run"."""
        try:
            yield self
        except Exception:
            if self._created and is_main() and self.path.is_dir() and set(os.listdir(self.path)) <= {"config.yaml"}:
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict[str, Any]) -> None:
        if is_main():
            save_yaml(self.file("config.yaml"), config)

    def read_metrics(self) -> list[dict[str, Any]]:
        p = self.file("metrics.jsonl")
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite the whole file atomically (it is small), so it always matches the last checkpoint."""
        if is_main():
            atomic_write_text(self.file("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if is_main():
            save_json(self.file("summary.json"), summary)

    def write_report(self, markdown: str, name: str = "report.md") -> None:
        if is_main():
            atomic_write_text(self.file(name), markdown)


def _norm(value: Any) -> Any:
    return os.path.normpath(value) if isinstance(value, str) and value else value  # runs/a/ is runs/a


def _check_writable(path: Path) -> None:
    """Fail now, with one line, if ``path`` could not be created or written later."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise LowbitError(f"cannot create run directory {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot create run directory {path}: {probe} is not writable")


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Loss and accuracy per epoch as one PNG (written atomically; by rank 0 only)."""
    if not rows or not is_main():
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit.io import atomic_write_bytes

    ep = [r["epoch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [r["train_loss"] for r in rows], label="train")
    a1.plot(ep, [r["val_loss"] for r in rows], label="val")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    if all(r.get("val_metric") is not None for r in rows):  # the task metric the user chose
        a2.plot(ep, [r["val_metric"] for r in rows], label="val")
        a2.set_ylabel(rows[-1].get("metric", "metric"))
    else:
        for split in ("train", "val"):
            a2.plot(ep, [float("nan") if r.get(f"{split}_acc") is None else 100 * r[f"{split}_acc"] for r in rows],
                    label=split)
        a2.set_ylabel("accuracy (%)")
    a2.set_xlabel("epoch")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
