"""Data: Fashion-MNIST (IDX reader), the fixed train/validation split, synthetic data, ImageFolder."""

from lowbit.data.datasets import (
    FMNIST_CLASSES,
    SPLIT_SEED,
    DataSplits,
    TensorDataset,
    augment,
    fashion_mnist,
    iterate,
    normalize,
    num_batches,
    resolve_data_dir,
    split_train_val,
    synthetic,
)
from lowbit.data.idx import read_idx, write_idx
from lowbit.data.protocol import batch_len, call_model, head, logits_of, num_examples, split_batch, to_device

__all__ = [
    "FMNIST_CLASSES", "BUILTIN_DATA", "DataSplits", "TensorDataset", "as_splits", "augment", "batch_len",
    "call_model", "fashion_mnist", "get_data", "head", "iterate", "logits_of", "normalize", "num_batches",
    "num_examples", "read_idx", "resolve_data_dir", "split_batch", "split_train_val", "synthetic", "to_device",
    "write_idx",
]

BUILTIN_DATA = ("fashion-mnist", "synthetic", "imagefolder")
DEFAULT_VAL_FRACTION = 0.1


FMNIST_TRAIN_SIZE = 60_000


def as_splits(obj, name: str = "custom", val_fraction: float | None = None, seed: int = 0) -> DataSplits:
    """A user's data as :class:`DataSplits`: given as is, or a mapping / tuple ``(train, val[, test])``.

    Without a validation split, a seeded ``val_fraction`` (default 0.1) of a map-style training set is held
    out: selection and tuning must never see the test set.
    """
    import torch

    from lowbit.data.protocol import is_map_style
    from lowbit.errors import LowbitError

    if isinstance(obj, DataSplits):
        return obj
    if isinstance(obj, dict):
        unknown = sorted(set(obj) - {"train", "val", "test"})
        if unknown or "train" not in obj:
            raise LowbitError(f"data {name}: expected keys train, val (optional) and test (optional), got "
                              f"{', '.join(map(str, obj)) or 'none'}")
        train, val, test = obj["train"], obj.get("val"), obj.get("test")
    elif isinstance(obj, (tuple, list)) and 2 <= len(obj) <= 3:
        train, val, test = (*obj, None)[:3]
    else:
        raise LowbitError(f"data {name}: expected DataSplits, a dict with train/val/test or a tuple (train, val, "
                          f"test), got {type(obj).__name__}")
    if val is None:
        if not is_map_style(train):
            raise LowbitError(f"data {name}: no validation split, and the training data ({type(train).__name__}) "
                              "cannot be split; return a val split, or a map-style Dataset for train")
        frac = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        n_val = max(1, round(frac * len(train)))
        if n_val >= len(train):
            raise LowbitError(f"data {name}: {len(train)} training examples are too few to hold out {n_val}")
        tr, va = split_train_val(len(train), n_val, seed=SPLIT_SEED + seed)
        train, val = torch.utils.data.Subset(train, tr.tolist()), torch.utils.data.Subset(train, va.tolist())
    elif val_fraction is not None:
        raise LowbitError(f"--val-fraction: data {name} already has a validation split")
    return DataSplits(train, val, test, name)


def get_data(name: str = "fashion-mnist", data_dir=None, *, val_fraction: float | None = None,
             image_size: int | None = None, workers: int = 0, data_args: dict | None = None, **kw) -> DataSplits:
    """Data set by name: ``fashion-mnist`` (default), ``synthetic`` (tests, smoke runs), ``imagefolder``, or the
    user's own factory ``package.module:function`` (or ``file.py:function``) called with ``data_args``.

    A factory returns :class:`DataSplits`, or ``{"train": ..., "val": ..., "test": ...}`` / ``(train, val,
    test)`` of torch Datasets, DataLoaders or iterables of batches (see :mod:`lowbit.data.protocol`); without
    ``val`` a seeded share of a map-style train set is held out (:func:`as_splits`).

    ``val_fraction`` (share of the training images held out for selection) and ``image_size`` default to the
    data set's own (Fashion-MNIST: 5,000 of 60,000 at 28×28; ImageFolder: 2% at 224). ``workers`` sizes the
    ImageFolder DataLoader; in-memory sets need none. An option a data set cannot honour is an error rather
    than silently ignored, so a run's config.yaml says what it used.
    """
    from lowbit.errors import LowbitError
    from lowbit.plugins import call_factory, is_import_path

    if val_fraction is not None and not 0 < val_fraction < 1:
        raise LowbitError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if is_import_path(name):
        if image_size is not None or data_dir:
            raise LowbitError("--image-size and --data-dir apply to lowbit's data sets; pass your factory's own "
                              "options with --data-args")
        return as_splits(call_factory(name, "data factory", data_args), name, val_fraction)
    if data_args:
        raise LowbitError(f"--data-args applies to a data factory (package.module:function), not to {name}")
    if name == "imagefolder":
        from lowbit.data.imagefolder import image_folder

        if not data_dir:
            raise LowbitError("--data imagefolder needs --data-dir pointing at a folder with train/ and val/")
        opts = {k: v for k, v in (("val_fraction", val_fraction), ("image_size", image_size)) if v is not None}
        return image_folder(data_dir, workers=workers, **opts, **kw)
    if name not in ("fashion-mnist", "fmnist", "synthetic"):
        raise LowbitError(f"unknown data set {name!r}; choose fashion-mnist, synthetic, imagefolder or your own "
                          "factory as package.module:function")
    if image_size is not None:
        raise LowbitError(f"--image-size applies to --data imagefolder; {name} has fixed-size images")
    if name == "synthetic":
        if val_fraction is not None:
            raise LowbitError("--val-fraction does not apply to --data synthetic (fixed split sizes)")
        return synthetic(**kw)
    if val_fraction is not None:
        kw["val_size"] = max(1, round(val_fraction * FMNIST_TRAIN_SIZE))
    return fashion_mnist(data_dir, **kw)
