"""The user's own code by import path: ``package.module:name`` or ``path/to/file.py:name``.

Models, data, losses and metrics that lowbit does not ship are named this way on the command line and in run
directories, so a later stage (``--from runs/x``) and a spawned worker can import the same object again. The
current directory (or the file's folder) goes on ``sys.path`` the way ``python -m`` and uvicorn do it; spawned
workers inherit ``sys.path``. Anything that goes wrong is one :class:`LowbitError` line, never a traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError, first_line


def is_import_path(name: Any) -> bool:
    """``module:attr`` (not the ``tv:``/``timm:`` model prefixes)."""
    return (isinstance(name, str) and ":" in name and not name.startswith(("tv:", "timm:"))
            and all(name.partition(":")[::2]))


def _add_path(folder: str) -> None:
    folder = os.path.abspath(folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def import_object(path: str, what: str) -> Any:
    """The object ``path`` names; ``what`` ("model factory", "loss", ...) words the error."""
    if not is_import_path(path):
        raise LowbitError(f"{what} {path!r}: expected 'package.module:name' or 'file.py:name'")
    module, _, attr = path.rpartition(":")
    if module.endswith(".py"):
        file = Path(module)
        if not file.is_file():
            raise LowbitError(f"{what} {path!r}: file {module} not found")
        _add_path(str(file.parent))
        module = file.stem
    else:
        _add_path(os.getcwd())
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LowbitError(f"{what} {path!r}: cannot import {module!r} ({why}); is it on PYTHONPATH?") from None
    except Exception as e:  # the user's module raised while importing
        raise LowbitError(f"{what} {path!r}: importing {module!r} raised {type(e).__name__}: "
                          f"{first_line(e)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LowbitError(f"{what} {path!r}: module {module!r} has no {attr!r}") from None
    return obj


def import_callable(path: str, what: str) -> Callable:
    fn = import_object(path, what)
    if not callable(fn):
        raise LowbitError(f"{what} {path!r} is a {type(fn).__name__}, not a function or class")
    return fn


def call_factory(path: str, what: str, kwargs: dict[str, Any] | None = None) -> Any:
    """``factory(**kwargs)``; an exception raised by the user's factory becomes one line naming it."""
    fn = import_callable(path, what)
    try:
        return fn(**(kwargs or {}))
    except LowbitError:
        raise
    except Exception as e:
        raise LowbitError(f"{what} {path!r} raised {type(e).__name__}: {first_line(e)}") from None


def parse_args_option(text: str | dict | None, flag: str) -> dict[str, Any]:
    """``--model-args`` / ``--data-args``: inline YAML/JSON (``'{width: 2}'``) or a .yaml/.json file."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    source = text
    if text.endswith((".yaml", ".yml", ".json")):
        if not Path(text).is_file():
            raise LowbitError(f"{flag}: {text}: file not found")
        source = Path(text).read_text()
    try:
        value = yaml.safe_load(source)
    except yaml.YAMLError as e:
        raise LowbitError(f"{flag}: not valid YAML/JSON ({first_line(e)})") from None
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise LowbitError(f"{flag}: expected a mapping of argument names to values, e.g. '{{hidden: 64}}'")
    try:
        json.dumps(value)  # must travel in config.yaml and checkpoints
    except TypeError as e:
        raise LowbitError(f"{flag}: values must be numbers, strings, lists or mappings ({e})") from None
    return value


__all__ = ["call_factory", "import_callable", "import_object", "is_import_path", "parse_args_option"]
