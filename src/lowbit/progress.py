"""Progress: tqdm bars in a terminal, plain timestamped lines in a log.

tqdm hides its bars when stderr is not a terminal, so a long run sent to a file would say nothing for an hour.
There we print one line every ``every`` seconds (and when a loop ends) instead, flushed at once.
``LOWBIT_PROGRESS=bar|log|off`` overrides the choice.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

LOG_EVERY_S = 30.0


def _mode() -> str:
    mode = os.environ.get("LOWBIT_PROGRESS", "").strip().lower()
    if mode in ("bar", "log", "off"):
        return mode
    return "bar" if sys.stderr.isatty() else "log"


class _Lines:
    """The log flavour of a bar: same calls as tqdm's (iterate, update, set_postfix, close)."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str | None, initial: int, unit: str,
                 every: float, leave: bool):
        self.iterable, self.total, self.desc, self.n, self.unit = iterable, total, desc or "", initial, unit
        self.every, self.leave = every, leave
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last = time.monotonic()
        self.shown = initial

    def _line(self) -> None:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        post = "".join(f" {k}={v}" for k, v in self.postfix.items())
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {self.desc}: {done} {self.unit}{post} ({time.monotonic() - self.t0:.0f} s)",
              file=sys.stderr, flush=True)
        self.last, self.shown = time.monotonic(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._line()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def close(self) -> None:
        if self.leave and self.n != self.shown:
            self._line()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()


class _Off:
    def __init__(self, iterable: Iterable | None = None):
        self.iterable = iterable

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator:
        return iter(self.iterable)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             quiet: bool = False, initial: int = 0, unit: str = "it", every: float | None = None,
             leave: bool | None = None) -> Any:
    """A tqdm bar, a line printer or nothing (``quiet``); ``every`` is the log interval (0: every step).

    Loops over epochs or jobs (``unit`` other than "it") log every step and stay on screen; batch loops log
    every :data:`LOG_EVERY_S` seconds.
    """
    mode = "off" if quiet else _mode()
    coarse = unit != "it"
    if mode == "off":
        return _Off(iterable)
    if mode == "log":
        return _Lines(iterable, total, desc, initial, unit, (0.0 if coarse else LOG_EVERY_S) if every is None
                      else every, coarse if leave is None else leave)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit,
                leave=coarse if leave is None else leave)


__all__ = ["progress"]
