"""Atomic file writes and safe checkpoint loading.

Every file lowbit writes goes to a temporary file in the same folder first and is then renamed over the
target, so a killed process never leaves a half-written checkpoint or result behind. Checkpoints are read
with ``torch.load(..., weights_only=True)``: a file a user hands us is never unpickled as code.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from lowbit.errors import LowbitError

CHECKPOINT_FORMAT = "lowbit-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    if path.is_dir():
        raise LowbitError(f"cannot write {path}: it is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise LowbitError(f"cannot write {path}: {e.strerror or e}; choose a writable --out") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise LowbitError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON: NaN and infinities (e.g. the loss of a diverged run) become null, not bare ``NaN``."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, torch.Tensor) or type(o).__module__ == "numpy":
        return _finite(o.tolist())
    return o


def save_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise LowbitError(f"{path}: {_unreadable(e)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: not valid JSON ({e})") from None


def load_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise LowbitError(f"{path}: {_unreadable(e)}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LowbitError(f"{path}: not valid YAML ({first})") from None


def _unreadable(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return "is a folder, expected a file"
    return f"cannot read ({e.strerror or e})"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts only) atomically with a format header."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Load a lowbit checkpoint safely; a foreign, corrupt or wrong-kind file is a :class:`LowbitError`."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign / pickled-code files
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours its hints
        msg = text.splitlines()[0] if text else type(e).__name__
        if "Weights only load failed" in text:
            msg = "it holds pickled Python objects, which lowbit never loads"
        raise LowbitError(f"{path}: not a readable lowbit checkpoint ({msg[:160]})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise LowbitError(f"{path}: not a lowbit checkpoint (missing format header)")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise LowbitError(f"{path}: checkpoint version {obj.get('version')!r} is not supported "
                          f"(this lowbit reads version {CHECKPOINT_VERSION})")
    if kind is not None and obj.get("kind") != kind:
        raise LowbitError(f"{path}: expected a {kind!r} checkpoint, found {obj.get('kind')!r}")
    return obj
