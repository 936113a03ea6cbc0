"""The data protocol every stage speaks: any torch ``Dataset``, ``DataLoader`` or iterable of batches.

A batch is a tensor (inputs only), an ``(inputs, target)`` tuple (``(x1, x2, ..., target)`` calls
``model(x1, x2, ...)``) or a dict, whose target is the first of :data:`TARGET_KEYS` present and whose other
entries are the model's keyword arguments (``model(**inputs)``, as Hugging Face models are called). lowbit's own
sets (Fashion-MNIST, synthetic, ImageFolder) produce ``(x, y)`` batches through the same :func:`iterate`.

How each kind of source is batched:

* a map-style ``Dataset`` (``__len__`` + ``__getitem__``): lowbit draws the order from a generator seeded by
  (seed, epoch) and collates with ``default_collate``, so resumed runs see the same batches and ``limit`` and
  torchrun shards are exact;
* a ``DataLoader``: used as built (its batch size, workers and collate); for training, torch's global RNG is
  seeded by (seed, epoch) before each epoch so its shuffling (and dropout) depends on them only;
* any other iterable (a list of batches, a generator factory's result): taken as it comes, in its order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from lowbit.errors import LowbitError

TARGET_KEYS = ("labels", "label", "target", "targets", "y")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a batch; the target is None for a bare tensor or a dict without a target key."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k != key}, None if key is None else batch[key]
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) > 2:
            return tuple(batch[:-1]), batch[-1]
    raise LowbitError(f"a batch must be a tensor, an (inputs, target) tuple or a dict, got {type(batch).__name__}")


def target_hint(inputs: Any) -> str:
    """What to add to the error of a model that failed on ``inputs``: a dict whose target key lowbit did not
    recognise passes that target to the model as an input."""
    if isinstance(inputs, Mapping):
        return f"; a dict batch passes its target under one of {', '.join(TARGET_KEYS)}"
    return ""


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def to_device(obj: Any, device: str | torch.device | None) -> Any:
    """Tensors anywhere in ``obj`` (dicts, tuples, lists) moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for item in items:
        t = first_tensor(item)
        if t is not None:
            return t
    return None


def batch_len(batch: Any) -> int:
    """Examples in a batch: the first dimension of its first tensor."""
    t = first_tensor(batch)
    if t is None or t.ndim == 0:
        raise LowbitError("a batch holds no tensor with a batch dimension")
    return int(t.shape[0])


def head(obj: Any, n: int = 1) -> Any:
    """The first ``n`` examples of a batch or of its inputs (every tensor sliced along dimension 0)."""
    if isinstance(obj, Tensor):
        return obj[:n] if obj.ndim else obj
    if isinstance(obj, Mapping):
        return {k: head(v, n) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(head(v, n) for v in obj)
    return obj


def logits_of(outputs: Any) -> Tensor:
    """The prediction tensor of a model's output: itself, ``outputs["logits"]`` (Hugging Face) or the first
    element of a tuple."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        for key in ("logits", "last_hidden_state"):
            if key in outputs:
                return outputs[key]
    t = first_tensor(outputs)
    if t is None:
        raise LowbitError(f"the model returned {type(outputs).__name__} without a tensor; return logits or "
                          "pass a loss function that reads your outputs")
    return t


def is_builtin(ds: Any) -> bool:
    """lowbit's own producers: in-memory image tensors, or a set with its own ``batches`` (ImageFolder)."""
    from lowbit.data.datasets import TensorDataset

    return isinstance(ds, TensorDataset) or hasattr(ds, "batches")


def is_map_style(ds: Any) -> bool:
    return (isinstance(ds, Dataset) and not isinstance(ds, IterableDataset) and hasattr(ds, "__len__")
            and not isinstance(ds, DataLoader))


def check_source(ds: Any, split: str) -> Any:
    """A usable data source, or one line saying what a split must be."""
    if is_builtin(ds):
        return ds
    if ds is None or isinstance(ds, (str, bytes, Tensor)) or not (is_map_style(ds) or isinstance(ds, Iterable)):
        raise LowbitError(f"the {split} split must be a torch Dataset, a DataLoader or an iterable of batches, "
                          f"got {type(ds).__name__}")
    return ds


def can_shard(ds: Any) -> bool:
    """Whether torchrun ranks can take disjoint shards: map-style sets (lowbit draws the order), not loaders."""
    return is_map_style(ds)


def user_batches(ds: Any, batch_size: int, *, train: bool = False, seed: int = 0, epoch: int = 0,
                 device: str | torch.device | None = "cpu", limit: int | None = None,
                 shard: tuple[int, int] | None = None) -> Iterator[Any]:
    """Batches of a user's source (module docstring), on ``device``, stopping after ``limit`` examples."""
    epoch_seed = seed * 1_000_003 + epoch
    if is_map_style(ds):
        n = len(ds) if limit is None else min(limit, len(ds))
        g = torch.Generator().manual_seed(epoch_seed)
        order = torch.randperm(len(ds), generator=g)[:n] if train else torch.arange(n)
        if shard is not None and shard[1] > 1:
            order = order[shard[0]::shard[1]]
        for i in range(0, len(order), batch_size):
            yield to_device(default_collate([ds[int(j)] for j in order[i:i + batch_size]]), device)
        return
    if shard is not None and shard[1] > 1:
        raise LowbitError(f"a {type(ds).__name__} cannot be split over torchrun ranks; pass a map-style Dataset "
                          "(lowbit then shards it) or run in one process")
    if isinstance(ds, IterableDataset):
        ds = DataLoader(ds, batch_size=batch_size)
    if train and isinstance(ds, DataLoader):
        torch.manual_seed(epoch_seed)  # the loader's shuffle (and dropout) depend on (seed, epoch) only
    seen = 0
    for batch in ds:
        if limit is not None and seen >= limit:
            return
        yield to_device(batch, device)
        seen += batch_len(batch)


def num_examples(ds: Any) -> int:
    """Examples in a source (counted by iterating once where nothing tells it)."""
    if is_builtin(ds) or is_map_style(ds):
        return len(ds)
    if isinstance(ds, DataLoader) and is_map_style(ds.dataset):
        n = len(ds.dataset)
        return n - n % ds.batch_size if ds.drop_last and ds.batch_size else n
    return sum(batch_len(b) for b in user_batches(ds, 1, device=None))


def user_num_batches(ds: Any, batch_size: int, limit: int | None = None) -> int:
    if is_map_style(ds):
        n = len(ds) if limit is None else min(limit, len(ds))
        return math.ceil(n / batch_size)
    if isinstance(ds, DataLoader) and ds.batch_size:  # counted from its length: no pass over the data
        try:
            n = len(ds)
        except TypeError:
            n = None
        if n is not None:
            return n if limit is None else min(n, math.ceil(limit / ds.batch_size))
    return sum(1 for _ in user_batches(ds, batch_size, limit=limit, device=None))


__all__ = ["TARGET_KEYS", "batch_len", "call_model", "can_shard", "check_source", "first_tensor", "head",
           "is_builtin", "logits_of", "num_examples", "split_batch", "to_device", "user_batches",
           "user_num_batches"]
