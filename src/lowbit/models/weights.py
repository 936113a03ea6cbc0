"""Initialise a model from a local weights file: how pretrained torchvision/timm weights enter a run.

Nothing is downloaded, ever: the user fetches the file. Files are read with safetensors or with
``torch.load(weights_only=True)``, so a file cannot run code. Common wrappers are unwrapped
(``{"state_dict": ...}``, ``{"model": ...}``, lowbit fp32 checkpoints) and the prefixes that
DistributedDataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``) add are stripped. Whatever still
does not fit the model exactly is one error naming a few of the keys, because a silently partial load would
look like a bad quantization result much later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

_WRAPPERS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 3  # keys named per kind of mismatch


def load_weights_(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load every parameter and buffer of ``model`` from ``path`` (in place); returns ``model``.

    The file must cover the model exactly (old files without BatchNorm's ``num_batches_tracked`` are
    accepted). The classifier is not replaced: weights trained on 1000 classes need a 1000-class data set.
    """
    state = _strip_prefixes(_unwrap(read_weights(path), path), model)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        why = _describe(missing, unexpected, wrong, state, own, model)
        raise LowbitError(f"{path}: weights do not fit the model: {why}")
    for k in own:  # BatchNorm counters that old files lack keep the model's value
        state.setdefault(k, own[k])
    model.load_state_dict(state)
    return model


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor] | object:
    """The raw content of a local weights file (safetensors, else a safe ``torch.load``)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)):
        raise LowbitError(f"{path}: --weights takes a local file; lowbit never downloads, fetch the file first")
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"{path}: weights file not found")
    if _is_safetensors(p):
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error type for truncated or foreign headers
            raise LowbitError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign / pickled-code files
        if "Unsupported global" in str(e):  # weights_only refused a class: pickled objects, not tensors
            raise LowbitError(f"{path}: holds Python objects besides tensors, which lowbit does not unpickle; "
                              f"save model.state_dict() (torch.save or safetensors) instead") from None
        raise LowbitError(f"{path}: not a readable weights file; expected safetensors or a state dict saved with "
                          f"torch.save(model.state_dict()) ({_first_line(e)})") from None


def _is_safetensors(p: Path) -> bool:
    """By suffix, or by header (8-byte little-endian JSON length, then ``{``) whatever the file is called."""
    if p.suffix == ".safetensors":
        return True
    try:
        with p.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise LowbitError(f"{p}: cannot read ({e.strerror or e})") from None
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < p.stat().st_size


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _unwrap(obj: object, path) -> dict[str, torch.Tensor]:
    for _ in range(len(_WRAPPERS)):
        if _is_state_dict(obj) or not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not _is_state_dict(obj):
        found = (f"keys {', '.join(map(str, list(obj)[:_SHOW]))}" if isinstance(obj, dict) and obj
                 else type(obj).__name__)
        raise LowbitError(f"{path}: no state dict (names -> tensors) in the file, found {found}; save "
                          f"model.state_dict() or a dict holding it under 'state_dict' or 'model'")
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    own = list(model.state_dict())
    for _ in range(2 * len(_PREFIXES)):  # e.g. "_orig_mod.module." from a compiled DDP model
        pre = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)
                    and not any(k.startswith(p) for k in own)), None)
        if pre is None:
            break
        state = {k[len(pre):]: v for k, v in state.items()}
    return state


def _describe(missing, unexpected, wrong, state, own, model) -> str:
    def some(keys):
        more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
        return ", ".join(keys[:_SHOW]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
    if wrong:
        shapes = [f"{k} {list(state[k].shape)} in the file vs {list(own[k].shape)}" for k in wrong[:_SHOW]]
        more = f" (+{len(wrong) - _SHOW} more)" if len(wrong) > _SHOW else ""
        parts.append(f"{len(wrong)} of another shape ({', '.join(shapes)}{more})")
    hint = ""
    head = _classifier(model)
    if head and wrong and not missing and not unexpected and all(k.rsplit(".", 1)[0] == head for k in wrong):
        hint = (f"; the file's classifier has {state[wrong[0]].shape[0]} classes and the data set "
                f"{own[wrong[0]].shape[0]}: use weights trained on the same classes")
    elif len(missing) == len([k for k in own if not k.endswith("num_batches_tracked")]):
        hint = "; no key matches: is the file for another architecture?"
    return "; ".join(parts) + hint


def _classifier(model: nn.Module) -> str | None:
    """Name of the last Linear: the classifier of the usual torchvision/timm models."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def _first_line(e: Exception) -> str:
    msg = str(e).strip()
    return (msg.splitlines()[0] if msg else type(e).__name__)[:160]
